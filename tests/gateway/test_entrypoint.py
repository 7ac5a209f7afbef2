"""`python -m services.gateway` end to end, and the gateway's life without a router."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from services.gateway import GatewayConfig
from services.launcher import free_port
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_entrypoint")

ROOT = Path(__file__).resolve().parents[2]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 25.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not become healthy")


@pytest.fixture
def stub_router(tokenizer_dir: Path) -> Iterator[StubRouter]:
    router = StubRouter(tokenizer_dir).start()
    yield router
    router.stop()


def test_module_entry_point(stub_router: StubRouter, tokenizer_dir: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "services.gateway",
        "--router",
        stub_router.address,
        "--tokenizer",
        str(tokenizer_dir),
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]  # learned from ListModels
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "The cat"}], max_tokens=3
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=15)[0].decode(errors="replace")
    assert proc.returncode == 0, output


def test_without_router_health_is_503_and_requests_are_503(tokenizer_dir: Path) -> None:
    # With the model name given, the gateway starts before the router is up.
    dead = f"127.0.0.1:{free_port()}"
    config = GatewayConfig(
        router=dead, tokenizer=str(tokenizer_dir), served_model_name="alias", health_timeout=0.5
    )
    gateway = GatewayThread(config).start()
    try:
        health = httpx.get(f"{gateway.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["alias"]
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model="alias", prompt="The cat")
        assert info.value.status_code == 503
    finally:
        gateway.stop()


def test_health_follows_the_router(stub_router: StubRouter, tokenizer_dir: Path) -> None:
    config = GatewayConfig(router=stub_router.address, tokenizer=str(tokenizer_dir), health_timeout=5)
    gateway = GatewayThread(config).start()
    try:
        assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200
        stub_router.stop()
        assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 503
    finally:
        gateway.stop()


def test_startup_fails_without_router_or_model_name(tokenizer_dir: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    config = GatewayConfig(router=dead, tokenizer=str(tokenizer_dir), startup_timeout=0.3)
    with pytest.raises(RuntimeError, match="did not start"):
        GatewayThread(config).start()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_the_router_stops_at_once(
    tokenizer_dir: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The start-up waits up to --startup-timeout for a router to list the model (900 s under
    `tandem up`); uvicorn looked at SIGTERM and Ctrl-C only once started, so the gateway went on
    waiting and `tandem up` had to kill it after its 10 s grace (a QA pass)."""
    log = tmp_path / "gateway.log"
    cmd = [sys.executable, "-m", "services.gateway", "--router", f"127.0.0.1:{free_port()}"]
    cmd += ["--tokenizer", str(tokenizer_dir), "--port", str(free_port()), "--startup-timeout", "120"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Waiting for application startup" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # into the wait for the router
        sent = time.monotonic()
        proc.send_signal(sig)
        # As once started: uvicorn raises a SIGTERM again as it exits; Ctrl-C is a normal stop.
        assert proc.wait(20) == (-signal.SIGTERM if sig == signal.SIGTERM else 0), log.read_text()
        assert time.monotonic() - sent < 5, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "stopped during start-up" in output and "Traceback" not in output, output


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--router", "--tokenizer", "--port", "--served-model-name", "--request-timeout"):
        assert flag in out


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.gateway", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("tandem ")
