"""Tandem's engine core: paged KV, radix prefix cache, continuous batching, models, sampling.

`from shared import Engine` gives the offline engine; the services build on `EngineCore`.
This package never imports gRPC or generated protos (tests/test_layering.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.engine import Engine
    from shared.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import shared.mem` (say) does not pull in transformers.
    if name == "Engine":
        from shared.engine import Engine

        return Engine
    if name == "SamplingParams":
        from shared.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
