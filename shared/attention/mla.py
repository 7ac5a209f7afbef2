"""Multi-head latent attention (DeepSeek-V2/V3): the attention core over a latent KV cache.

The model owns the projections; per token it hands this layer the query `[H, nope + rope]` (rope
part rotated) and the latent `[c | k_rope]` (`kv_lora_rank + rope` wide: the normed compressed
KV and the rotated rope key shared by all heads), which is what the pool stores. Keys and values
of head h are `k = [W_UK[h] c | k_rope]`, `v = W_UV[h] c`, with `kv_b_proj` = per head
`[W_UK (nope rows) ; W_UV (v rows)]` applied to c. Two equivalent ways to attend:

    absorbed   q_abs = [q_nope @ W_UK | q_rope]  (H x (Dl + rope)), MQA over the latent pool,
               out_latent (H x Dl) @ W_UV -> H x v. Keys are never materialised per head.
    expanded   expand every key's c with kv_b_proj to k_nope and v per head, then plain MHA
               with head dims nope + rope (scores) and v (values).

Decode always uses the absorbed form (one query per request over a long cache). An extend step
picks the cheaper form from a FLOP count over the host-side lengths (`choose_extend_form`):
expansion costs (sum of sequence lengths) * H * (nope + v) * Dl and then attends at small head
dims; absorption costs two small matmuls over the new tokens and then attends at Dl + rope.
A long cached prefix with few new tokens favours absorbed, a fresh prompt expanded.

W_UK and W_UV are views of kv_b_proj's weight set after loading (`set_absorbed_weights`). With
FP8 weights they are dequantized from kv_b_proj's blocks and requantized per head as the two
batched matmuls' block-wise FP8 operands (`kernels.fp8_gemm.fp8_bmm`: W8A8, the query and the
latent output quantized per token in 128-wide groups), so the absorbed path reads FP8 as the
projections do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from shared.batch import ForwardMode

if TYPE_CHECKING:
    from shared.attention.base import ExpandLatent
    from shared.batch import ForwardBatch

ExtendForm = Literal["absorbed", "expanded"]


class MLAAttention(nn.Module):
    """Paged MLA for one decoder layer (no parameters; the absorbed weights are views).

    `extend_form` is "auto" (FLOP model, the default) or forces one form for extend steps
    (tests; a backend lacking one form).
    """

    def __init__(
        self,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        scaling: float,
        layer_id: int,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_nope_head_dim = qk_nope_head_dim
        self.rope_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.scaling = scaling
        self.layer_id = layer_id
        self.extend_form: Literal["auto", "absorbed", "expanded"] = "auto"
        self.w_uk: torch.Tensor | None = None  # [H, nope, Dl]; FP8: [H, Dl, nope] (as bmm's [N, K])
        self.w_uv: torch.Tensor | None = None  # [H, v, Dl] (applied transposed)
        # FP8: per-head block scales of w_uk / w_uv and the block shape; None when unquantized.
        self.w_uk_scale: torch.Tensor | None = None
        self.w_uv_scale: torch.Tensor | None = None
        self.fp8_block: tuple[int, int] = (128, 128)

    def set_absorbed_weights(
        self,
        kv_b_weight: torch.Tensor,  # [H * (nope + v), Dl]
        scale_inv: torch.Tensor | None = None,
        fp8_block: tuple[int, int] | None = None,
    ) -> None:
        """Take W_UK / W_UV from kv_b_proj's weight (this rank's heads). Unquantized (`fp8_block`
        None): views. FP8 (`fp8_block` given): the weight, dequantized to float32 first when it
        is stored as FP8 (`scale_inv` its block scales), is requantized per head for `fp8_bmm`;
        with 128-row heads (real shapes) the blocks coincide and requantizing is lossless.
        Call again whenever that weight is replaced."""
        if scale_inv is not None:
            from kernels.fp8_quant import block_dequant_fp8

            assert fp8_block is not None
            kv_b_weight = block_dequant_fp8(kv_b_weight, scale_inv, fp8_block, torch.float32)
        w = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # [H, nope|v, Dl]
        if fp8_block is None:
            self.w_uk, self.w_uv = w_uk, w_uv
            return
        self.fp8_block = fp8_block
        self.w_uk, self.w_uk_scale = _quantize_heads(w_uk.transpose(1, 2), fp8_block)  # [H, Dl, nope]
        self.w_uv, self.w_uv_scale = _quantize_heads(w_uv, fp8_block)  # [H, v, Dl]

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:  # [T, H, nope] -> [T, H, Dl]
        """q_nope @ W_UK per head: the query in latent space (scores against c directly)."""
        assert self.w_uk is not None, "set_absorbed_weights was not called after loading"
        if self.w_uk_scale is not None:
            return self._fp8_bmm(q_nope.transpose(0, 1), self.w_uk, self.w_uk_scale).transpose(0, 1)
        return torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)

    def project_out(self, out_latent: torch.Tensor) -> torch.Tensor:  # [T, H, Dl] -> [T, H, v]
        """out_latent @ W_UV^T per head: latent-space attention output to each head's values."""
        assert self.w_uv is not None, "set_absorbed_weights was not called after loading"
        if self.w_uv_scale is not None:
            return self._fp8_bmm(out_latent.transpose(0, 1), self.w_uv, self.w_uv_scale).transpose(0, 1)
        return torch.bmm(out_latent.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)

    def _fp8_bmm(self, x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> torch.Tensor:
        from kernels.fp8_gemm import fp8_bmm, fp8_bmm_ref

        # [H, T, K] x [H, N, K]^T -> [H, T, N]; the CPU twin emulates the same E4M3 rounding.
        return (fp8_bmm if x.is_cuda else fp8_bmm_ref)(x, w_q, w_s, self.fp8_block)

    def forward(
        self,
        q: torch.Tensor,  # [T, H, nope + rope], rope part rotated
        latent: torch.Tensor,  # [T, Dl + rope]: [c normed | k_rope rotated]
        expand: ExpandLatent,  # c [S, Dl] -> (k_nope [S, H, nope], v [S, H, v])
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H * v]
        t = q.shape[0]
        backend = batch.attn_backend
        if batch.mode != ForwardMode.DECODE and self.choose_extend_form(batch) == "expanded":
            out = backend.forward_mla_extend_expanded(q, latent, expand, self, batch)  # [T, H, v]
            return out.reshape(t, self.num_heads * self.v_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.rope_dim], dim=-1)
        q_abs = torch.cat([self.absorb_q(q_nope), q_rope], dim=-1)  # [T, H, Dl + rope]
        if batch.mode == ForwardMode.DECODE:
            out_latent = backend.forward_mla_decode(q_abs, latent, self, batch)  # [T, H, Dl]
        else:
            out_latent = backend.forward_mla_extend_absorbed(q_abs, latent, self, batch)
        return self.project_out(out_latent.to(q.dtype)).reshape(t, self.num_heads * self.v_head_dim)

    def choose_extend_form(self, batch: ForwardBatch) -> ExtendForm:
        """The extend form with fewer multiply-adds for this step's lengths (or the forced one)."""
        if self.extend_form != "auto":
            return self.extend_form
        h, dl, rope = self.num_heads, self.kv_lora_rank, self.rope_dim
        nope, v = self.qk_nope_head_dim, self.v_head_dim
        new_tokens = sum(batch.extend_seq_lens_cpu)
        # query-key pairs attended (the causal half within the new tokens ignored alike in both)
        pairs = sum(e * s for e, s in zip(batch.extend_seq_lens_cpu, batch.seq_lens_cpu))
        expanded = sum(batch.seq_lens_cpu) * h * (nope + v) * dl + pairs * h * (nope + rope + v)
        absorbed = new_tokens * h * (nope + v) * dl + pairs * h * (dl + rope + dl)
        return "expanded" if expanded <= absorbed else "absorbed"


def _quantize_heads(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 of each head's `[N, K]` matrix: ([H, N, K] E4M3, [H, N/bn, K/bk] scales)."""
    from kernels.fp8_quant import block_quant_fp8

    pairs = [block_quant_fp8(w[h].float(), block) for h in range(w.shape[0])]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
