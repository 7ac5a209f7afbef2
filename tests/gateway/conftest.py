"""Gateway test fixtures: a stub router and the gateway served by uvicorn in a background thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from services.gateway import GatewayConfig, create_app
from tests.gateway.stub_router import StubRouter


class GatewayThread:
    """The gateway app under uvicorn on 127.0.0.1 (a free port), in a daemon thread."""

    def __init__(self, config: GatewayConfig) -> None:
        self.app = app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.port = 0

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when startup fails; `start` reports it
            self.server.run()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> GatewayThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    router = StubRouter(tokenizer_dir).start()
    yield router
    router.stop()


@pytest.fixture(scope="module")
def gateway(stub: StubRouter, tokenizer_dir: Path) -> Iterator[GatewayThread]:
    # No served-model-name: the gateway learns it (and the context length) from ListModels.
    server = GatewayThread(GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir))).start()
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayThread, stub: StubRouter) -> openai.OpenAI:
    stub.reset()
    # No retries: 429/503 must surface at once.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10)


@pytest.fixture
def http(gateway: GatewayThread, stub: StubRouter) -> Iterator[httpx.Client]:
    stub.reset()
    with httpx.Client(base_url=gateway.url, timeout=10) as c:
        yield c
