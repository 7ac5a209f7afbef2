"""What a generation request asks the engine for, as it travels from a service to the engine
process (light: no torch, so I/O processes import it; a msgspec struct, so it crosses the
process boundary as it is).

    Prompt(input_ids, params, return_logprob, top_logprobs_num)

`params` are `SamplingParams`' fields by name (shared/sampling/params.py); the engine builds and
checks them (`SamplingParams.from_dict`), so a bad value is refused where every other check of a
request is made, as an `InvalidRequest` naming the field. The engine core's own entry points
(`EngineCore.add_request`, `expect_kv`) take the typed `SamplingParams` instead.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Prompt(msgspec.Struct, frozen=True):
    """One prompt's token ids and how to continue it (see the module doc)."""

    input_ids: list[int]
    params: dict[str, Any]
    return_logprob: bool = False
    top_logprobs_num: int = 0  # the most likely tokens reported beside each sampled one
