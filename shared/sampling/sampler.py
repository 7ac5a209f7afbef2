"""Batched next-token sampling on the logits' device, without host syncs.

One step for B requests:

    raw logits ─┬─> log_softmax ─> logprobs / top logprobs         (reported, unpenalized)
                └─> penalties ─> min_new_tokens mask ─> grammar mask ─┬─> argmax  (greedy rows)
                                                                      └─> / T ─> softmax ─> top-k
                                              ─> top-p ─> min-p ─> argmax(p / E)  (others)

The draw is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. picks i with
probability p_i / sum(p). It needs no renormalisation and no cumulative sums, and a token
whose probability was zeroed can never win, so masks are exact. For a seeded row, E comes
from a counter-based hash of (seed, step, token id) instead of a generator, so the row's
tokens depend only on its own logits, seed and step: not on which other requests share the
batch or where the row sits in it.

All decisions that would need a host sync (is any row seeded? does any row use top-p?) are
made on the host in `SamplingBatch.build`, from the params, and stored as plain bools.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.batch import to_device
from shared.constrained.matcher import apply_token_bitmask
from shared.models.layers.fused import use_kernels
from shared.sampling.params import SamplingParams
from shared.sampling.penalties import (
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    suppress_tokens,
)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step tensors for B requests, built by the scheduler from params and token history.

    Tensors live on the logits' device; the bools are host-side facts about the batch that let
    `Sampler.sample` skip whole stages without reading tensors back. Sparse (row, token)
    penalty pairs are described in `shared.sampling.penalties`. Build a fresh one per step
    (`steps` and the penalty pairs change with every token).
    """

    temperatures: Tensor  # [B] float32; greedy rows hold 1.0 so no row divides by zero
    top_ks: Tensor  # [B] int64; vocab_size where disabled
    top_ps: Tensor  # [B] float32; 1.0 where disabled
    min_ps: Tensor  # [B] float32; 0.0 where disabled
    greedy: Tensor  # [B] bool
    seeds: Tensor  # [B] int64; -1 where unseeded
    steps: Tensor  # [B] int64; tokens generated so far by each request
    seeded_rows: Tensor | None  # [S] int64; non-greedy rows with a seed, None if S == 0
    # Repetition penalty over prompt + output tokens.
    repetition_penalties: Tensor | None  # [B] float32; None if no row uses it
    repetition_rows: Tensor | None  # [Nr] int64
    repetition_ids: Tensor | None  # [Nr] int64
    # Frequency / presence penalties over output tokens.
    frequency_penalties: Tensor | None  # [B] float32; None if no row uses either
    presence_penalties: Tensor | None  # [B] float32
    output_rows: Tensor | None  # [No] int64
    output_ids: Tensor | None  # [No] int64
    output_counts: Tensor | None  # [No] int64
    # Stop ids banned while a request is shorter than its min_new_tokens.
    suppress_rows: Tensor | None  # [Ns] int64
    suppress_ids: Tensor | None  # [Ns] int64
    # Grammar constraints (shared/constrained): allowed tokens as bits; None if no row has one.
    vocab_mask: Tensor | None  # [B, ceil(V / 32)] int32
    # Host-side facts.
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_unseeded: bool  # some non-greedy row draws from the generator

    @property
    def batch_size(self) -> int:
        return int(self.temperatures.shape[0])

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]],
        stop_ids: Sequence[set[int]],
        vocab_size: int,
        device: torch.device | str,
        vocab_mask: Tensor | None = None,
    ) -> SamplingBatch:
        """Gather B requests' params and histories into tensors on `device`.

        `stop_ids[i]` are the ids banned while `len(output_ids[i]) < min_new_tokens` (the
        model's eos ids unless ignore_eos, plus stop_token_ids). Ids outside [0, vocab_size)
        are ignored: they have no logit to change. Params may be raw or normalized. `vocab_mask`
        (already on `device`) bans what the rows' grammars do not allow.
        Host cost is O(total history length) per call.
        """
        size = len(params)
        assert len(output_ids) == len(prompt_ids) == len(stop_ids) == size
        greedy = [p.is_greedy for p in params]
        sampled = [not g for g in greedy]
        top_ks = [min(p.top_k, vocab_size) if p.top_k >= 1 else vocab_size for p in params]
        seeds = [p.seed if p.seed is not None else -1 for p in params]
        seeded_rows = [i for i in range(size) if sampled[i] and seeds[i] >= 0]

        target = torch.device(device)

        def tensor(values: Sequence[object], dtype: torch.dtype) -> Tensor:
            return to_device(values, target, dtype)  # never waits for the forward just launched

        def in_vocab(ids: Sequence[int] | set[int]) -> set[int]:
            return {t for t in ids if 0 <= t < vocab_size}

        rep_rows: list[int] = []
        rep_ids: list[int] = []
        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                ids = in_vocab(prompt_ids[i]) | in_vocab(output_ids[i])
                rep_rows.extend([i] * len(ids))
                rep_ids.extend(ids)
        use_repetition = any(p.repetition_penalty != 1.0 for p in params)

        out_rows: list[int] = []
        out_ids: list[int] = []
        out_counts: list[int] = []
        for i, p in enumerate(params):
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                counts = Counter(t for t in output_ids[i] if 0 <= t < vocab_size)
                out_rows.extend([i] * len(counts))
                out_ids.extend(counts.keys())
                out_counts.extend(counts.values())
        use_freq_presence = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)

        sup_rows: list[int] = []
        sup_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_ids[i]) < p.min_new_tokens:
                ids = in_vocab(stop_ids[i])
                sup_rows.extend([i] * len(ids))
                sup_ids.extend(ids)

        def pairs(values: list[int], used: bool) -> Tensor | None:
            return tensor(values, torch.int64) if used else None

        return cls(
            temperatures=tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], torch.float32),
            top_ks=tensor(top_ks, torch.int64),
            top_ps=tensor([p.top_p for p in params], torch.float32),
            min_ps=tensor([p.min_p for p in params], torch.float32),
            greedy=tensor(greedy, torch.bool),
            seeds=tensor(seeds, torch.int64),
            steps=tensor([len(o) for o in output_ids], torch.int64),
            seeded_rows=tensor(seeded_rows, torch.int64) if seeded_rows else None,
            repetition_penalties=(
                tensor([p.repetition_penalty for p in params], torch.float32) if use_repetition else None
            ),
            repetition_rows=pairs(rep_rows, use_repetition),
            repetition_ids=pairs(rep_ids, use_repetition),
            frequency_penalties=(
                tensor([p.frequency_penalty for p in params], torch.float32) if use_freq_presence else None
            ),
            presence_penalties=(
                tensor([p.presence_penalty for p in params], torch.float32) if use_freq_presence else None
            ),
            output_rows=pairs(out_rows, use_freq_presence),
            output_ids=pairs(out_ids, use_freq_presence),
            output_counts=pairs(out_counts, use_freq_presence),
            suppress_rows=pairs(sup_rows, bool(sup_rows)),
            suppress_ids=pairs(sup_ids, bool(sup_rows)),
            vocab_mask=vocab_mask,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_top_k=any(s and k < vocab_size for s, k in zip(sampled, top_ks)),
            any_top_p=any(s and p.top_p < 1.0 for s, p in zip(sampled, params)),
            any_min_p=any(s and p.min_p > 0.0 for s, p in zip(sampled, params)),
            any_unseeded=any(s and seed < 0 for s, seed in zip(sampled, seeds)),
        )


