"""The one mapping of every failure to the OpenAI error the client sees.

OpenAIError                    as raised (validation and request checks)
router gRPC status             _GRPC_TO_HTTP (INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, ...);
                               the engine's field at fault becomes the OpenAI param
pydantic validation errors     400 naming the first offending parameter (`validation_error`)
anything else                  500 with a log line (a programming error)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from starlette.exceptions import HTTPException

from services.common.errors import answered, status_of
from services.gateway.protocol import OpenAIError
from shared.errors import RequestError

logger = logging.getLogger("tandem.gateway")

# gRPC status -> (HTTP status, OpenAI error type, code). Anything else is a 500 server_error.
_GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, Any, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    # The deployment cannot serve this kind of request (embeddings on prefill/decode pairs only).
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
}
# An INVALID_ARGUMENT names the engine's field at fault; the client knows the OpenAI field.
_ENGINE_TO_OPENAI_PARAM = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "json_schema": "response_format",
    "structural_tag": "tools",
}


def to_openai_error(exc: BaseException) -> OpenAIError:
    """The one mapping of every failure to the OpenAI error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError | RequestError):
        grpc_code, message, param = status_of(exc)  # the field at fault travels as data
        status, type_, code = _GRPC_TO_HTTP.get(grpc_code, (500, "server_error", None))
        param = _ENGINE_TO_OPENAI_PARAM.get(param, param) if status == 400 and param else None
        if status == 503 and isinstance(exc, grpc.aio.AioRpcError) and not answered(exc):
            message = f"the router is unavailable: {message}"
        return OpenAIError(status, message, type=type_, param=param, code=code)
    if isinstance(exc, HTTPException):
        return OpenAIError(exc.status_code, str(exc.detail), type="invalid_request_error")
    logger.exception("unexpected error", exc_info=exc)
    return OpenAIError(500, "internal error in the gateway", type="server_error")


def validation_error(errors: Sequence[Any], at: str = "") -> OpenAIError:
    """A validation failure (FastAPI's 422, pydantic's errors) as OpenAI's 400 naming the first
    offending parameter; `at` is where the validated value sits in the request (`input[2]`)."""
    error = errors[0]
    # Without pydantic's union-branch tags ('str', 'list[ContentPart]'): they are not fields.
    loc = [p for p in error.get("loc", ()) if p != "body" and not _is_branch_tag(p)]
    param = (at + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)).lstrip(".") or None
    param = (error.get("ctx") or {}).get("param") or param  # a validator that names it itself
    message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    kind = error.get("type")
    if kind == "json_invalid":
        return OpenAIError(400, f"The request body is not valid JSON: {message}")
    if kind == "missing":
        what = f"parameter '{param}'" if param else "request body"
        return OpenAIError(400, f"Missing required {what}", param=param)
    if param is None:  # the body itself: a JSON array, null, a form
        return OpenAIError(400, f"The request body must be a JSON object: {message}")
    return OpenAIError(400, f"Invalid value for '{param}': {message}", param=param)


_BUILTIN_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict"})


def _is_branch_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union branch rather than a field."""
    return isinstance(part, str) and (part in _BUILTIN_TAGS or "[" in part)
