"""Continuous batching: which requests run this step, and how many tokens each computes.

One step's batch, built in this order under a per-step token budget:

1. decode: every running request with exactly one token left to compute. If the KV pool cannot
   hold their next tokens even after evicting the cache, the most recently admitted running
   request is retracted (its KV goes to the cache, it requeues and later recomputes what was lost).
2. chunked prefill in progress: running requests with more than one token left.
3. admission: waiting requests in policy order, while the budget, the request limit and memory last.
   Memory for the running requests' next decode step is kept in reserve so admission does not
   cause an immediate retraction.

With chunked prefill on, a prompt is cut to the remaining budget; off, a prompt must fit whole
(except the first prefill of a step, which always may run so that long prompts cannot starve).

Parked requests hold KV but compute nothing: a decode worker's reservations waiting for their
prompt's KV, and a prefill worker's finished prompts whose KV is still being sent. They count
against `max_running_requests` and are never retracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.config import EngineConfig
from shared.scheduler.kv_manager import KVCacheManager
from shared.scheduler.policy import order_waiting
from shared.scheduler.request import FinishKind, FinishReason, Req


@dataclass
class ScheduledReq:
    req: Req
    start: int  # tokens with K/V before this step
    extend_len: int  # tokens computed this step: all_ids[start : start + extend_len]
    slots: torch.Tensor  # [extend_len] where their K/V goes

    @property
    def sample(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so a new token is sampled."""
        return self.start + self.extend_len == self.req.seq_len


@dataclass
class ScheduleBatch:
    """The scheduler's CPU-side batch for one step (the model runner makes the device batch)."""

    items: list[ScheduledReq]
    # Some item is an embedding request (shared/pooling.py): the step pools hidden states for
    # it instead of sampling. Set only by admission and chunked prefill, never by decode.
    embeds: bool = False

    @property
    def is_decode(self) -> bool:
        return all(it.extend_len == 1 and it.start > 0 for it in self.items)

    @property
    def num_tokens(self) -> int:
        return sum(it.extend_len for it in self.items)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.parked: list[Req] = []
        self.num_retractions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    @property
    def num_active(self) -> int:
        """Requests holding a req_to_token row (the `max_running_requests` limit)."""
        return len(self.running) + len(self.parked)

    def park(self, req: Req) -> None:
        """Stop computing for a request that holds KV (it must be running, freshly admitted or
        parked already)."""
        if req in self.running:
            self.running.remove(req)
        if req not in self.parked:
            self.parked.append(req)

    def unpark(self, req: Req) -> None:
        self.parked.remove(req)
        self.running.append(req)

    def remove(self, req: Req, cache_kv: bool = True) -> None:
        """Take a request out of the scheduler and return all it holds (finish or abort).
        `cache_kv=False` when its K/V cannot be trusted (a step failed half-way)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running or req in self.parked:
            (self.running if req in self.running else self.parked).remove(req)
            self.kv.release(req, cache_kv)

    def schedule(self) -> ScheduleBatch | None:
        budget = (
            self.config.chunked_prefill_size
            if self.config.chunked_prefill
            else self.config.max_prefill_tokens
        )
        items = self._schedule_decodes()
        budget -= len(items)
        reserve = len(items)
        items += self._schedule_chunks(budget, reserve)
        budget -= sum(it.extend_len for it in items[reserve:])
        items += self._admit(budget, reserve, any_prefill=len(items) > reserve)
        if not items:
            return None
        return ScheduleBatch(items, embeds=any(it.req.pooling is not None for it in items[reserve:]))

    def _schedule_decodes(self) -> list[ScheduledReq]:
        decodes = sorted((r for r in self.running if r.remaining == 1), key=lambda r: r.arrival)
        while decodes and not self.kv.ensure_free_pages(sum(self.kv.pages_to_grow(r, 1) for r in decodes)):
            victim = max(self.running, key=lambda r: r.arrival)
            self._retract(victim)
            if victim in decodes:
                decodes.remove(victim)
        slots = torch.tensor([self.kv.extend_one(req) for req in decodes], dtype=torch.int64)
        return [ScheduledReq(req, req.kv_len - 1, 1, slots[i : i + 1]) for i, req in enumerate(decodes)]

    def _schedule_chunks(self, budget: int, reserve: int) -> list[ScheduledReq]:
        items = []
        for req in sorted((r for r in self.running if r.remaining > 1), key=lambda r: r.arrival):
            if budget <= 0:
                break
            n = min(req.remaining, budget)
            start = req.kv_len
            slots = self.kv.extend(req, n, reserve)
            if slots is None:
                break
            items.append(ScheduledReq(req, start, n, slots))
            budget -= n
        return items

    def _admit(self, budget: int, reserve: int, any_prefill: bool) -> list[ScheduledReq]:
        items: list[ScheduledReq] = []
        for req in order_waiting(self.waiting, self.config.schedule_policy, self.kv):
            if budget <= 0 or self.num_active >= self.config.max_running_requests:
                break
            if req.leader is not None and not req.leader.prefill_done:
                continue  # n > 1: reuse the leader's prompt KV instead of computing it again
            if req.pending:
                continue  # retracted with a token still on the device: readmit once it is read
            # Mean pooling reads every prompt token's hidden state: no cached prefix for it.
            mean_pooled = req.pooling is not None and req.pooling.pooling == "mean"
            match = None if mean_pooled else self.kv.match(req)
            n = req.seq_len - (len(match.slots) if match is not None else 0)
            if self.config.chunked_prefill:
                n = min(n, budget)
            elif n > budget and (any_prefill or items):
                break
            slots = self.kv.admit(req, match, n, reserve)
            if slots is None:
                break
            self.waiting.remove(req)
            self.running.append(req)
            items.append(ScheduledReq(req, req.kv_len - n, n, slots))
            budget -= n
        return items

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self.kv.release(req)
        req.num_retractions += 1
        self.num_retractions += 1
        self.waiting.append(req)

    def abort_all(self, message: str) -> list[Req]:
        reqs = self.waiting + self.running + self.parked
        for req in reqs:
            self.remove(req, cache_kv=False)
            req.finish_reason = FinishReason(FinishKind.ABORT, message=message)
        return reqs
