"""Routed experts of a Mixture-of-Experts layer, stored fused for one grouped computation.

    w13 [E, 2I, H]   expert e's gate_proj rows [0, I), then its up_proj rows [I, 2I)
    w2  [E, H, I]    expert e's down_proj

Checkpoints ship one tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`, ...);
`expert_param_name` maps such a name to the fused parameter plus (expert id, shard), and the
parameter's weight loader copies the tensor into its expert's slice. With tensor parallelism
every rank holds every expert, and of each its slice of I (rows of w13's gate and up halves,
columns of w2), as column/row-parallel linears do; its output is then this rank's partial sum,
which the caller all-reduces (once, with the shared experts': `DeepseekMoE`). At
`tp_size == 1` the slice is all of I and the output the full sum. Expert parallelism
(`ExpertParallelMoE`, `ep_size == tp_size`) partitions the experts instead, each whole.

FP8 (`quant`): w13/w2 hold E4M3 with per-expert 128 x 128 block scales (`w13_weight_scale_inv`
[E, 2I/128, H/128], `w2_weight_scale_inv` [E, H/128, I/128]), loaded as they are from an FP8
checkpoint (`experts.{e}.gate_proj.weight_scale_inv`, ...; the up half must start on a block
boundary) or quantized per expert after loading a bf16 one; activations are quantized per token
group inside the kernel. With tensor parallelism this rank's I must be whole 128-wide blocks
(`check_fp8_shard`), so the scales split in block units and quantizing while loading makes
the blocks `tp_size == 1` makes.

The computation is `kernels.fused_moe.fused_moe` on CUDA and its torch twin `fused_moe_ref`
elsewhere (the same rounding as HF's experts loop), imported on first use so that importing a
model never imports Triton.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from shared.distributed import parallel_state
from shared.models.layers.fused import use_kernels
from shared.models.layers.linear import check_fp8_shard
from shared.models.weights import set_weight_loader
from shared.quant.fp8 import FP8_DTYPE, Fp8Config

# "<prefix>.experts.<e>.<proj>.<suffix>" in HF checkpoints of DeepSeek (and Qwen-MoE-like) models.
_EXPERT_NAME = re.compile(
    r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>\w+)$"
)
_PROJ_PARAM = {"gate_proj": "w13", "up_proj": "w13", "down_proj": "w2"}
_PROJ_SHARD = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def expert_param_name(checkpoint_name: str) -> tuple[str, int, str] | None:
    """`...experts.3.up_proj.weight` -> ("...experts.w13_weight", 3, "up"); None for other names."""
    m = _EXPERT_NAME.match(checkpoint_name)
    if m is None:
        return None
    proj = m["proj"]
    return f"{m['prefix']}.{_PROJ_PARAM[proj]}_{m['suffix']}", int(m["expert"]), _PROJ_SHARD[proj]


class FusedMoE(nn.Module):
    """x [T, H], topk_weights [T, k] float32, topk_ids [T, k] -> sum of the chosen experts [T, H].

    Parameters `w13_weight` [E, 2I, H] and `w2_weight` [E, H, I]; each weight loader takes
    `(param, loaded, expert_id, shard)` with shard "gate", "up" (w13) or "down" (w2), and lists
    every (expert, shard) pair it needs in `shard_ids`.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, quant: Fp8Config | None = None
    ) -> None:
        super().__init__()
        held, self.tp_rank, self.tp_size = self._shard(num_experts)
        assert intermediate_size % self.tp_size == 0, (intermediate_size, self.tp_size)
        self.intermediate_size = i = intermediate_size // self.tp_size  # this rank's part
        if self.tp_size > 1:
            what = f"the routed experts' moe_intermediate_size ({intermediate_size})"
            check_fp8_shard(quant, i, 0, what)  # gate/up rows
            check_fp8_shard(quant, i, 1, what)  # down columns
        self.quant = quant
        self.expert_start = held.start  # checkpoint id of this layer's expert 0
        self.num_experts = num_experts = len(held)
        self.hidden_size = hidden_size
        fp8_checkpoint = quant is not None and quant.checkpoint_is_fp8
        dtype = FP8_DTYPE if fp8_checkpoint else None
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * i, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, i, dtype=dtype), requires_grad=False
        )
        self.w13_weight_scale_inv: nn.Parameter | None = None
        self.w2_weight_scale_inv: nn.Parameter | None = None
        if fp8_checkpoint:
            assert quant is not None
            bn, bk = quant.weight_block
            self.w13_weight_scale_inv = _scale_param(num_experts, -(-2 * i // bn), -(-hidden_size // bk))
            self.w2_weight_scale_inv = _scale_param(num_experts, -(-hidden_size // bn), -(-i // bk))
        for w13 in (self.w13_weight, self.w13_weight_scale_inv):
            if w13 is not None:
                set_weight_loader(w13, self.weight_loader, [(e, s) for e in held for s in ("gate", "up")])
        for w2 in (self.w2_weight, self.w2_weight_scale_inv):
            if w2 is not None:
                set_weight_loader(w2, self.weight_loader, [(e, "down") for e in held])

    def _shard(self, num_experts: int) -> tuple[range, int, int]:
        """(the checkpoint ids of the experts this rank holds, this rank's index and the count
        of the slices of the intermediate size): every expert, split across the TP ranks."""
        return range(num_experts), parallel_state.tp_rank(), parallel_state.tp_size()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        """Copy one expert's gate/up/down checkpoint tensor (or its FP8 block scales) into its
        slice of w13 or w2."""
        i, hidden = self.intermediate_size, self.hidden_size
        if shard not in ("gate", "up", "down"):
            raise ValueError(f"unknown expert shard {shard!r}")
        local = expert_id - self.expert_start  # this layer's index of the expert
        if not 0 <= local < self.num_experts:
            return  # an expert another rank holds (expert parallelism)
        if param is self.w13_weight_scale_inv or param is self.w2_weight_scale_inv:
            # Scales count blocks: the same slicing in block units.
            assert self.quant is not None
            bn, bk = self.quant.weight_block
            if shard != "down" and i % bn:
                raise ValueError(
                    f"FP8 checkpoint: up_proj starts at row {i}, not on a {bn}-row block boundary"
                )
            i, hidden = (
                -(-i // (bn if shard != "down" else bk)),
                -(-hidden // (bk if shard != "down" else bn)),
            )
        rows = shard != "down"  # gate/up: this rank's rows of I; down: its columns
        expected = (i * self.tp_size, hidden) if rows else (hidden, i * self.tp_size)
        if tuple(loaded.shape) != expected:
            raise ValueError(
                f"shape mismatch: expert {expert_id} {shard} expects {expected}, got {tuple(loaded.shape)}"
            )
        if rows:
            dst = param.data[local].narrow(0, 0 if shard == "gate" else i, i)
            dst.copy_(loaded.narrow(0, self.tp_rank * i, i))
        else:
            param.data[local].copy_(loaded.narrow(1, self.tp_rank * i, i))

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        topk_weights: torch.Tensor,  # [T, k] float32
        topk_ids: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]; with tensor parallelism, this rank's partial sum
        from kernels.fused_moe import fused_moe, fused_moe_ref

        run = fused_moe if use_kernels(x) else fused_moe_ref
        return run(
            x,
            self.w13_weight,
            self.w2_weight,
            topk_weights,
            topk_ids,
            w13_scale=self.w13_weight_scale_inv,
            w2_scale=self.w2_weight_scale_inv,
        )

    def process_weights_after_loading(self) -> None:
        """`quantization="fp8"` on an unquantized checkpoint: quantize every expert's w13 and w2
        (each as one matrix) to E4M3 with block scales. A no-op otherwise."""
        if self.quant is None or self.w13_weight_scale_inv is not None:
            return
        from kernels.fp8_quant import block_quant_fp8

        for name in ("w13_weight", "w2_weight"):
            pairs = [block_quant_fp8(w, self.quant.weight_block) for w in getattr(self, name).data]
            setattr(self, name, nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
            scales = torch.stack([s for _, s in pairs])
            setattr(self, f"{name}_scale_inv", nn.Parameter(scales, requires_grad=False))


class ExpertParallelMoE(FusedMoE):
    """Experts partitioned across the ranks (`ep_size == tp_size`): rank r holds experts
    `[r * E / ep, (r + 1) * E / ep)` whole (no split of the intermediate size, so no FP8 block
    constraint on it) and returns their contribution for every token, zero for a token none of
    its chosen experts live here; the caller's all-reduce adds the ranks' contributions.

    Tokens are not dispatched: every rank sees every token, and a choice of another rank's expert
    runs this rank's expert 0 with weight 0 (simple and exact; an all-to-all dispatch is the
    GPU-scale version of this)."""

    def _shard(self, num_experts: int) -> tuple[range, int, int]:
        ep, rank = parallel_state.ep_size(), parallel_state.tp_rank()
        if num_experts % ep:
            raise ValueError(f"ep_size={ep} must divide the model's n_routed_experts ({num_experts})")
        n = num_experts // ep
        return range(rank * n, (rank + 1) * n), 0, 1

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        topk_weights: torch.Tensor,  # [T, k] float32
        topk_ids: torch.Tensor,  # [T, k] checkpoint expert ids
    ) -> torch.Tensor:  # [T, H]: this rank's experts' share
        local = topk_ids - self.expert_start
        here = (local >= 0) & (local < self.num_experts)  # [T, k]
        weights = torch.where(here, topk_weights, torch.zeros_like(topk_weights))
        return super().forward(x, weights, torch.where(here, local, torch.zeros_like(local)))


def _scale_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
