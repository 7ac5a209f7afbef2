"""Embeddings from a decoder: pool a prompt's final hidden states (after the last norm) into one vector.

An embedding request runs its prompt like any prefill and finishes at the end of it: no token is
sampled, no lm head is applied. The model runner pools the rows of the hidden states that belong
to the request (`Pooler`), the engine reports the vector in the request's final output.

    pooling  "last"  the hidden state of the prompt's last token (e5-mistral, Qwen3-Embedding)
             "mean"  the mean over every prompt token
    then     dimensions: keep the first `dimensions` components (Matryoshka), then
             normalize:  divide by the L2 norm

Under chunked prefill a long prompt runs in several steps: mean pooling keeps a running sum per
request (float32) until the last chunk. Mean pooling needs every token's hidden state, so such a
request computes its whole prompt (no radix-cache prefix); last-token pooling may reuse a cached
prefix, since only the last token's hidden state is read and it attends to the cached K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from shared.errors import InvalidRequest

PoolingType = Literal["last", "mean"]


@dataclass(frozen=True)
class PoolingParams:
    """How one embedding request turns hidden states into its vector."""

    pooling: PoolingType = "last"
    normalize: bool = True
    dimensions: int | None = None  # None: the model's hidden size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolingParams:
        unknown = set(d) - {"pooling", "normalize", "dimensions"}
        if unknown:
            raise InvalidRequest(f"unknown pooling options: {sorted(unknown)}", param="pooling")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize, "dimensions": self.dimensions}

    def verify(self, hidden_size: int) -> None:
        """Bad values are `InvalidRequest` naming the field."""
        if self.pooling not in ("last", "mean"):
            raise InvalidRequest(f"pooling must be 'last' or 'mean', got {self.pooling!r}", param="pooling")
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= hidden_size):
            raise InvalidRequest(
                f"dimensions must be an integer in [1, {hidden_size}], got {d!r}", param="dimensions"
            )


PartialSum = tuple[torch.Tensor, int]  # mean pooling across chunks: (sum of rows [H] float32, rows)


def pool_chunk(
    hidden: torch.Tensor, params: PoolingParams, partial: PartialSum | None, last: bool
) -> tuple[torch.Tensor | None, PartialSum | None]:
    """Pool one step's rows of one request. hidden: [n, H], the request's new rows this step;
    `partial` is what earlier chunks of its prompt left (None on the first chunk); `last` says
    the prompt ends this step. Returns (the finished vector [dims] float32 when `last`, the
    partial sum to keep for the next chunk)."""
    if params.pooling == "last":
        return (finish(hidden[-1].float(), params) if last else None), None
    chunk = hidden.float().sum(dim=0)  # [H]
    total, count = (
        (chunk, hidden.shape[0]) if partial is None else (partial[0] + chunk, partial[1] + hidden.shape[0])
    )
    if not last:
        return None, (total, count)
    return finish(total / count, params), None


def finish(vec: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Truncate to `dimensions`, then L2-normalize if asked. vec: [H] float32."""
    if params.dimensions is not None:
        vec = vec[: params.dimensions]
    if params.normalize:
        vec = torch.nn.functional.normalize(vec, dim=-1)
    return vec
