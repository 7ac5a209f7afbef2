"""Token embedding and the output projection (lm head), optionally sharing one weight.

With tensor parallelism both are split along the vocabulary: rank r holds rows
`[r * n, (r + 1) * n)` with `n = ceil(vocab / tp_size)` (the last rank's tail padded with zero
rows). The embedding looks up the ids it holds, zeroes the others and all-reduces; the lm head
computes its slice of the logits and gathers them to rank 0, which samples. At `tp_size == 1` the
slice is the whole vocabulary and no collective runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.distributed import parallel_state
from shared.models.layers.fused import use_kernels
from shared.models.weights import set_weight_loader


class VocabEmbedding(nn.Module):
    """input_ids [T] -> embeddings [T, hidden]; weight [vocab / tp (rounded up), hidden]."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_rank = parallel_state.tp_rank()
        self.tp_size = parallel_state.tp_size()
        rows = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * rows  # this rank's first token id
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"shape mismatch: embedding of {self.vocab_size} tokens x {param.shape[1]}"
                f" vs checkpoint {tuple(loaded.shape)}"
            )
        held = max(0, min(param.shape[0], self.vocab_size - self.vocab_start))
        param.data[held:].zero_()  # padding rows: no token, zero logits (sliced off on rank 0)
        param.data[:held].copy_(loaded.narrow(0, self.vocab_start, held))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.weight.shape[0])  # [T]
        out = F.embedding(torch.where(held, local, 0), self.weight)
        out.mul_(held.unsqueeze(-1).to(out.dtype))  # another rank's tokens contribute zero
        return parallel_state.all_reduce(out)


class ScaledVocabEmbedding(VocabEmbedding):
    """`VocabEmbedding` times sqrt(hidden_size) (Gemma). The factor is first rounded to the
    embeddings' dtype, as HF does (sqrt(3584) = 59.87 becomes 59.75 in bfloat16)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.scale = hidden_size**0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        out = super().forward(input_ids)
        return out * torch.tensor(self.scale, dtype=out.dtype).item()


class LMHead(VocabEmbedding):
    """hidden [N, hidden] -> logits [N, vocab] in float32 (on rank 0 with tensor parallelism;
    the other ranks get their own slice back, which they discard).

    `tie_to(embedding)` makes the head reuse the embedding's parameter, so a tied checkpoint has
    one tensor and one copy in memory.
    """

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # The matmul runs in the model dtype like HF's; the sampler wants float32.
        if use_kernels(hidden):  # one token streams the weight through the GEMV kernel
            from kernels.gemv import linear

            logits = linear(hidden, self.weight).float()
        else:
            logits = F.linear(hidden, self.weight).float()
        if self.tp_size == 1:
            return logits
        # [N, vocab / tp] on each rank -> [N, vocab] on rank 0
        return parallel_state.gather_last_dim(logits)[:, : self.vocab_size]
