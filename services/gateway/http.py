"""The gateway's HTTP/1.1 server: uvicorn's h11 protocol with limits that answer instead of resetting.

uvicorn answers every h11 protocol error with a bare 400 and closes the socket at once. Two
things go wrong with that for a client still sending (a 1 MiB header, a body past the limit):
the status should be h11's hint (431 for a header block over the limit), and closing a socket
with unread input makes the kernel send a reset, which destroys the response before the client
reads it. Here errors are answered in OpenAI's format with h11's status, and a connection the
server closes first closes "lingering": our side is shut down after the response, and whatever
the client still sends is read and dropped until it closes too (or `LINGER_S` passes).

Shutting the server down closes idle keep-alive connections at once instead: no request of
theirs is unread, and a client's pool keeps an idle connection open, so lingering would only
hold the shutdown for `LINGER_S`.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.event_loop import loop_kind
from services.gateway.args import GatewayConfig
from services.gateway.protocol import OpenAIError

LINGER_S = 5.0

logger = logging.getLogger("tandem.gateway")


class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (for its status hint)."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise


class _LingeringTransport:
    """A transport whose `close` shuts down writing and drains the peer before really closing."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop
        self.lingering = False

    def close(self) -> None:
        if self.lingering or self._inner.is_closing():
            return
        self.lingering = True
        if not self._inner.can_write_eof():
            self._inner.close()
            return
        try:
            self._inner.write_eof()  # after the buffered response: the client sees the end
        except OSError:  # the client reset the connection meanwhile: nothing left to drain
            self._inner.close()
            return
        self._inner.resume_reading()  # read what it still sends, to drop it
        self._loop.call_later(LINGER_S, self._inner.close)

    def close_now(self) -> None:
        """Close without lingering (nothing of the client's is unread)."""
        self.lingering = True
        self._inner.close()

    def is_closing(self) -> bool:
        return self.lingering or self._inner.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatewayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol: protocol errors answered with h11's status, lingering closes, a
    connection that has not sent its first request's headers within `header_read_timeout`
    answered 408 and closed (uvicorn keeps one that sends nothing, or half a header block, open
    for good: enough of them use up the gateway's file descriptors), and one the gateway could
    write nothing to for `stream_write_timeout` while a response waits cut (uvicorn waits on it
    for good, holding the response's generations and the socket)."""

    header_read_timeout = 30.0  # `uvicorn_config` sets the gateway's in a subclass
    stream_write_timeout = 60.0  # likewise

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.config.h11_max_incomplete_event_size or 16 * 1024)
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        # The transport's buffer is over its high-water mark: the kernel's are full too.
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.stream_write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning(
            "%s took none of its response for %g s (--stream-write-timeout): connection cut",
            client,
            self.stream_write_timeout,
        )
        # Nothing more can reach it: drop the buffer. connection_lost follows, which tells the
        # response it is disconnected, and so cancels its generations.
        self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self.loop))  # type: ignore[arg-type]
        self._header_timer = self.loop.call_later(self.header_read_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stop_write_timer()
        super().connection_lost(exc)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is not None or self.transport.is_closing():
            return  # a request came (or the connection is going): the body has its own timeout
        timeout = self.header_read_timeout
        self._answer_and_close(408, f"the request's headers did not arrive within {timeout:g} s", raw=True)

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and isinstance(self.transport, _LingeringTransport):
            self.transport.close_now()  # so uvicorn's close below does not start a linger
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # lingering: the answer is out, the rest of the request is dropped
        super().data_received(data)
        if self.cycle is not None:
            self._stop_header_timer()

    def send_400_response(self, msg: str) -> None:
        error = self.conn.error if isinstance(self.conn, _Connection) else None
        status = error.error_status_hint if error is not None else 400
        if status == 431:
            limit = self.config.h11_max_incomplete_event_size
            message = f"the request's header block is larger than the limit of {limit} bytes"
        else:
            message = f"invalid HTTP request: {error or msg}"
        self._answer_and_close(status, message)

    def _answer_and_close(self, status: int, message: str, raw: bool = False) -> None:
        """An OpenAI error body, then a lingering close. `raw`: written as bytes, not through
        h11, which sends no response before a request's headers (unless they were bad)."""
        body = json.dumps(OpenAIError(status, message).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        if raw:
            head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()
            head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(head + b"\r\n" + body)
        else:
            for event in (
                h11.Response(status_code=status, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that other processes may bind too (SO_REUSEPORT): the
    kernel hands each new connection to one of them. Every process of one port binds its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, config: GatewayConfig) -> uvicorn.Config:
    """The uvicorn settings the gateway serves `app` with (its limits included)."""
    timeouts = {
        "header_read_timeout": config.limits.header_read_timeout,
        "stream_write_timeout": config.limits.stream_write_timeout,
    }
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        http=type("GatewayH11Protocol", (GatewayH11Protocol,), timeouts),
        loop=loop_kind(),  # uvloop where installed (services/common/event_loop.py)
        h11_max_incomplete_event_size=config.limits.max_header_bytes,
    )
