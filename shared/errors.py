"""One taxonomy of the errors a request can meet, whatever the front-end (the offline `Engine`, a
worker, the router, the gateway).

    kind              class             gRPC                 HTTP (OpenAI error body)
    invalid_request   InvalidRequest    INVALID_ARGUMENT     400 invalid_request_error, `param`
    not_found         NotFound          NOT_FOUND            404
    capacity          CapacityError     RESOURCE_EXHAUSTED   429 + Retry-After
    unavailable       Unavailable       UNAVAILABLE          503 + Retry-After
    deadline          DeadlineExceeded  DEADLINE_EXCEEDED    504
    internal          InternalError     INTERNAL             500

Every error carries its `message`; a bad request also carries `param`, the request field at fault,
as data: it travels in the engine's messages (`to_wire`/`from_wire`), in gRPC trailing metadata
(services/common/errors.py) and in OpenAI's error body (services/gateway/server.py), and is never
parsed back out of the message. The two mappings to status codes live in those two files.

Anything raised that is not a `RequestError` (a bare `ValueError`, a `KeyError`, a torch error) is a
programming error: the services log it and answer INTERNAL / 500, never a 4xx.

The classes also derive from the builtin each one refines (`InvalidRequest` is a `ValueError`,
`NotFound` a `LookupError`, ...), so callers that catch the builtin keep working.
"""

from __future__ import annotations

from typing import ClassVar


class RequestError(Exception):
    """Base of the taxonomy: an error a request met, with the field at fault when there is one."""

    kind: ClassVar[str] = "internal"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_wire(self) -> tuple[str, str, str | None]:
        """(kind, message, param): what crosses a process boundary."""
        return self.kind, self.message, self.param

    @staticmethod
    def from_wire(kind: str, message: str, param: str | None = None) -> RequestError:
        """The error `to_wire` described (an unknown kind is an `InternalError`)."""
        return _BY_KIND.get(kind, InternalError)(message, param=param)


class InvalidRequest(RequestError, ValueError):
    """The request is wrong (a field out of range, an empty prompt, a grammar that cannot finish);
    `param` names the field, in the receiving API's own names."""

    kind = "invalid_request"


class NotFound(RequestError, LookupError):
    """The request names something not served here (a model, a worker)."""

    kind = "not_found"


class CapacityError(RequestError, RuntimeError):
    """The engine cannot take the request now (KV pages, request slots); retry, or go elsewhere."""

    kind = "capacity"


class Unavailable(RequestError, RuntimeError):
    """The engine or a peer is gone or stopped answering; another worker may serve the request."""

    kind = "unavailable"


class DeadlineExceeded(RequestError, TimeoutError):
    """The request ran out of its time."""

    kind = "deadline"


class InternalError(RequestError, RuntimeError):
    """A failure of ours that the client cannot fix (a failed forward step, a broken invariant)."""

    kind = "internal"


_BY_KIND: dict[str, type[RequestError]] = {
    cls.kind: cls
    for cls in (InvalidRequest, NotFound, CapacityError, Unavailable, DeadlineExceeded, InternalError)
}
