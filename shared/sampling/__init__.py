"""Sampling: per-request parameters, penalties and the batched on-device sampler.

`SamplingParams` is what a request asks for; `SamplingBatch.build` turns B requests' params and
histories into tensors each step; `Sampler.sample` picks the next tokens from the logits.
"""

from __future__ import annotations

from shared.sampling.params import SamplingParams
from shared.sampling.sampler import SampleOutput, Sampler, SamplingBatch

__all__ = ["SampleOutput", "Sampler", "SamplingBatch", "SamplingParams"]
