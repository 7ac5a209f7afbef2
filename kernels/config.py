"""The one switch for every kernel wrapper, and how Triton runs the kernels.

`use_reference(True)` (or `TANDEM_KERNELS_REFERENCE=1` in the environment at import) routes every
wrapper in `kernels` to its pure-torch `*_ref` twin: the first thing to try when a model's output
looks wrong on the Triton path. Argument checks run either way, so a bad call fails the same.

Triton decides at `@triton.jit` time whether a kernel is compiled for the GPU or run by its
interpreter on CPU (`TRITON_INTERPRET=1`), so that variable must be set before any kernel module
is imported; `interpreting()` reports what was in force.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_TRUE = ("1", "true", "yes", "on", "y")

_use_reference: bool = os.environ.get("TANDEM_KERNELS_REFERENCE", "").strip().lower() in _TRUE


def use_reference(enabled: bool = True) -> None:
    """Route every kernel wrapper to its torch reference (True) or to Triton (False)."""
    global _use_reference
    _use_reference = enabled


def reference_enabled() -> bool:
    return _use_reference


@contextmanager
def reference_mode(enabled: bool = True) -> Iterator[None]:
    """`use_reference(enabled)` for the duration of a `with` block, then the previous setting."""
    previous = _use_reference
    use_reference(enabled)
    try:
        yield
    finally:
        use_reference(previous)


# Read once, when the kernel modules (which import this one first) are being decorated.
_interpreting: bool = os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return _interpreting
