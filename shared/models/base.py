"""The interface every model implements; the model runner and loader see only this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from shared.batch import ForwardBatch
    from shared.models.config import ModelConfig


class CausalLM(nn.Module, ABC):
    """A decoder-only language model over a flattened, ragged batch of tokens.

    Construction allocates parameters (uninitialised) under the caller's default device and
    dtype; `load_weights` fills them. Models hold no per-request state: the KV cache lives in
    the batch's pools, reached through the attention layers.
    """

    # True for a model without an lm head, which serves embeddings only (shared/models/embedding.py).
    is_embedding: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] (every token of the batch, flattened) -> hidden [T, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (rows that need a next token) -> logits [N, vocab] float32."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named checkpoint tensors; return the names of the parameters fully loaded."""