@dataclass(frozen=True)
class SampleOutput:
    """Result of one sampling step; all tensors stay on the logits' device."""

    next_token_ids: Tensor  # [B] int64
    # log_softmax of the raw logits (before penalties and temperature) at the chosen token.
    logprobs: Tensor | None  # [B] float32
    top_logprob_vals: Tensor | None  # [B, K] float32, descending
    top_logprob_ids: Tensor | None  # [B, K] int64


class Sampler:
    """Picks the next token for every row of a logits batch; see the module docstring.

    `generator` drives unseeded rows (default: torch's global generator for the device).
    `sample` never reads tensors back to the host and never mutates `logits`.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def sample(
        self,
        logits: Tensor,
        batch: SamplingBatch,
        top_logprobs_num: int = 0,
        return_logprob: bool = False,
    ) -> SampleOutput:
        """Sample one token per row of `logits` ([B, V], any float dtype)."""
        assert logits.dim() == 2 and logits.shape[0] == batch.batch_size, logits.shape
        raw = logits.float()  # [B, V]
        raw_logprobs = torch.log_softmax(raw, dim=-1) if return_logprob or top_logprobs_num > 0 else None

        work = _penalized(raw, batch)  # [B, V]
        if batch.all_greedy:
            next_ids = argmax(work)
        else:
            probs = torch.softmax(work / batch.temperatures[:, None], dim=-1)  # [B, V]
            probs = filter_probs(probs, batch)
            noise = self._exponential_noise(batch, probs)  # [B, V]
            next_ids = argmax(probs / noise)
            if batch.any_greedy:
                next_ids = torch.where(batch.greedy, argmax(work), next_ids)

        logprobs = top_vals = top_ids = None
        if raw_logprobs is not None:
            if return_logprob:
                logprobs = raw_logprobs.gather(1, next_ids[:, None]).squeeze(1)
            if top_logprobs_num > 0:
                top_vals, top_ids = raw_logprobs.topk(top_logprobs_num, dim=-1)
        return SampleOutput(next_ids, logprobs, top_vals, top_ids)

    def _exponential_noise(self, batch: SamplingBatch, probs: Tensor) -> Tensor:
        # noise: [B, V] strictly positive Exp(1) draws (greedy rows: unused).
        if batch.any_unseeded:
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            # exponential_ may return exactly 0, and p / 0 would let a zero-prob token win.
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        else:
            noise = torch.ones_like(probs)
        if batch.seeded_rows is not None:
            rows = batch.seeded_rows
            noise[rows] = seeded_exponential(batch.seeds[rows], batch.steps[rows], probs.shape[1])
        return noise


def argmax(x: Tensor) -> Tensor:  # [B, V] -> [B] int64, the first maximal index of each row
    """`x.argmax(-1)`; on a GPU the chunked kernel (`kernels.argmax`), several times faster on a
    vocabulary-wide row than torch's one block per row."""
    if use_kernels(x):
        from kernels.argmax import argmax_rows

        return argmax_rows(x)
    return x.argmax(dim=-1)


