"""API keys on the gateway: `Authorization: Bearer <key>` on every /v1/* route, /tokenize and
/detokenize (they spend the gateway's CPU on the served model's tokenizer, like a generation's
first step).

A pure ASGI middleware, so a request without a valid key is answered (401, OpenAI's error body
with code `invalid_api_key`) before its body is read. /health, /metrics and /version stay open
(probes, scrapers, and nothing a key would protect). The keys and their constant-time check are
services/common/auth.py's.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.auth import Secrets
from services.gateway.protocol import OpenAIError

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = frozenset({"/v1", "/tokenize", "/detokenize"})


class ApiKeyMiddleware:
    """Answers 401 to a protected request (/v1/*, /tokenize, /detokenize) whose `Authorization`
    is not `Bearer <one of the keys>`."""

    def __init__(self, app: ASGIApp, keys: Secrets) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        if self.keys.check_bearer(header):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if header
            else "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
        error = OpenAIError(401, message, type="invalid_request_error", code="invalid_api_key")
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
