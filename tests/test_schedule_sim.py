"""bench/schedule_sim.py: a real engine's scheduling under a closed-loop load, timed by a model
of GPU steps. Every request finishes, the decode batch never exceeds what the KV pool holds,
and the modelled clock follows the steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sim(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / f"sim{len(list(tmp_path.glob('*.json')))}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "schedule_sim.py"), "--model-dir", str(tmp_path / "model")]
    cmd += ["--input-len", "64", "--output-len", "8", "--json", str(out), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "out tok/s" in proc.stdout and "TTFT p50" in proc.stdout
    return json.loads(out.read_text())


def test_a_pool_for_two_requests_decodes_two_at_a_time(tmp_path: Path) -> None:
    roomy = sim(tmp_path, "--clients", "4", "--requests", "12")
    assert roomy["requests"] == 12 and roomy["ttft_ms"]["p50"] > 0
    assert 3 < roomy["decode_batch"] <= 4
    # (64 + 8) tokens a request, 16-token pages: 5 pages each; 10 pages hold two at most
    tight = sim(tmp_path, "--clients", "4", "--requests", "12", "--max-total-tokens", "160")
    assert tight["decode_batch"] <= 2
    assert tight["ttft_ms"]["p50"] > roomy["ttft_ms"]["p50"]  # the others wait for room
    # the clock: 8 output tokens a request through decode steps of at least --decode-ms each
    slow = sim(tmp_path, "--clients", "4", "--requests", "12", "--decode-ms", "70")
    assert slow["seconds"] > roomy["seconds"] and slow["output_tok_s"] < roomy["output_tok_s"]


def test_a_client_round_trip_delays_each_next_request(tmp_path: Path) -> None:
    """`--client-ms`: a finished request's client sends its next one that much later (the
    serving path's round trip); the first round goes at once, the other two wait."""
    direct = sim(tmp_path, "--clients", "4", "--requests", "12")
    late = sim(tmp_path, "--clients", "4", "--requests", "12", "--client-ms", "500")
    assert late["requests"] == 12
    assert late["seconds"] - direct["seconds"] >= 2 * 0.5 - 1e-6
