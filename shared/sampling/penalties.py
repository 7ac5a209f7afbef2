"""Logit penalties, applied in place before temperature and filtering.

Every penalty is given sparsely, as parallel 1-D tensors of (row, token) pairs, because a
request's history touches a few hundred tokens of a vocabulary of ~100k: a dense [B, V] count
table per step would cost more memory traffic than the model's own logits.

    pair k:   rows[k]  token_ids[k]  (counts[k])
              ------   ------------  -----------
                 0          17            3        # request 0 has produced token 17 three times
                 0          99            1
                 2          17            1

Pairs must be unique (`SamplingBatch.build` guarantees it): the functions gather, transform
and scatter back, so a duplicate pair would be written twice with the same value but counted
once.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_repetition_penalty(logits: Tensor, rows: Tensor, token_ids: Tensor, penalties: Tensor) -> None:
    """CTRL / HF rule on every (row, token) pair: positive logits / p, negative logits * p.

    logits: [B, V] float, modified in place; rows, token_ids: [N] int64 (unique pairs);
    penalties: [B] float32, the row's repetition_penalty (1.0 = none).
    """
    values = logits[rows, token_ids]  # [N]
    p = penalties[rows]  # [N]
    logits[rows, token_ids] = torch.where(values > 0, values / p, values * p)


def apply_frequency_presence_penalty(
    logits: Tensor,
    rows: Tensor,
    token_ids: Tensor,
    counts: Tensor,
    frequency: Tensor,
    presence: Tensor,
) -> None:
    """OpenAI rule: logit -= frequency * count + presence * (count > 0), over output tokens.

    logits: [B, V] float, modified in place; rows, token_ids, counts: [N] int64 (unique pairs,
    counts >= 1); frequency, presence: [B] float32.
    """
    penalty = frequency[rows] * counts.to(logits.dtype) + presence[rows] * (counts > 0)  # [N]
    logits[rows, token_ids] -= penalty


def suppress_tokens(logits: Tensor, rows: Tensor, token_ids: Tensor) -> None:
    """Make (row, token) pairs impossible to sample: used for stop ids before min_new_tokens.

    logits: [B, V] float, modified in place; rows, token_ids: [N] int64.
    """
    logits[rows, token_ids] = float("-inf")
