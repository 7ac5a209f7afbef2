"""The error taxonomy (shared/errors.py) mapped to gRPC status codes, in one place.

Handlers raise; `grpc_errors` turns the exception into the call's status:

    InvalidRequest       INVALID_ARGUMENT    bad request; its field travels as trailing metadata
    NotFound             NOT_FOUND           unknown model / worker
    CapacityError        RESOURCE_EXHAUSTED  full right now; retry later or elsewhere
    Unavailable          UNAVAILABLE         the engine or a peer is gone
    DeadlineExceeded     DEADLINE_EXCEEDED   (and asyncio's TimeoutError)
    InternalError        INTERNAL
    ServiceError(code)   that code           a status decided explicitly, or a peer's passed on
    anything else        INTERNAL            a programming error: logged with its traceback

The field at fault of an INVALID_ARGUMENT travels as the trailing metadata entry
`tandem-error-param` (`param_of` reads it back), so no one parses it out of the message.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from shared.errors import (
    CapacityError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    NotFound,
    RequestError,
    Unavailable,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")
PARAM_METADATA_KEY = "tandem-error-param"
# On every status a Tandem servicer ends a call with: the peer answered (the failure may be one it
# passes on, e.g. a worker gone), as opposed to a call that never reached it or broke off.
ANSWERED_METADATA_KEY = "tandem-error-answered"
_CODES: dict[type[RequestError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}


class ServiceError(Exception):
    """An error with an explicit status code (e.g. a peer's status passed through, its field at
    fault included)."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    @classmethod
    def from_rpc(cls, e: grpc.aio.AioRpcError, message: str | None = None) -> ServiceError:
        """A peer's failed call, passed on with its code and field (and `message` if given)."""
        return cls(e.code(), message or e.details() or str(e.code()), param_of(e))


def param_of(e: grpc.aio.AioRpcError) -> str | None:
    """The field at fault a failed call named in its trailing metadata (None if none)."""
    for key, value in e.trailing_metadata() or ():
        if key == PARAM_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


def answered(e: grpc.aio.AioRpcError) -> bool:
    """Whether a Tandem service ended the call with this status (False: the transport failed,
    the service was not reached or went away)."""
    return any(key == ANSWERED_METADATA_KEY for key, _ in e.trailing_metadata() or ())


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str | None]:
    """(code, message, field at fault) of any exception a handler let out."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.param
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or str(exc.code()), param_of(exc)
    if isinstance(exc, RequestError):
        code = next(code for cls, code in _CODES.items() if isinstance(exc, cls))
        return code, exc.message, exc.param
    if isinstance(exc, TimeoutError):  # asyncio.wait_for and friends
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded", None
    logger.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}", None


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with `exc`'s status (and its field at fault as trailing metadata)."""
    code, message, param = status_of(exc)
    trailing = ((PARAM_METADATA_KEY, param),) if param else ()
    await context.abort(code, message, trailing_metadata=(*trailing, (ANSWERED_METADATA_KEY, "1")))


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
                await abort(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort(context, e)

    return unary


async def call(awaitable: Awaitable[T]) -> T:
    """Await a peer's RPC, re-raising its failure as a ServiceError with the same status."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as e:
        raise ServiceError.from_rpc(e) from None
