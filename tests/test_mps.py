"""`tandem up --mps`: the MPS control daemon starts with pipes in the suite's own directory and
is told to quit afterwards; without the NVIDIA utilities the launcher fails at once, clearly;
`--mps-sm-percent` gives the workers of a role their share of the SMs; MPS and decode pacing
come by default only where prefill and decode share a GPU.
The daemon itself needs an NVIDIA driver, so a script stands in for its control program here;
the GPU runs in docs/benchmarks.md used the real one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher import free_port
from services.mps import (
    CONTROL,
    SM_PERCENT_ENV,
    MpsError,
    mps_daemon,
    parse_sm_percent,
    shared_gpu_args,
    shares_a_gpu,
)
from tests.suite.cluster import started_services


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
    port = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_llama), "--mps", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1
    assert f"tandem up failed: --mps needs {CONTROL}" in proc.stderr


def test_sm_percent_parses_roles_and_refuses_what_is_not_one() -> None:
    assert parse_sm_percent("") == {}
    assert parse_sm_percent("decode=40") == {"decode": 40}
    assert parse_sm_percent(" prefill=100 , decode=1 ") == {"prefill": 100, "decode": 1}
    for bad, why in [
        ("decode", "not ROLE=PERCENT"),
        ("router=50", "not ROLE=PERCENT"),
        ("decode=0", "from 1 to 100, not '0'"),
        ("decode=101", "from 1 to 100"),
        ("decode=half", "from 1 to 100, not 'half'"),
        ("decode=40,decode=50", "decode is given twice"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_sm_percent(bad)


SERVICES = ("router", "prefill", "decode", "gateway")


@contextlib.contextmanager
def up_with_fake_mps(tiny_llama: Path, tmp_path: Path, *flags: str) -> Iterator[dict[str, int]]:
    """`tandem up` (PD, gRPC KV, CPU workers) with a stand-in MPS control program on PATH (its
    calls recorded in tmp_path/calls) until the block ends; yields the pids of its router,
    prefill, decode and gateway once started (`started_services`). It must then stop cleanly on
    SIGTERM."""
    fake_control(tmp_path / "bin", tmp_path / "calls")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "TANDEM_HOME": str(tmp_path)}
    env.pop(SM_PERCENT_ENV, None)
    cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_llama), "--port", str(free_port())]
    cmd += ["--prefill", "1", "--decode", "1", "--kv-transport", "grpc"]
    cmd += [*flags, "--worker-args", "--device cpu --max-total-tokens 2048"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield started_services(proc, SERVICES)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_tandem_up_gives_each_role_its_sm_share(tiny_llama: Path, tmp_path: Path) -> None:
    """The real launcher with a stand-in MPS control program: the workers of the role named get
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (read by CUDA when the engine creates its context), the
    others none."""
    with up_with_fake_mps(tiny_llama, tmp_path, "--mps", "--mps-sm-percent", "decode=40") as pids:

        def share(name: str) -> str | None:
            environ = Path(f"/proc/{pids[name]}/environ").read_bytes().split(b"\0")
            values = [
                e.split(b"=", 1)[1].decode() for e in environ if e.startswith(SM_PERCENT_ENV.encode() + b"=")
            ]
            return values[0] if values else None

        assert share("decode") == "40"
        assert share("prefill") is None and share("router") is None and share("gateway") is None


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--mps-sm-percent", "decode=40"], "--mps-sm-percent needs --mps"),
        (["--mps", "--mps-sm-percent", "decode=0"], "from 1 to 100"),
        (["--mps", "off", "--mps-sm-percent", "decode=40"], "--mps-sm-percent needs --mps"),
        (["--mps", "sometimes"], "invalid choice: 'sometimes'"),
    ],
)
def test_tandem_up_refuses_a_bad_sm_share_before_starting_anything(
    tiny_llama: Path, tmp_path: Path, flags: list[str], why: str
) -> None:
    port = str(free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--model", str(tiny_llama), "--port", port, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TANDEM_HOME": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert why in proc.stderr
    assert not list(tmp_path.glob("logs-*")), "nothing should have started"


def test_prefill_and_decode_share_a_gpu_when_their_device_is_cuda() -> None:
    assert shares_a_gpu(1, 1, ["--device", "cuda:0", "--max-total-tokens", "8192"])
    assert shares_a_gpu(2, 1, ["--device=cuda"])
    assert not shares_a_gpu(1, 1, ["--device", "cpu"])
    assert not shares_a_gpu(1, 1, ["--device", "cuda:0", "--device", "cpu"])  # the last one counts
    assert not shares_a_gpu(0, 0, ["--device", "cuda:0"])  # unified workers: no PD pair
    driver = Path("/proc/driver/nvidia/version").exists()
    assert shares_a_gpu(1, 1, []) == driver  # auto: CUDA when a driver is loaded


def test_workers_on_a_shared_gpu_get_the_measured_flags_unless_told_otherwise() -> None:
    assert shared_gpu_args("decode", ["--device", "cuda:0"]) == [
        "--decode-step-interval-ms",
        "35",
        "--decode-pacing-backlog",
        "0.5",
    ]
    assert shared_gpu_args("prefill", ["--device", "cuda:0"]) == ["--chunked-prefill-size", "4096"]
    assert shared_gpu_args("worker", ["--device", "cuda:0"]) == []  # unified: nothing shared
    # Each flag the user gives wins, alone: the others still come.
    assert shared_gpu_args("decode", ["--decode-step-interval-ms", "20"]) == [
        "--decode-pacing-backlog",
        "0.5",
    ]
    assert shared_gpu_args("decode", ["--decode-step-interval-ms=0", "--decode-pacing-backlog", "1"]) == []
    assert shared_gpu_args("prefill", ["--chunked-prefill-size=8192"]) == []


def test_tandem_up_on_the_cpu_starts_no_mps_and_paces_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    """PD on the CPU (the default --mps auto): the MPS control program is never run, and the
    workers get exactly the flags they were given."""
    with up_with_fake_mps(tiny_llama, tmp_path) as pids:

        def argv(name: str) -> list[str]:
            return Path(f"/proc/{pids[name]}/cmdline").read_bytes().decode().split("\0")

        assert "--decode-step-interval-ms" not in argv("decode")
        assert "--decode-pacing-backlog" not in argv("decode")
        assert "--chunked-prefill-size" not in argv("prefill")
        assert not (tmp_path / "calls").exists(), "MPS was started for workers on the CPU"
