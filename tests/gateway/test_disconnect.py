"""A client that goes away cancels the router call: streaming, non-streaming, and before the first token."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_disconnect")

CANCEL_WITHIN_S = 2.0


def _chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": 100, **extra}


def _post_then_hang_up(gateway: GatewayThread, stub: StubRouter, body: dict[str, object]) -> None:
    """POST over a raw socket and close it once the router has the call: a client going away."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(head + payload)
        deadline = time.monotonic() + 5
        while not stub.service.requests:
            assert time.monotonic() < deadline, "the request never reached the router"
            time.sleep(0.01)


def _still_serves(gateway: GatewayThread) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("The cat", max_tokens=2))
    assert response.status_code == 200


def test_stream_disconnect_cancels_router_call(gateway: GatewayThread, stub: StubRouter) -> None:
    stub.reset()
    body = _chat("SLOW the cat runs the page and a dog sees the blue sky", stream=True)
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(3)]  # a few events, then hang up mid-stream
        assert all(line.startswith("data: ") or not line for line in received)
    assert stub.wait_cancelled(CANCEL_WITHIN_S)
    _still_serves(gateway)


def test_non_stream_disconnect_cancels_router_call(gateway: GatewayThread, stub: StubRouter) -> None:
    stub.reset()
    _post_then_hang_up(gateway, stub, _chat("SLOW the cat runs the page and a dog sees the blue sky"))
    assert stub.wait_cancelled(CANCEL_WITHIN_S)
    _still_serves(gateway)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_first_token_cancels(
    gateway: GatewayThread, stub: StubRouter, stream: bool
) -> None:
    stub.reset()
    _post_then_hang_up(gateway, stub, _chat("STALL", stream=stream))
    assert stub.wait_cancelled(CANCEL_WITHIN_S)
    _still_serves(gateway)
