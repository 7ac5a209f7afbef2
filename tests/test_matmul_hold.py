"""bench/matmul_hold.py on the CPU: the held matmul rate per window beside the burst."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import matmul_hold


def test_held_rates_cover_the_hold_window_by_window(tmp_path: Path) -> None:
    out = tmp_path / "hold.json"
    result = matmul_hold.main(["--device", "cpu", "--seconds", "0.6", "--window", "0.2", "--json", str(out)])
    assert result["shape"] == "float32 1024^3"
    assert 3 <= len(result["held_flops"]) <= 4  # 0.6 s in 0.2 s windows (the last may run over)
    assert all(r > 1e8 for r in result["held_flops"]) and result["burst_flops"] > 1e8
    assert result["gpu_state_at_end"] is None  # no GPU: nothing read from nvidia-smi
    assert json.loads(out.read_text()) == result


def test_a_window_longer_than_the_hold_is_refused() -> None:
    with pytest.raises(SystemExit):
        matmul_hold.main(["--device", "cpu", "--seconds", "0.1", "--window", "0.5"])
