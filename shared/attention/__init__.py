"""Attention backends behind one interface, chosen by name (`torch` runs everywhere)."""

from __future__ import annotations

import shared.attention.triton_backend  # noqa: F401  (registers "triton" where Triton is installed)
from shared.attention.base import (
    AttentionBackend,
    available_backends,
    create_backend,
    register_backend,
    resolve_backend_name,
)
from shared.attention.layer import Attention

__all__ = [
    "Attention",
    "AttentionBackend",
    "available_backends",
    "create_backend",
    "register_backend",
    "resolve_backend_name",
]
