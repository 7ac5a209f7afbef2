"""A step whose forward was launched and whose results the host has not read yet (overlap
scheduling, see `EngineCore.step`).

The sampled tensors are copied into pinned host memory behind the sampling kernels and an event
is recorded after the copies, so `to_host` waits for exactly those copies and never for work
queued later (the next step's forward). A prefill engine's step that samples nothing (chunks of
long prompts) still gets an event, after its forward: once it has passed, the KV pages that
forward wrote may be sent (`kv_computed`). On CPU the tensors are simply kept.
"""

from __future__ import annotations

import torch

from shared.sampling.sampler import SampleOutput
from shared.scheduler.request import Req
from shared.scheduler.scheduler import ScheduledReq


class InflightStep:
    def __init__(
        self,
        items: list[ScheduledReq],
        slots: list[int],
        out: SampleOutput | None,
        rows: dict[Req, int],
        cuda: bool,
        kv_computed: dict[str, int] | None = None,
    ) -> None:
        self.items = items  # the items that sampled, in row order (none when `out` is None)
        self.slots = slots  # per item: the index of its placeholder in req.output_ids
        self.rows = rows  # request -> row of `next_ids`, for the next step's inputs
        # Request id -> its prompt tokens whose KV is complete once this step has run.
        self.kv_computed = kv_computed or {}
        self.next_ids = out.next_token_ids if out is not None else None  # [B] int64 on the device
        self._host = None
        if out is not None:
            next_ids = _to_host(out.next_token_ids, cuda)
            assert next_ids is not None
            self._host = SampleOutput(
                next_ids,
                _to_host(out.logprobs, cuda),
                _to_host(out.top_logprob_vals, cuda),
                _to_host(out.top_logprob_ids, cuda),
            )
        self._ready = torch.cuda.Event() if cuda else None
        if self._ready is not None:
            self._ready.record()

    def to_host(self) -> SampleOutput | None:
        """The sampled tensors on the host (None if the step sampled nothing), once their copies
        (or the step's forward) are done."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host


def _to_host(t: torch.Tensor | None, cuda: bool) -> torch.Tensor | None:
    if t is None or not cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
