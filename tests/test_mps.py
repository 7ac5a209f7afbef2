"""`tandem up --mps`: the MPS control daemon starts with pipes in the suite's own directory and
is told to quit afterwards; without the NVIDIA utilities the launcher fails at once, clearly.
The daemon itself needs an NVIDIA driver, so a script stands in for its control program here;
the GPU runs in docs/benchmarks.md used the real one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.mps import CONTROL, MpsError, mps_daemon


def fake_control(bin_dir: Path, record: Path, exit_code: int = 0) -> None:
    bin_dir.mkdir()
    script = bin_dir / CONTROL
    script.write_text(
        "#!/bin/sh\n"
        f'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {record}\n'
        f"echo 'no GPU here' >&2\nexit {exit_code}\n"
    )
    script.chmod(0o755)


def test_daemon_starts_in_our_directory_and_quits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "calls"
    fake_control(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with mps_daemon(tmp_path / "mps") as env:
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "pipe")
        assert Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert record.read_text().splitlines() == [f"args=-d pipe={tmp_path / 'mps' / 'pipe'} stdin="]
    assert record.read_text().splitlines()[1] == f"args= pipe={tmp_path / 'mps' / 'pipe'} stdin=quit"


def test_a_failing_daemon_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_control(tmp_path / "bin", tmp_path / "calls", exit_code=3)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(MpsError, match=r"exit 3.*no GPU here"), mps_daemon(tmp_path / "mps"):
        pass


def test_tandem_up_without_the_nvidia_utilities_fails_at_once(tiny_llama: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "TANDEM_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_llama), "--mps", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    assert f"tandem up failed: --mps needs {CONTROL}" in proc.stderr
