"""DP attention (`enable_dp_attention`): DeepSeek's attention data-parallel, its MLPs sharded.

With `tp_size = N` ranks, plain tensor parallelism splits every layer and runs one batch. DP
attention instead gives each rank its own requests: every rank holds the whole attention
(MLA's projections and o_proj unsplit, as at tp_size 1), the embedding and the lm head, and
its own KV pool, radix cache, scheduler and sampler. Only the MLP layers (the dense ones before
`first_k_dense_replace` and the MoE blocks) stay sharded across all N ranks, tensor- or
expert-parallel as without DP attention. Each of them runs on every rank's tokens at once:

    rank r: embed its T_r tokens ─ attention (its KV) ─┐
                                                        gather: all ranks' tokens [sum T, hidden]
                                                        MLP / MoE shard, all-reduce (as with TP)
                                  rank r's rows back ◀──┘  [T_r, hidden] ─ next layer ... ─ lm head

The token counts T_0..T_{N-1} are exchanged once per step (`StepTokens.exchange`, one small
all-gather); the gather pads every rank's rows to the largest count. Every rank must run the same
collectives, so a rank without tokens this step still runs each MLP on the others' tokens
(`DpAttentionModel.forward_idle`: no attention, no embedding, nothing sampled). A step where no
rank has tokens runs nothing.

This module is the model side: the layout of one step (`DpLayout`, on `ForwardBatch.dp`), the
per-step count exchange, the flag the model reads while it is built (`building` / `enabled`) and
the start-up check. The request side (rank 0 dispatching requests to the ranks, every rank
stepping its own engine in lockstep) is shared/distributed/dp_engine.py.

Cost: per MLP layer one all-gather of hidden states on top of TP's all-reduce (whose result is
the whole batch's on every rank; a reduce-scatter would return only this rank's rows: the
GPU-scale next step), plus per step the count exchange. Attention weights are N times those of
TP, and the KV of a request lives on one rank only, so N ranks hold N times the requests' KV.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from shared.distributed import parallel_state

if TYPE_CHECKING:
    from shared.models.config import ModelConfig

_building = False
# all_gather_into_tensor (torch >= 2.4) is renamed all_gather_single in newer releases.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def building(enabled: bool) -> Iterator[None]:
    """While a model is built inside with `enabled`, its layers read `enabled()` True (and pick
    whole attention weights and the gathered MLP); they keep what they read."""
    global _building
    saved, _building = _building, enabled
    try:
        yield
    finally:
        _building = saved


def enabled() -> bool:
    """Whether the model being built runs with DP attention (read by its constructors)."""
    return _building


def check_support(model: ModelConfig, size: int, ep_size: int = 1) -> None:
    """A `ValueError` unless `model` can run DP attention over `size` ranks: an MLA + MoE model
    (DeepSeek-V2/V3) whose MLP shards divide as tensor parallelism needs (attention is whole)."""
    c = model.hf_config
    if model.mla is None or not c.get("n_routed_experts"):
        raise ValueError(
            f"enable_dp_attention: {model.architecture or 'this model'} is not an MLA + MoE model;"
            " DP attention supports DeepSeek-V2/V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM)"
        )
    inter = int(c["moe_intermediate_size"])
    sizes = [("intermediate_size", model.intermediate_size)]  # the dense layers' MLP
    if ep_size > 1:
        sizes += [("n_routed_experts", int(c["n_routed_experts"]))]
    else:
        sizes += [("moe_intermediate_size", inter)]
    shared = inter * int(c.get("n_shared_experts") or 0)
    sizes += [("moe_intermediate_size * n_shared_experts", shared)] if shared else []
    for name, value in sizes:
        if value % size:
            raise ValueError(
                f"enable_dp_attention with tp_size={size}: tp_size must divide the model's {name} ({value})"
            )


@dataclass(frozen=True)
class DpLayout:
    """One step's tokens on each rank (the same on every rank) and this rank's index."""

    counts: tuple[int, ...]  # T_r of each rank r
    rank: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    def gather(self, x: torch.Tensor) -> torch.Tensor:  # [T_rank, H] -> [total, H], rank order
        """Every rank's rows, in rank order (a collective: every rank calls it)."""
        pad = max(self.counts)
        if x.shape[0] < pad:
            x = torch.cat([x, x.new_zeros(pad - x.shape[0], *x.shape[1:])])
        out = x.new_empty(len(self.counts) * pad, *x.shape[1:])
        all_gather_flat(out, x.contiguous())
        if all(n == pad for n in self.counts):
            return out
        parts = out.split(pad)
        return torch.cat([p[:n] for p, n in zip(parts, self.counts, strict=True)])

    def scatter(self, y: torch.Tensor) -> torch.Tensor:  # [total, H] -> [T_rank, H]
        """This rank's rows of a gathered (and all-reduced) tensor."""
        start = sum(self.counts[: self.rank])
        return y[start : start + self.counts[self.rank]]


class StepTokens:
    """One rank's token-count exchange, once per engine step: by the step's forward
    (`exchange`), or, when the step ran none, at its end (`end_step`), so that every rank
    exchanges exactly once per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._exchanged = False  # this step's forward exchanged already

    def exchange(self, num_tokens: int) -> DpLayout:
        """Every rank's count this step (a collective)."""
        size, rank = parallel_state.tp_size(), parallel_state.tp_rank()
        mine = torch.tensor([num_tokens], dtype=torch.int64, device=self.device)
        out = torch.empty(size, dtype=torch.int64, device=self.device)
        all_gather_flat(out, mine)
        self._exchanged = True
        return DpLayout(tuple(out.tolist()), rank)

    def end_step(self) -> DpLayout | None:
        """After an engine step: the layout this rank must follow without tokens of its own, or
        None (its forward ran, or no rank had tokens)."""
        if self._exchanged:
            self._exchanged = False
            return None
        layout = self.exchange(0)
        self._exchanged = False
        return layout if layout.total else None


@runtime_checkable
class DpAttentionModel(Protocol):
    """A model built with DP attention (`enabled()` at construction)."""

    def forward_idle(self, layout: DpLayout) -> None:
        """This rank has no tokens this step: run each MLP shard on the other ranks' tokens."""
