#!/usr/bin/env bash
# CI smoke test of the README's run command: `tandem up` on the default model answers an OpenAI
# chat request and stops cleanly on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export TANDEM_HOME="$tmp/home"
.venv/bin/tandem up --port "$port" --ready-file "$tmp/ready.json" >"$tmp/up.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; cat "$tmp/up.log"' ERR
for _ in $(seq 300); do
    [ -f "$tmp/ready.json" ] && break
    kill -0 $pid 2>/dev/null || { echo "tandem up exited"; false; }
    sleep 1
done
[ -f "$tmp/ready.json" ]
model=$(.venv/bin/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$tmp/ready.json")
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 8}" \
    | .venv/bin/python -c 'import json, sys; r = json.load(sys.stdin); assert r["choices"][0]["message"]["role"] == "assistant", r; print("tandem up answered:", r["usage"])'
kill -TERM $pid
wait $pid
echo "tandem up stopped cleanly"
rm -rf "$tmp"
