"""The attention-backend interface and its registry.

A backend owns how attention runs over the paged KV pool; the model only calls `Attention.forward`.
Per step the model runner calls `init_forward_metadata(batch)` once, then every layer calls
`forward(q, k, v, layer, batch)`, which must (1) write the new tokens' k/v into the pool at
`batch.out_cache_loc` and (2) attend each request's new queries over its whole sequence
(`req_to_token[row, :seq_len]`), causally within the new tokens. Backends hold no per-request
state between steps. The CUDA-graph hooks (capture/replay metadata) join this interface with the
GPU backends.

Multi-head latent attention (DeepSeek, `shared/attention/mla.py`) has its own three entry points,
`forward_mla_*`, under the same store-then-attend contract: each first writes the new tokens'
latent `[c | k_rope]` into the `MLAKVPool` at `batch.out_cache_loc`, then attends every new
query over its request's whole sequence read back from the pool (causal within the new tokens).
Backends stay ignorant of weights: the absorbed forms get queries already multiplied into the
latent space and return latent-space outputs; the expanded form gets a callable that turns
latents into per-head keys and values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from shared.attention.layer import Attention

if TYPE_CHECKING:
    from shared.attention.mla import MLAAttention
    from shared.batch import ForwardBatch

# latent c [S, kv_lora_rank] -> (k_nope [S, H, qk_nope_head_dim], v [S, H, v_head_dim])
ExpandLatent = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AttentionBackend(ABC):
    name: str = ""
    supports_cuda_graph: ClassVar[bool] = False
    # Optional features of `Attention` layers; the model runner refuses, at start-up, a model
    # whose layers need one its backend lacks (`check_supports`).
    supports_logit_softcap: ClassVar[bool] = False

    def missing(self, model: nn.Module) -> list[str]:
        """What `model`'s attention layers need that this backend lacks (empty: nothing)."""
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        if not self.supports_logit_softcap and any(m.logit_softcap is not None for m in layers):
            return ["attention logit soft-capping"]
        return []

    def check_supports(self, model: nn.Module, model_name: str) -> None:
        """A `ValueError` naming what `model`'s attention layers need that this backend lacks."""
        if missing := self.missing(model):
            raise ValueError(
                f"{model_name} needs {', '.join(missing)}, which the {self.name!r} attention"
                " backend does not implement yet; use --attention-backend torch"
                " (attention_backend='torch' in the offline Engine)"
            )

    def init_forward_metadata(self, batch: ForwardBatch) -> None:  # noqa: B027 (optional hook)
        """Plan the step once for all layers (index tensors, split sizes). Default: nothing."""

    def init_forward_metadata_graph(self, batch: ForwardBatch, max_seq_len: int) -> None:
        """Plan a step that a CUDA graph captures and later replays with other values: a decode
        step, or a prompt (EXTEND) step where the backend takes those (`PromptGraphRunner`).

        The plan may use only `batch.batch_size`, `batch.num_tokens` (no request of a replay has
        more new tokens), `max_seq_len` (no replay sees a longer sequence) and the batch's device
        tensors, which keep their addresses across replays.
        """
        raise NotImplementedError(f"attention backend {self.name!r} does not support CUDA graphs")

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        layer: Attention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store k/v for the new tokens, then return attention output for the new queries."""

    # ---- multi-head latent attention. Shapes: H = layer.num_heads, Dl = layer.kv_lora_rank,
    # Dk = Dl + layer.rope_dim (a pool entry); scores use layer.scaling. ----

    def forward_mla_decode(
        self,
        q_abs: torch.Tensor,  # [B, H, Dk]: [q_nope @ W_UK | q_rope] per head
        latent: torch.Tensor,  # [B, Dk]: the new token's [c | k_rope]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [B, H, Dl]
        """Decode step (one new token per request), absorbed: store `latent`, then MQA over the
        latent pool with keys = whole entries `[0, Dk)` and values = their first Dl columns."""
        raise NotImplementedError(f"attention backend {self.name!r} does not implement MLA decode")

    def forward_mla_extend_absorbed(
        self,
        q_abs: torch.Tensor,  # [T, H, Dk]
        latent: torch.Tensor,  # [T, Dk]
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, Dl]
        """Extend step in the absorbed form: as `forward_mla_decode` for ragged new tokens after
        cached prefixes (causal within the new tokens)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not implement MLA extend")

    def forward_mla_extend_expanded(
        self,
        q: torch.Tensor,  # [T, H, nope + rope]: [q_nope | q_rope]
        latent: torch.Tensor,  # [T, Dk]
        expand: ExpandLatent,
        layer: MLAAttention,
        batch: ForwardBatch,
    ) -> torch.Tensor:  # [T, H, v_head_dim]
        """Extend step in the expanded form: store `latent`; per request read the latents of its
        whole sequence (prefix + new), expand the c parts with `expand` (in q's dtype) to per-head
        k_nope and v, and attend with keys `[k_nope | k_rope]` (k_rope shared by all heads)."""
        raise NotImplementedError(f"attention backend {self.name!r} does not implement MLA extend")


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def resolve_backend_name(name: str, device: torch.device) -> str:
    """`"auto"` -> "triton" on CUDA where Triton is installed, else "torch"; other names as given."""
    if name != "auto":
        return name
    import shared.attention.torch_backend  # noqa: F401  (registers "torch")

    return "triton" if device.type == "cuda" and "triton" in _REGISTRY else "torch"


def available_backends() -> list[str]:
    import shared.attention.torch_backend  # noqa: F401  (registers "torch")

    return sorted(_REGISTRY)


def create_backend(name: str) -> AttentionBackend:
    """Instantiate a backend by name; an unknown name is a `ValueError` listing the known ones."""
    import shared.attention.torch_backend  # noqa: F401  (registers "torch")

    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
