"""DeepSeek-V2: multi-head latent attention (MLA) and a Mixture-of-Experts MLP.

Attention per token (names as in the checkpoint):

    q       = q_proj(x)                                  (q_lora_rank null, V2-Lite)
            | q_b_proj(q_a_layernorm(q_a_proj(x)))       [H, nope + rope]
    c, k_pe = kv_a_proj_with_mqa(x)                      [kv_lora_rank], [rope]
    latent  = [kv_a_layernorm(c) | rope(k_pe)]           one cache entry, shared by all heads
    keys, values of head h from kv_b_proj(c)             (see shared/attention/mla.py)

DeepSeek rotates interleaved pairs; the rope rows of q_proj/q_b_proj (per head) and of
kv_a_proj_with_mqa are permuted while loading so the projections emit [evens | odds] and the
neox rotation applies (`deinterleave_rope_rows` in rotary.py). The q.k product is unchanged (the same
permutation on both sides) and the cached k_rope is in that layout throughout. Being a pure row
permutation, it keeps block-FP8 scales valid: each head's rope rows lie inside one 128-row block
in the real shapes (nope 128 + rope 64 per head; kv_lora_rank 512).

Tensor parallelism splits the heads: q_proj / q_b_proj and kv_b_proj are column-parallel (each
head's rows are contiguous, so a rank's rows are its heads, and W_UK / W_UV derived from its
kv_b_proj are its heads' too), o_proj row-parallel with its all-reduce. q_a_proj and
kv_a_proj_with_mqa are replicated: the latent is one "head" that every rank needs whole, so every
rank's MLA pool holds the full latent of each token. The MoE block splits each expert's
intermediate size (shared experts alike), or with `ep_size == tp_size` partitions the routed
experts whole across the ranks, and all-reduces once after adding the routed and shared partial
sums; the router is replicated.

DP attention (`enable_dp_attention`, shared/distributed/dp_attention.py): each rank runs its own
requests through whole attention blocks (built under `parallel_state.replicated()`: every head,
o_proj unsplit, no collective), a replicated embedding and lm head; the decoder layer
(`DeepseekV2DpDecoderLayer`) gathers every rank's tokens before its MLP (dense or MoE, sharded as
above) and keeps its own rows after.

Layers before `first_k_dense_replace` have a dense MLP, the rest a MoE block: a router
(shared/models/layers/moe_router.py), routed experts (FusedMoE) and shared experts (a dense MLP of
`moe_intermediate_size * n_shared_experts`) added to the routed output.

Checkpoint tensors of layers >= num_hidden_layers (DeepSeek-V3's multi-token-prediction layers)
are skipped. After loading, `process_weights_after_loading()` must run once (W_UK/W_UV views).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from shared.attention.mla import MLAAttention
from shared.distributed import dp_attention, parallel_state
from shared.models.base import CausalLM
from shared.models.config import MLAConfig, ModelConfig
from shared.models.layers.activation import silu_and_mul
from shared.models.layers.embedding import LMHead, VocabEmbedding
from shared.models.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from shared.models.layers.moe import ExpertParallelMoE, FusedMoE, expert_param_name
from shared.models.layers.moe_router import make_router
from shared.models.layers.norm import RMSNorm
from shared.models.layers.rotary import RotaryEmbedding, deinterleave_rope_rows, get_rope, yarn_softmax_scale
from shared.models.llama import DecoderStack, LlamaMLP, PreNormDecoderLayer
from shared.models.weights import StackedParams, get_weight_loader, load_named_weights

if TYPE_CHECKING:
    from shared.batch import ForwardBatch
    from shared.distributed.dp_attention import DpLayout

STACKED_PARAMS: StackedParams = [("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# HF creates q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps.
_LORA_NORM_EPS = 1e-6


def _replicated_if(on: bool) -> contextlib.AbstractContextManager[None]:
    """Layers built inside hold whole weights when `on` (DP attention)."""
    return parallel_state.replicated() if on else contextlib.nullcontext()


class DeepseekMoE(nn.Module):
    """Router -> routed experts, plus the shared experts on every token."""

    def __init__(self, config: ModelConfig, default_topk_method: str) -> None:
        super().__init__()
        self.tp_size = parallel_state.tp_size()
        c = config.hf_config
        inter = int(c["moe_intermediate_size"])
        self.gate = make_router(c, config.hidden_size, default_topk_method)
        experts = ExpertParallelMoE if parallel_state.ep_size() > 1 else FusedMoE
        self.experts = experts(int(c["n_routed_experts"]), config.hidden_size, inter, quant=config.quant)
        n_shared = int(c.get("n_shared_experts") or 0)
        self.shared_experts = (
            LlamaMLP(config.hidden_size, inter * n_shared, quant=config.quant) if n_shared else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        topk_weights, topk_ids = self.gate(x)  # [T, k] float32, [T, k]
        out = self.experts(x, topk_weights, topk_ids)
        if self.tp_size > 1:
            return self._forward_tp(x, out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _forward_tp(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        # Routed and shared experts each hold this rank's slice of their intermediate size:
        # add the two partial sums, then one all-reduce for the whole block.
        if self.shared_experts is None:
            return parallel_state.all_reduce(routed)
        down = self.shared_experts.down_proj
        routed = routed + down.partial(silu_and_mul(self.shared_experts.gate_up_proj(x)))
        out = parallel_state.all_reduce(routed)  # [T, hidden]
        return out if down.bias is None else out + down.bias


class DeepseekV2Attention(nn.Module):
    """Projections around the MLA core; see the module docstring for the dataflow."""

    def __init__(
        self,
        config: ModelConfig,
        mla: MLAConfig,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        interleaved: bool,
    ) -> None:
        super().__init__()
        quant, bias = config.quant, config.attention_bias
        total_heads = config.num_attention_heads
        self.num_heads = total_heads // parallel_state.tp_size()  # this rank's heads
        self.mla = mla
        nope, rope, dl = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
        q_out = total_heads * mla.qk_head_dim
        self.q_proj: ColumnParallelLinear | None = None
        self.q_a_proj: ReplicatedLinear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: ColumnParallelLinear | None = None
        if mla.q_lora_rank is None:
            self.q_proj = q_last = ColumnParallelLinear(config.hidden_size, q_out, quant=quant)
        else:
            self.q_a_proj = ReplicatedLinear(config.hidden_size, mla.q_lora_rank, bias=bias, quant=quant)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, eps=_LORA_NORM_EPS)
            self.q_b_proj = q_last = ColumnParallelLinear(mla.q_lora_rank, q_out, quant=quant)
        self.kv_a_proj_with_mqa = ReplicatedLinear(config.hidden_size, dl + rope, bias=bias, quant=quant)
        self.kv_a_layernorm = RMSNorm(dl, eps=_LORA_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(dl, total_heads * (nope + mla.v_head_dim), quant=quant)
        self.o_proj = RowParallelLinear(
            total_heads * mla.v_head_dim, config.hidden_size, bias=bias, quant=quant
        )
        if interleaved:  # rows of the full checkpoint tensor, before this rank's slice is taken
            heads = range(total_heads)
            deinterleave_rope_rows(q_last, q_out, [h * mla.qk_head_dim + nope for h in heads], rope)
            deinterleave_rope_rows(self.kv_a_proj_with_mqa, dl + rope, [dl], rope)
        self.rotary_emb = rotary_emb
        self.attn = MLAAttention(
            self.num_heads,
            nope,
            rope,
            mla.v_head_dim,
            dl,
            scaling=yarn_softmax_scale(mla.qk_head_dim, config.rope_scaling),
            layer_id=layer_id,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t, mla = hidden.shape[0], self.mla
        if self.q_proj is not None:
            q = self.q_proj(hidden)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(t, self.num_heads, mla.qk_head_dim)  # [T, H, nope + rope]
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(hidden).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())  # [T, Dl]
        q_rope, k_rope = self.rotary_emb(positions, q_rope.contiguous(), k_rope.contiguous())
        latent = torch.cat([c, k_rope], dim=-1)  # [T, Dl + rope]
        out = self.attn(torch.cat([q_nope, q_rope], dim=-1), latent, self.expand_kv, batch)  # [T, H * v]
        return self.o_proj(out)  # [T, hidden]

    def expand_kv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c [S, Dl] -> (k_nope [S, H, nope], v [S, H, v]) through kv_b_proj."""
        kv = self.kv_b_proj(c).view(c.shape[0], self.num_heads, -1)  # [S, H, nope + v]
        k_nope, v = kv.split([self.mla.qk_nope_head_dim, self.mla.v_head_dim], dim=-1)
        return k_nope, v


