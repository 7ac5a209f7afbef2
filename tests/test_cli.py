"""The command lines without starting anything: `tandem --version`, and a `--model` that cannot
be used (a hub id neither cached nor downloadable, a wrong path) refused at once with what to
do, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from services import cli, launcher
from services.launcher import free_port, kv_transport_of
from services.version import tandem_version
from shared.transfer import nixl_available

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_pyprojects() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{tandem_version()}"\n' in pyproject


def test_tandem_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"tandem {tandem_version()}"


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def offline(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache, offline, and a hub endpoint nothing listens on."""
    return {
        "HF_HUB_CACHE": str(tmp_path / "hf-hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }


def test_tandem_up_with_an_uncached_hub_id_offline_says_what_to_do(tmp_path: Path) -> None:
    out = _run(
        *("services.cli", "up", "--model", "Some/Id", "--port", str(free_port())),
        *("--log-dir", str(tmp_path / "logs")),
        env=offline(tmp_path),
    )
    assert out.returncode != 0
    assert (
        "tandem up: error: Some/Id: no such local directory, and not in the Hugging Face cache" in out.stderr
    )
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in out.stderr and "`hf download Some/Id`" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "logs").exists()  # refused before any service started


def test_tandem_up_with_a_wrong_path_says_it_is_not_a_model_directory(tmp_path: Path) -> None:
    logs = str(tmp_path / "logs")
    out = _run("services.cli", "up", "--model", "./nope", "--port", str(free_port()), "--log-dir", logs)
    assert out.returncode != 0
    assert "tandem up: error: not a model directory: ./nope (no such directory" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ("services.worker", "--model", "Some/Id"),
        ("services.prefill", "--model", "Some/Id"),
        ("services.decode", "--model", "Some/Id"),
        ("services.router", "--model", "Some/Id"),
        ("services.gateway", "--router", "127.0.0.1:1", "--tokenizer", "Some/Id"),
        ("services.cli", "demo", "--model", "Some/Id"),
    ],
)
def test_every_service_refuses_an_uncached_hub_id_offline(argv: tuple[str, ...], tmp_path: Path) -> None:
    out = _run(*argv, env=offline(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "Some/Id: no such local directory, and not in the Hugging Face cache" in out.stderr
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr


def test_the_gateway_names_its_own_flag(tmp_path: Path) -> None:
    out = _run("services.gateway", "--router", "127.0.0.1:1", "--tokenizer", str(tmp_path / "nope"))
    assert out.returncode == 2 and "--tokenizer takes a local HF model directory" in out.stderr


def test_the_launcher_knows_which_kv_transport_its_pd_workers_use() -> None:
    # up's flag comes after the workers' on their command line; of theirs, the last counts;
    # auto is NIXL where it is installed, else gRPC.
    assert kv_transport_of("grpc", ["--kv-transport", "nixl"]) == "grpc"
    assert kv_transport_of(None, ["--kv-transport", "nixl", "--kv-transport=grpc"]) == "grpc"
    auto = "nixl" if nixl_available() else "grpc"
    assert kv_transport_of(None, ["--device", "cpu"]) == kv_transport_of("auto", []) == auto


def test_up_refuses_zero_gateways(tmp_path: Path) -> None:
    out = _run("services.cli", "up", "--gateways", "0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument --gateways: must be a positive integer, got 0" in out.stderr


def test_free_ports_come_from_under_the_ephemeral_range() -> None:
    """Ports the kernel hands to port-0 binds and connections' source ports cannot take them
    between the launcher's choice and the child's bind (a gateway test once found another
    test's gRPC server on its port)."""
    low = launcher._ephemeral_low()
    ports = {free_port() for _ in range(20)}
    if low is not None and low >= 4096:
        assert all(low // 2 <= p < low for p in ports), (low, ports)
    for port in ports:  # each can be bound right now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_answering_something_other_than_http_is_not_healthy() -> None:
    """The launcher's health probe reads a non-HTTP answer (an HTTP/2 server's bytes) as "not
    up yet", so start-up reports the gateway that exited instead of a traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x7f\xff\xff\xff")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert launcher._http_ok(f"http://127.0.0.1:{port}/health") is False
        thread.join(timeout=5)


def test_tandem_up_refuses_an_unknown_policy_at_once_naming_the_choices() -> None:
    """Before anything starts (the router would otherwise exit at startup with the error in its log)."""
    out = _run("services.cli", "up", "--prefill-policy", "nearest")
    assert out.returncode == 2
    assert "--prefill-policy" in out.stderr and "cache_aware" in out.stderr and "round_robin" in out.stderr


@pytest.mark.parametrize("reuse_port", [False, True])
def test_tandem_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path, reuse_port: bool) -> None:
    """A listener on the gateway's port: refused at once, before the router or any worker starts
    (it showed only once every worker was up), also when it shares the port out with
    SO_REUSEPORT (several gateways, which set it too, would have split connections with it)."""
    with socket.socket() as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = _run(
            "services.cli", "up", "--port", str(port), "--gateways", "2", "--log-dir", str(tmp_path / "logs"),
            env={"TANDEM_HOME": str(tmp_path)},
        )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the gateway's port 127.0.0.1:{port} is taken" in out.stderr
    assert not (tmp_path / "logs").exists()  # nothing started


def test_a_service_that_keeps_exiting_is_restarted_ever_later_until_a_run_lasts() -> None:
    child = launcher.Child("worker-0", None, Path("unused.log"))  # type: ignore[arg-type]
    child.started = 100.0
    delays = [launcher.restart_delay(child, 100.0 + 5) for _ in range(8)]  # each within a minute
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert launcher.restart_delay(child, 100.0 + launcher.RESTART_RESET_S + 1) == 1.0  # a run that lasted
    assert launcher.restart_delay(child, 100.0 + 1) == 2.0


def test_a_restarted_service_s_death_report_shows_its_last_run_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service failing at every start: each report shows that run's output, not every run's."""
    cmd = [sys.executable, "-c", "import os; print('run of', os.getpid())"]
    child = launcher.Child.launch("worker-0", cmd, dict(os.environ), tmp_path / "worker-0.log")
    first = child.process.pid
    child.process.wait()
    child.restart()
    child.process.wait()
    launcher._report_death(child)
    report = capsys.readouterr().err
    assert f"run of {child.process.pid}" in report and f"run of {first}" not in report
    assert f"run of {first}" in child.log.read_text()  # the log keeps every run


def test_the_suite_serves_while_a_router_a_gateway_and_a_way_to_run_prompts_live() -> None:
    still = launcher._still_serves
    assert still(["router", "prefill-0", "decode-0", "gateway"])
    assert still(["router", "worker-1", "gateway-1"])
    assert still(["router", "prefill-0", "decode-1", "worker-0", "gateway-0", "gateway-1"])
    assert not still(["router", "prefill-0", "gateway"])  # a prefill worker alone
    assert not still(["router", "decode-0", "decode-1", "gateway"])
    assert not still(["prefill-0", "decode-0", "gateway"])  # no router
    assert not still(["router", "worker-0"])  # no gateway


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--port", "70000"), "argument --port: must be a port number (1 to 65535), got 70000"),
        (("--port", "0"), "argument --port: must be a port number (1 to 65535), got 0"),
        (("--router-port", "-5"), "argument --router-port: must be a port number (1 to 65535), got -5"),
        (("--prefill", "-1"), "argument --prefill: must be 0 or a positive integer, got -1"),
        (("--startup-timeout", "0"), "argument --startup-timeout: must be a positive number, got 0"),
        (
            ("--quantization", "fp8"),
            "tandem up: error: unrecognized arguments: --quantization fp8 (a service's own flags go in"
            " --worker-args, --prefill-args, --decode-args, --router-args or --gateway-args)",
        ),
    ],
)
def test_up_refuses_a_bad_flag_in_argparse_s_words(argv: tuple[str, ...], message: str) -> None:
    out = _run("services.cli", "up", *argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert message in out.stderr and "usage: tandem up" in out.stderr


def test_up_s_flags_for_the_services_take_a_lone_flag() -> None:
    # argparse reads "--worker-args --disable-radix-cache" as a flag without its value.
    argv = ("--worker-args", "--disable-radix-cache", "--router-args", "-v", "--port", "0")
    out = _run("services.cli", "up", *argv)
    assert "expected one argument" not in out.stderr and "argument --port" in out.stderr
    given = ["up", "--worker-args", "--x", "--gateway-args", "--y 1", "--port", "5"]
    attached = cli._attach_flag_values(given)
    assert attached == ["up", "--worker-args=--x", "--gateway-args=--y 1", "--port", "5"]


def test_up_with_a_log_dir_it_cannot_make_says_so(tiny_llama: Path) -> None:
    out = _run("services.cli", "up", "--model", str(tiny_llama), "--log-dir", "/proc/no/such/dir")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "tandem up: error: cannot make the log directory" in out.stderr


def test_up_needs_both_halves_of_a_pd_pair() -> None:
    out = _run("services.cli", "up", "--prefill", "2", "--decode", "0")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "tandem up: error: PD needs both --prefill and --decode workers (or neither, for unified workers)"
    )


def test_up_refuses_an_architecture_no_worker_serves_before_starting_anything(
    tiny_llama: Path, tmp_path: Path
) -> None:
    model = tmp_path / "bert"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    out = _run("services.cli", "up", "--model", str(model), "--log-dir", str(tmp_path / "logs"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"tandem up: error: {model}: model architecture 'BertForMaskedLM' is not supported" in out.stderr
    assert "LlamaForCausalLM" in out.stderr  # the supported ones are named
    assert not (tmp_path / "logs").exists()  # nothing started


def test_role_flags_need_pd_workers() -> None:
    """Unified workers only: a prefill or decode worker's flags have no worker to go to."""
    out = _run("services.cli", "up", "--prefill", "0", "--decode", "0", "--decode-args", "-v")
    assert out.returncode != 0 and "--decode-args need --prefill and --decode" in out.stderr
