"""One exception taxonomy, mapped to gRPC status codes in one place (DESIGN.md §5).

Handlers raise; `grpc_errors` turns the exception into the call's status:

    ValueError           INVALID_ARGUMENT    bad request (the message says which field)
    LookupError          NOT_FOUND           unknown model / worker
    CapacityError        RESOURCE_EXHAUSTED  full right now; retry later or elsewhere
    ServiceError(code)   that code           anything a service decides explicitly
    TimeoutError         DEADLINE_EXCEEDED
    RuntimeError         UNAVAILABLE         the engine or a peer is gone
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from shared.errors import CapacityError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ServiceError(Exception):
    """An error with an explicit status code (e.g. a peer's status passed through)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or str(exc.code())
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc)
    if isinstance(exc, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, RuntimeError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    logger.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a unary or server-streaming async servicer method: exceptions -> status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                code, message = status_of(e)
                await context.abort(code, message)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            code, message = status_of(e)
            await context.abort(code, message)

    return unary


async def call(awaitable: Awaitable[T]) -> T:
    """Await a peer's RPC, re-raising its failure as a ServiceError with the same status."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as e:
        raise ServiceError(e.code(), e.details() or str(e.code())) from None
