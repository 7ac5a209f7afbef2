"""Errors the engine raises for a request, beyond `ValueError` (bad input).

Services map each to one status (see services/common/errors.py): `ValueError` -> invalid
argument, `CapacityError` -> resource exhausted.
"""

from __future__ import annotations


class CapacityError(RuntimeError):
    """The engine cannot take the request now (KV pages or request slots); retry or go elsewhere."""
