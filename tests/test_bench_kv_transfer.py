"""bench/kv_transfer.py runs end to end in a small configuration and moves the right bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.transfer import nixl_available

ROOT = Path(__file__).resolve().parents[1]


def test_kv_transfer_bench_moves_correct_pages(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    args = [
        "--layers",
        "2",
        "--tokens",
        "64,128",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--fragmented",
        "--idle-seconds",
        "1",
    ]
    variants = ["--variants", "default; pt"] if nixl_available() else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kv_transfer.py"), *args, *variants, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    transports = {(r["transport"], r["variant"]) for r in rows}
    expected = {("grpc", ""), ("copy-ipc", ""), ("copy-local", "")}
    if nixl_available():
        expected |= {(t, v) for t in ("nixl-done", "nixl-notif") for v in ("default", "pt")}
        # NIXL's progress thread is off by default: an idle agent does not spin a core
        idle = {r["variant"]: r["percent_of_core"] for r in report["idle"]}
        assert idle.keys() == {"default", "pt"} and idle["default"] < 20
    else:
        assert any(s.startswith("nixl:") for s in report["skipped"])
    assert transports == expected
    assert {r["tokens"] for r in rows} == {64, 128}
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert "grpc" in result.stdout and "GB/s" in result.stdout
