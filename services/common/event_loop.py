"""The services' asyncio event loop: uvloop where it is installed, else asyncio's own.

Every token a worker streams crosses three event loops (worker -> router -> gateway, each a
gRPC hop) and each request's start crosses them the other way; under load a loop turn is
shared by a whole engine step's worth of tokens, so the loop's own cost sits on every
request's round trip (docs/benchmarks.md, "Where TTFT goes"). uvloop runs the same asyncio code
on libuv; grpc.aio and uvicorn support it. `TANDEM_EVENT_LOOP=asyncio` keeps asyncio's loop
(to compare, or to rule the loop out while debugging); `uvloop` requires it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
ENV = "TANDEM_EVENT_LOOP"
Kind = Literal["uvloop", "asyncio"]


def loop_kind(environ: dict[str, str] | None = None) -> Kind:
    """The loop this process runs: `TANDEM_EVENT_LOOP` (uvloop | asyncio | auto, the default:
    uvloop when installed). A bad value or a required uvloop that is missing is a ValueError."""
    value = (os.environ if environ is None else environ).get(ENV, "auto").strip().lower() or "auto"
    installed = importlib.util.find_spec("uvloop") is not None
    if value == "auto":
        return "uvloop" if installed else "asyncio"
    if value not in ("uvloop", "asyncio"):
        raise ValueError(f"{ENV}={value!r}: expected uvloop, asyncio or auto")
    if value == "uvloop" and not installed:
        raise ValueError(f"{ENV}=uvloop but uvloop is not installed (pip install uvloop)")
    return "uvloop" if value == "uvloop" else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the services' loop; a bad `TANDEM_EVENT_LOOP` exits with its error."""
    try:
        kind = loop_kind()
    except ValueError as e:
        main.close()  # never awaited: no warning about it
        raise SystemExit(f"error: {e}") from None
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
