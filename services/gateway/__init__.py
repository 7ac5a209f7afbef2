"""Tandem's OpenAI-compatible HTTP gateway: stateless, horizontally scalable.

Validates OpenAI requests, renders chat templates, tokenizes, and streams generations from the
router over gRPC. `create_app(GatewayConfig(...))` builds the FastAPI app; `python -m
services.gateway --help` runs it under uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.gateway.args import GatewayConfig

if TYPE_CHECKING:
    from services.gateway.server import create_app

__all__ = ["GatewayConfig", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: the server pulls in transformers, which `--help` and config-only users do not need.
    if name == "create_app":
        from services.gateway.server import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
