"""bench/stream_overhead.py end to end on the CPU: stub workers behind a real router and gateway,
streaming clients timing each token and each request's first token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_streams_are_timed_per_token_and_per_first_token(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    cmd = [sys.executable, str(ROOT / "bench" / "stream_overhead.py"), "--concurrency", "4"]
    cmd += [
        "--tokens",
        "6",
        "--interval-ms",
        "20",
        "--prompt-len",
        "300",
        "--seconds",
        "2",
        "--json",
        str(out),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["delivered_tok_per_s"] > 0.3 * result["offered_tok_per_s"]
    # tokens come 20 ms apart at the stub; the first comes at once, so a request's start costs
    # the hops alone: well under the stub's interval times the tokens
    assert result["itl"]["p50_ms"] >= 20 * 0.9
    assert 0 < result["ttft"]["p50_ms"] < 6 * 20
    assert "TTFT p50" in proc.stdout and "300-token prompts" in proc.stdout
