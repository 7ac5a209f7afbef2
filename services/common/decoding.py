"""Servicers whose undecodable requests are INVALID_ARGUMENT, not UNKNOWN.

grpc.aio answers a request its deserializer cannot parse (garbage bytes, a string field with
invalid UTF-8) with UNKNOWN "Unexpected error", which reads as a server fault. `add_servicer`
registers a generated servicer with a deserializer that turns a parse failure into a marker,
and a wrapper that answers the marker with INVALID_ARGUMENT naming the message type:

    add_servicer(server, router_pb2_grpc.add_RouterServiceServicer_to_server, servicer)
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc


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
    if handler.request_streaming:
        return handler  # none of ours; a stream's messages are parsed one by one
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a parser raises on garbage
            return _Undecodable(f"the request could not be parsed: {exc}")

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
