"""Servicers whose undecodable requests are INVALID_ARGUMENT, not UNKNOWN.

grpc.aio answers a request its deserializer cannot parse (garbage bytes, a string field with
invalid UTF-8) with UNKNOWN "Unexpected error", which reads as a server fault. `add_servicer`
registers a generated servicer with a deserializer that turns a parse failure into a marker,
and a wrapper that answers the marker with INVALID_ARGUMENT naming the message type (in a
request stream, the servicer reads the marker as an `InvalidRequest` raised where it comes,
which its `grpc_errors` turns into that status):

    add_servicer(server, router_pb2_grpc.add_RouterServiceServicer_to_server, servicer)
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from shared.errors import InvalidRequest


class _Undecodable:
    def __init__(self, message: str) -> None:
        self.message = message


def add_servicer(server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
    """`add_to_server(servicer, server)` (a generated `add_*Servicer_to_server`), decoding leniently."""
    capture = _Capture()
    add_to_server(servicer, capture)
    assert capture.service is not None, "not a generated add_*_to_server function"
    handlers = {name: _lenient(h) for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class _Capture:
    """Stands in for the server while a generated function registers its method handlers."""

    def __init__(self) -> None:
        self.service: str | None = None
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come again through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, handlers


def _lenient(handler: Any) -> Any:
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a parser raises on garbage
            return _Undecodable(f"the request could not be parsed: {exc}")

    if handler.request_streaming:
        if not handler.response_streaming:
            return handler  # none of ours
        bidi = handler.stream_stream

        async def stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            # A stream's messages are parsed one by one as the servicer reads them: an
            # undecodable one ends the call when it comes, after what came before it.
            async def decoded() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, _Undecodable):
                        raise InvalidRequest(request.message)
                    yield request

            async for item in bidi(decoded(), context):
                yield item

        return handler._replace(request_deserializer=deserialize, stream_stream=stream_stream)

    if handler.response_streaming:
        stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            items = stream(request, context)
            if hasattr(items, "__aiter__"):
                async for item in items:
                    yield item
            else:  # a servicer's sync default (UNIMPLEMENTED) or a sync generator
                for item in items:
                    yield item

        return handler._replace(request_deserializer=deserialize, unary_stream=unary_stream)

    unary = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        result = unary(request, context)
        return await result if inspect.isawaitable(result) else result

    return handler._replace(request_deserializer=deserialize, unary_unary=unary_unary)
