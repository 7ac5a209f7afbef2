"""Token embedding and the output projection (lm head), optionally sharing one weight.

With tensor parallelism both would be split along the vocabulary; the weight loaders take rows
`[tp_rank * n, (tp_rank + 1) * n)` of the checkpoint tensor, which is all of it at `tp_size == 1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.layers.fused import use_kernels
from shared.models.layers.linear import TP_RANK, TP_SIZE
from shared.models.weights import set_weight_loader


class VocabEmbedding(nn.Module):
    """input_ids [T] -> embeddings [T, hidden]; weight [vocab, hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        assert vocab_size % TP_SIZE == 0, (vocab_size, TP_SIZE)
        self.vocab_size = vocab_size
        self.tp_rank = TP_RANK
        self.weight = nn.Parameter(torch.empty(vocab_size // TP_SIZE, hidden_size), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        if tuple(loaded.shape) != (rows * TP_SIZE, param.shape[1]):
            raise ValueError(
                f"shape mismatch: embedding {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}"
            )
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(VocabEmbedding):
    """hidden [N, hidden] -> logits [N, vocab] in float32.

    `tie_to(embedding)` makes the head reuse the embedding's parameter, so a tied checkpoint has
    one tensor and one copy in memory.
    """

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The matmul runs in the model dtype like HF's; the sampler wants float32.
        if use_kernels(hidden):  # one token streams the weight through the GEMV kernel
            from kernels.gemv import linear

            return linear(hidden, self.weight).float()
        return F.linear(hidden, self.weight).float()
