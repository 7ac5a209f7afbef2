"""Request-size limits: each answered with a 4xx in OpenAI's format, never a reset or a 5xx.

The gateway here runs as `python -m services.gateway` does (`uvicorn_config`), with small limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from services.gateway import GatewayConfig
from services.gateway.args import RequestLimits, parse_args
from services.gateway.http import LINGER_S, uvicorn_config
from shared.sampling import params as engine_params
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_limits")

LIMITS = RequestLimits(
    max_body_bytes=64 * 1024,
    max_header_bytes=8 * 1024,
    body_read_timeout=1.0,
    header_read_timeout=1.0,
    stream_write_timeout=1.0,
    max_prompt_chars=2000,
    max_samples=8,
    max_stop=4,
    max_stop_chars=10,
    max_tools=2,
    max_tools_chars=400,
    max_constraint_chars=100,
)
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "The cat runs."}], "max_tokens": 2}
COMPLETION = {"model": MODEL_ID, "prompt": "The cat runs.", "max_tokens": 2}


def _tool(name: str, description: str = "") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description}}


@pytest.fixture(scope="module")
def limited(stub: StubRouter, tokenizer_dir: Any) -> Iterator[GatewayThread]:
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), port=0, limits=LIMITS)
    server = GatewayThread(config)
    server.server = uvicorn.Server(uvicorn_config(server.server.config.app, config))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def http(limited: GatewayThread, stub: StubRouter) -> Iterator[httpx.Client]:
    stub.reset()
    with httpx.Client(base_url=limited.url, timeout=10) as c:
        yield c


def _error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    assert error["param"] == param
    return str(error["message"])


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/completions", {"prompt": "x" * 2001}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "x" * 2001]}, "prompt[1]"),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "prompt"),
        ("/v1/completions", {"n": 9}, "n"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"stop": "x" * 11}, "stop"),
        ("/v1/completions", {"regex": "a" * 101}, "regex"),
        ("/v1/completions", {"ebnf": "root ::= " + '"a" ' * 30}, "ebnf"),
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"d": "x" * 99}},
                }
            },
            "response_format",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 2001}]}, "messages"),
        ("/v1/chat/completions", {"tools": [_tool("a"), _tool("b"), _tool("c")]}, "tools"),
        ("/v1/chat/completions", {"tools": [_tool("a", "x" * 400)]}, "tools"),
    ],
)
def test_field_limits_are_400s_naming_the_field(
    http: httpx.Client, path: str, change: dict[str, Any], param: str
) -> None:
    base = CHAT if "chat" in path else COMPLETION
    _error(http.post(path, json={**base, **change}), 400, param)
    assert http.post(path, json=base).status_code == 200


def test_a_long_prompt_is_refused_before_tokenizing(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch, limited: GatewayThread
) -> None:
    handler = limited.server.config.app.state.gateway.handler  # type: ignore[union-attr]
    calls = []
    monkeypatch.setattr(handler.tokenizer, "encode", lambda *a, **k: calls.append(a))
    _error(http.post("/v1/completions", json={**COMPLETION, "prompt": "y" * 5000}), 400, "prompt")
    assert calls == []


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {**COMPLETION, "user": "u" * (65 * 1024)}
    assert "limit" in _error(http.post("/v1/completions", json=big), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "' + MODEL_ID.encode() + b'", "user": "'
        for _ in range(70):
            yield b"u" * 1024
        yield b'"}'

    response = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _error(response, 413)
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_huge_header_is_431(http: httpx.Client, limited: GatewayThread) -> None:
    for size in (16 * 1024, 1024 * 1024):
        response = http.post("/v1/completions", json=COMPLETION, headers={"x-big": "h" * size})
        assert "header" in _error(response, 431)
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_a_trickling_body_gets_408_and_the_connection_closes(limited: GatewayThread) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        start = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            received += chunk
        took = time.monotonic() - start
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"did not arrive within 1 s" in received
    assert took < 5


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"],
    ids=["nothing", "half-a-header-block"],
)
def test_a_connection_without_its_headers_gets_408_and_closes(limited: GatewayThread, sent: bytes) -> None:
    # uvicorn kept such connections open for good: enough of them used up the file descriptors.
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        received = b""
        while chunk := sock.recv(65536):  # ends when the server closes the connection
            received += chunk
        took = time.monotonic() - start
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
    assert json.loads(body)["error"]["message"] == "the request's headers did not arrive within 1 s"
    assert 0.8 < took < 5


def test_a_slow_request_within_the_header_timeout_is_served(limited: GatewayThread) -> None:
    # The timer stops at the first request's headers: a request taking longer in all (its body
    # included, within the body's own timeout) is not cut.
    request = json.dumps(COMPLETION).encode()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        time.sleep(0.5)
        sock.sendall(b"Content-Length: %d\r\n\r\n" % len(request) + request[:5])
        time.sleep(0.8)  # past the header timeout's 1 s since the connection opened
        sock.sendall(request[5:])
        received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received


def _stream_request(max_tokens: int) -> bytes:
    body = json.dumps({**COMPLETION, "stream": True, "max_tokens": max_tokens}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _small_window_socket(port: int, window: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)  # before connecting
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_a_client_that_reads_nothing_of_its_stream_is_cut(limited: GatewayThread, stub: StubRouter) -> None:
    # ~8 MB of events, far more than the socket buffers hold: uvicorn waited on such a client
    # for good, holding its generation and the connection.
    stub.reset()
    stub.script(["x" * 200_000] * 40, finish="length")
    with _small_window_socket(limited.port) as sock:
        sock.sendall(_stream_request(200))
        start = time.monotonic()
        assert stub.wait_cancelled(timeout=10), "the generation was not cancelled"
        took = time.monotonic() - start
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # what the kernel had buffered, then the cut
                received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert len(received) < 4 * 1024 * 1024 and b"[DONE]" not in received
    assert 1.0 <= took < 6


def test_the_write_timer_restarts_whenever_the_client_takes_some(limited: GatewayThread) -> None:
    # The gateway's protocol on a real connection, its transport's flow control driven by hand
    # (on loopback the kernel's buffers take megabytes before a reading client lets writing
    # pause, and the test above covers a real pause): three pauses of 0.7 s, each ended by the
    # client taking some, are over twice the timeout in all and cut nothing; one whole timeout
    # without a resume cuts.
    config = limited.server.config

    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        with theirs:

            def make() -> Any:
                return config.http_protocol_class(config=config, server_state=ServerState(), app_state={})

            transport, protocol = await loop.connect_accepted_socket(make, ours)
            for _ in range(3):
                protocol.pause_writing()
                await asyncio.sleep(0.7)
                protocol.resume_writing()
            kept = not transport.is_closing()
            protocol.pause_writing()
            await asyncio.sleep(1.3)
            return kept, transport.is_closing()

    kept, cut = asyncio.run(main())
    assert kept and cut


def test_shutdown_closes_idle_keep_alive_connections_at_once(stub: StubRouter, tokenizer_dir: Any) -> None:
    # A client's pool keeps its connection open and idle: the server must not linger on it.
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), port=0, limits=LIMITS)
    server = GatewayThread(config)
    server.server = uvicorn.Server(uvicorn_config(server.server.config.app, config))
    server.start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/v1/completions", json=COMPLETION).status_code == 200
        start = time.monotonic()
        server.stop()
        took = time.monotonic() - start
    assert not server._thread.is_alive()
    assert took < LINGER_S / 2, f"shutdown took {took:.1f} s: it lingered on an idle connection"


def test_limit_flags_and_engine_defaults() -> None:
    config = parse_args(["--router", "r:1", "--tokenizer", "t", "--max-body-bytes", "10", "--max-stop", "3"])
    assert config.limits.max_body_bytes == 10 and config.limits.max_stop == 3
    default = parse_args(["--router", "r:1", "--tokenizer", "t"]).limits
    assert default == RequestLimits()
    assert {f.name for f in fields(RequestLimits)} >= {"max_prompt_chars", "body_read_timeout"}
    # The defaults the gateway shares with the engine are the engine's.
    assert default.max_stop == engine_params.MAX_STOP_STRINGS
    assert default.max_stop_chars == engine_params.MAX_STOP_STRING_LEN
    assert default.max_constraint_chars == engine_params.MAX_CONSTRAINT_CHARS
    assert default.prompt_chars(None) == 4 * 1024 * 1024
    assert default.prompt_chars(256) == 64 * 1024
    assert default.prompt_chars(131072) == 16 * 131072


@pytest.mark.parametrize("flag", ["--body-read-timeout", "--header-read-timeout", "--stream-write-timeout"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_timeout_must_be_positive(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--router", "r:1", "--tokenizer", "t", flag, value])
    assert f"argument {flag}: must be a positive number, got {value}" in capsys.readouterr().err


def test_closing_after_the_client_reset_neither_raises_nor_lingers() -> None:
    # The client resets the connection just as its response completes: shutting down the write
    # side fails (ENOTCONN). That must not escape into the app (a traceback per such client);
    # the connection is simply closed, there being nothing left to drain.
    import asyncio
    import struct

    from services.gateway.http import _LingeringTransport

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock=accepted)
        transport.pause_reading()  # the reset is not seen before close, as in the race
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        await asyncio.sleep(0.1)
        lingering = _LingeringTransport(transport, loop)
        lingering.close()
        assert transport.is_closing() and lingering.is_closing()
        server.close()

    asyncio.run(main())