class DeepseekV2DecoderLayer(PreNormDecoderLayer):
    """An MLA attention block and a dense MLP or MoE block (the pre-norm dataflow of the base)."""

    self_attn: DeepseekV2Attention
    # Whole attention weights on every rank (DP attention), else this rank's heads.
    replicated_attention: ClassVar[bool] = False

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        interleaved: bool,
        default_topk_method: str,
    ) -> None:
        super().__init__()
        assert config.mla is not None
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        c = config.hf_config
        with _replicated_if(self.replicated_attention):
            self.self_attn = DeepseekV2Attention(config, config.mla, layer_id, rotary_emb, interleaved)
        is_moe = (
            c.get("n_routed_experts")
            and layer_id >= int(c.get("first_k_dense_replace", 0))
            and layer_id % int(c.get("moe_layer_freq", 1)) == 0
        )
        self.mlp: nn.Module = (
            DeepseekMoE(config, default_topk_method)
            if is_moe
            else LlamaMLP(config.hidden_size, config.intermediate_size, quant=config.quant)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekV2DpDecoderLayer(DeepseekV2DecoderLayer):
    """DP attention: this rank's tokens through whole attention, then the MLP shard over every
    rank's tokens (`batch.dp`'s gather), keeping this rank's rows."""

    replicated_attention = True

    def forward(
        self,
        positions: torch.Tensor,  # [T]
        hidden: torch.Tensor,  # [T, hidden]: this rank's tokens (T > 0)
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert batch.dp is not None
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp_across_ranks(hidden, batch.dp), residual

    def mlp_across_ranks(self, hidden: torch.Tensor, layout: DpLayout) -> torch.Tensor:
        """[T_rank, hidden] -> [T_rank, hidden]: the MLP shard on all ranks' tokens [total, hidden]
        (its all-reduce leaves every rank the full sums), this rank's rows kept."""
        return layout.scatter(self.mlp(layout.gather(hidden)))


class DeepseekV2Model(DecoderStack):
    """DeepSeek's stack; one rotary table (over the rope dims) shared by all layers."""

    def __init__(self, config: ModelConfig, interleaved: bool, default_topk_method: str) -> None:
        super().__init__()
        assert config.mla is not None
        dp = dp_attention.enabled()
        with _replicated_if(dp):
            self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        layer_cls = DeepseekV2DpDecoderLayer if dp else DeepseekV2DecoderLayer
        rotary_emb = get_rope(
            config.mla.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            layer_cls(config, i, rotary_emb, interleaved, default_topk_method)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekV2ForCausalLM(CausalLM):
    """DeepSeek-V2 causal LM; the `CausalLM` interface (docstrings there), HF parameter names
    except the fused `gate_up_proj` and the experts' `w13_weight` / `w2_weight`."""

    # The router when config.json names no topk_method.
    default_topk_method: ClassVar[str] = "greedy"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.mla is None:
            raise ValueError(f"{config.architecture} needs MLA fields (kv_lora_rank, ...) in config.json")
        self.model = DeepseekV2Model(config, self.rope_interleaved(config), self.default_topk_method)
        with _replicated_if(dp_attention.enabled()):
            self.lm_head = LMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @classmethod
    def rope_interleaved(cls, config: ModelConfig) -> bool:
        """Whether the checkpoint's rope dims are interleaved pairs (always in DeepSeek-V2)."""
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward_idle(self, layout: DpLayout) -> None:
        """DP attention, no tokens on this rank this step: each layer's MLP shard on the other
        ranks' tokens (`dp_attention.DpAttentionModel`)."""
        w = self.model.embed_tokens.weight
        empty = w.new_empty(0, w.shape[1])  # [0, hidden]
        for layer in self.model.layers:
            assert isinstance(layer, DeepseekV2DpDecoderLayer)
            layer.mlp_across_ranks(empty, layout)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        experts_seen: dict[str, set[Any]] = {}

        def dense(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            # Experts load here; everything else goes on to the generic name mapping.
            for name, tensor in items:
                m = _LAYER_INDEX.match(name)
                if m is not None and int(m[1]) >= self.config.num_hidden_layers:
                    continue  # multi-token-prediction layers: not served
                expert = expert_param_name(name)
                if expert is None:
                    yield name, tensor
                    continue
                param_name, expert_id, shard = expert
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} matches no model parameter")
                param = params[param_name]
                get_weight_loader(param)(param, tensor, expert_id, shard)
                experts_seen.setdefault(param_name, set()).add((expert_id, shard))

        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        loaded |= load_named_weights(self, dense(weights), STACKED_PARAMS, skip_prefixes=skip)
        for param_name, seen in experts_seen.items():
            if seen >= set(getattr(params[param_name], "shard_ids", ())):
                loaded.add(param_name)
        return loaded

    def process_weights_after_loading(self) -> None:
        """Derive what the forward needs from the loaded weights: the MLA layers' W_UK / W_UV
        (views of kv_b_proj's weight; per-head FP8 operands when the model is FP8). The loader
        runs it after every child's hook (kv_b_proj is quantized by then); idempotent."""
        for layer in self.model.layers:
            assert isinstance(layer, DeepseekV2DecoderLayer)
            kv_b = layer.self_attn.kv_b_proj
            block = kv_b.quant.weight_block if kv_b.quant is not None else None
            layer.self_attn.attn.set_absorbed_weights(kv_b.weight, kv_b.weight_scale_inv, block)
