"""`tandem up --gateways 2`: two gateway processes share the HTTP port (SO_REUSEPORT), the kernel
spreads new connections over them, each answers correctly and reports its own metrics; the
ready-file lists each gateway's metrics endpoint."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_gateways")
ROOT = Path(__file__).resolve().parents[2]

COMPLETIONS_OK = re.compile(
    r'^tandem_gateway_requests_total\{endpoint="/v1/completions",status="200"\} (\S+)$', re.M
)


def served(metrics_url: str) -> int:
    match = COMPLETIONS_OK.search(httpx.get(metrics_url, timeout=10).text)
    return int(float(match.group(1))) if match else 0


def test_two_gateways_share_the_port(tiny_llama: Path, tmp_path: Path) -> None:
    args = ("--prefill", "0", "--decode", "0", "--unified", "1", "--gateways", "2")
    with tandem_up(tiny_llama, tmp_path, args=args) as up:
        gateways = {name: url for name, url in up["metrics"].items() if name.startswith("gateway")}
        assert set(gateways) == {"gateway-0", "gateway-1"}
        assert len(set(gateways.values())) == 2 and all(up["pids"][name] for name in gateways)
        body = {"model": up["model"], "prompt": "the sea", "max_tokens": 4, "temperature": 0}
        texts = set()
        for _ in range(40):  # a new connection each: the kernel picks a process per connection
            with httpx.Client(timeout=60) as client:
                reply = client.post(f"{up['openai']}/completions", json=body)
            assert reply.status_code == 200, reply.text
            texts.add(reply.json()["choices"][0]["text"])
        assert len(texts) == 1  # greedy: the same answer from either process
        counts = [served(url) for url in gateways.values()]
        assert sum(counts) == 40
        assert min(counts) > 0  # both served (all 40 on one: 2**-39)


def test_a_port_held_without_sharing_is_a_clear_error(tiny_llama: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cmd = [sys.executable, "-m", "services.gateway", "--reuse-port", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--router", "127.0.0.1:1", "--tokenizer", str(tiny_llama)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
