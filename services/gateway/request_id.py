"""`X-Request-Id`: taken from the request or made, and echoed on every response.

An ASGI middleware outside everything else, so a 401, 413 or CORS preflight carries it too. The
id lands in `scope["state"]["request_id"]` (Starlette's `request.state.request_id`), where the
routes use it: the response's `id` is `chatcmpl-<id>` / `cmpl-<id>` (as vLLM does), it travels to
the router as `x-request-id` gRPC metadata, and the request's spans carry it as
`tandem.x_request_id`. A client's id must be 1 to 128 visible ASCII characters; any other value
is replaced by a fresh one (never an error: the header is advisory).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
SPAN_ATTRIBUTE = "tandem.x_request_id"
_VALID = re.compile(rb"[!-~]{1,128}")


def request_id_of(scope: Scope) -> str | None:
    """The request's id, once `RequestIdMiddleware` has run (None outside it)."""
    state = scope.get("state") or {}
    value = state.get("request_id")
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's `X-Request-Id` when valid) and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k.lower() == HEADER), None)
        valid = given is not None and _VALID.fullmatch(given) is not None
        request_id = given.decode("ascii") if given is not None and valid else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        echoed = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, echoed)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