def _penalized(raw: Tensor, batch: SamplingBatch) -> Tensor:
    # Returns raw itself when nothing applies; a private copy otherwise (penalties are in place).
    uses_penalty = (
        batch.repetition_penalties is not None
        or batch.frequency_penalties is not None
        or batch.suppress_rows is not None
        or batch.vocab_mask is not None
    )
    if not uses_penalty:
        return raw
    work = raw.clone()
    if batch.repetition_penalties is not None:
        assert batch.repetition_rows is not None and batch.repetition_ids is not None
        apply_repetition_penalty(
            work, batch.repetition_rows, batch.repetition_ids, batch.repetition_penalties
        )
    if batch.frequency_penalties is not None:
        assert batch.presence_penalties is not None and batch.output_rows is not None
        assert batch.output_ids is not None and batch.output_counts is not None
        apply_frequency_presence_penalty(
            work,
            batch.output_rows,
            batch.output_ids,
            batch.output_counts,
            batch.frequency_penalties,
            batch.presence_penalties,
        )
    if batch.suppress_rows is not None:
        assert batch.suppress_ids is not None
        suppress_tokens(work, batch.suppress_rows, batch.suppress_ids)
    if batch.vocab_mask is not None:  # last: a penalty must not lift a banned token off -inf
        apply_token_bitmask(work, batch.vocab_mask)
    return work


def filter_probs(probs: Tensor, batch: SamplingBatch) -> Tensor:
    """Zero the probabilities that top-k, top-p and min-p exclude; the top token always stays.

    probs: [B, V], rows summing to 1. Rows are left unnormalised: the exponential race does
    not need it. Top-p is measured on the top-k survivors' renormalised mass (as HF and vLLM do).
    """
    if batch.any_top_k or batch.any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
        if batch.any_top_k:
            ranks = torch.arange(probs.shape[1], device=probs.device)  # [V]
            sorted_probs.masked_fill_(ranks[None, :] >= batch.top_ks[:, None], 0.0)
        if batch.any_top_p:
            cumulative = sorted_probs.cumsum(dim=-1)  # [B, V]
            kept_mass = cumulative[:, -1:]  # [B, 1]
            # Keep token j while the mass strictly before it is below top_p: the smallest set
            # reaching top_p. j = 0 has 0 before it, so the top token is always kept. Rows with
            # top_p == 1 are exempt so float rounding in the cumsum cannot clip their tail.
            mass_before = cumulative - sorted_probs
            drop = (mass_before >= batch.top_ps[:, None] * kept_mass) & (batch.top_ps < 1.0)[:, None]
            sorted_probs.masked_fill_(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if batch.any_min_p:
        # The max survives top-k/top-p, so the threshold is the same before or after them.
        threshold = batch.min_ps[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


# splitmix64 constants, written as the signed int64 values with the same bits.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: Tensor, shift: int) -> Tensor:
    # Logical right shift: torch's >> on int64 is arithmetic (sign-extending).
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(z: Tensor) -> Tensor:
    # splitmix64 finaliser; int64 multiplication wraps modulo 2**64 like uint64 would.
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seeded_exponential(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """Exp(1) noise that is a pure function of (seed, step, token id), computed on device.

    seeds, steps: [S] int64 -> [S, V] float32, strictly positive. Each (seed, step) pair keys
    a splitmix64 stream; token id i takes the stream's (i + 1)-th output.
    """
    key = _mix64(_mix64(seeds + _GOLDEN) + steps * _GOLDEN)  # [S]
    counter = (torch.arange(vocab_size, device=seeds.device) + 1) * _GOLDEN  # [V]
    bits = _mix64(key[:, None] + counter[None, :])  # [S, V]
    # Top 23 bits -> uniform in (0, 1): (k + 0.5) / 2**23 is exact in float32 and never 0 or 1.
    uniform = (_shr(bits, 41).to(torch.float32) + 0.5) * (2.0**-23)
    return -torch.log(uniform)
