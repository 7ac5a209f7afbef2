"""Sampling: per-request parameters, penalties and the batched on-device sampler.

`SamplingParams` is what a request asks for; `SamplingBatch.build` turns B requests' params and
histories into tensors each step; `Sampler.sample` picks the next tokens from the logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.lazy import lazy_attributes
from shared.sampling.params import SamplingParams

if TYPE_CHECKING:
    from shared.sampling.sampler import SampleOutput, Sampler, SamplingBatch

__all__ = ["SampleOutput", "Sampler", "SamplingBatch", "SamplingParams"]

# The router checks a request's parameters (params.py) without importing torch.
__getattr__ = lazy_attributes(
    __name__, dict.fromkeys(["SampleOutput", "Sampler", "SamplingBatch"], "sampler")
)
