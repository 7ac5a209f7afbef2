"""MoE routers of DeepSeek-V2/V3: which k experts each token goes to, and with what weight.

Two variants, chosen by config.json's `topk_method`, each computing exactly what Hugging Face's
`DeepseekV2TopkRouter` / `DeepseekV3TopkRouter` compute:

    softmax (V2)    scores = softmax(logits)
                    "greedy": top-k experts over all scores
                    "group_limited_greedy": keep the `topk_group` groups with the highest max
                    score, zero the other groups' scores, top-k among what is left
                    weights = chosen scores * routed_scaling_factor
    noaux_tc (V3)   scores = sigmoid(logits); choice scores = scores + e_score_correction_bias
                    groups ranked by the sum of their top-2 choice scores, keep `topk_group`,
                    top-k experts among them by choice score; weights = the unbiased scores,
                    normalised to sum 1 when norm_topk_prob, times routed_scaling_factor

The gate weight (and the V3 bias) stay float32 whatever the model dtype, and the logits are
computed in float32, as HF keeps `gate.weight` in float32: routing near a tie must not depend on
the activation dtype's rounding of the weight.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.weights import default_weight_loader, set_weight_loader


class TopKRouter(nn.Module, ABC):
    """hidden [T, H] -> (topk_weights [T, k] float32, topk_ids [T, k] int64); parameter `weight`
    [E, H] float32 (checkpoint name `mlp.gate.weight`)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        routed_scaling_factor: float,
        n_group: int,
        topk_group: int,
    ) -> None:
        super().__init__()
        if num_experts % n_group:
            raise ValueError(f"n_routed_experts {num_experts} is not a multiple of n_group {n_group}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False
        )
        set_weight_loader(self.weight, default_weight_loader)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, E] float32
        return F.linear(hidden.float(), self.weight)

    def group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:  # [T, G] -> [T, E] bool
        """True for the experts of each token's `topk_group` best groups."""
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]  # [T, g]
        mask = torch.zeros_like(group_scores)
        mask.scatter_(1, group_idx, 1)
        per_group = self.num_experts // self.n_group
        return mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, self.num_experts).bool()

    @abstractmethod
    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> (topk_weights [T, k] float32, topk_ids [T, k] int64)."""


class SoftmaxTopKRouter(TopKRouter):
    """DeepSeek-V2: softmax scores, "greedy" or "group_limited_greedy" choice."""

    def __init__(self, *args: Any, topk_method: str, norm_topk_prob: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method {topk_method!r} is not a softmax router method")
        self.topk_method = topk_method
        self.norm_topk_prob = norm_topk_prob

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.logits(hidden).softmax(dim=-1, dtype=torch.float32)  # [T, E]
        if self.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.num_experts // self.n_group).max(dim=-1).values
            scores = scores.masked_fill(~self.group_mask(group_scores), 0.0)
        topk_weights, topk_ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [T, k]
        if self.top_k > 1 and self.norm_topk_prob:
            # DeepSeek's own V2 code normalises instead of scaling; HF ignores the flag (every
            # released V2 checkpoint sets it false, where both agree).
            return topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20), topk_ids
        return topk_weights * self.routed_scaling_factor, topk_ids


class NoAuxTCRouter(TopKRouter):
    """DeepSeek-V3: sigmoid scores, choice biased by `e_score_correction_bias` [E] float32
    (checkpoint name `mlp.gate.e_score_correction_bias`), group-limited by top-2 sums."""

    def __init__(self, *args: Any, norm_topk_prob: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norm_topk_prob = norm_topk_prob
        self.e_score_correction_bias = nn.Parameter(
            torch.empty(self.num_experts, dtype=torch.float32), requires_grad=False
        )
        set_weight_loader(self.e_score_correction_bias, default_weight_loader)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.logits(hidden).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias  # [T, E]
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        choice = choice.masked_fill(~self.group_mask(group_scores), float("-inf"))
        topk_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.routed_scaling_factor, topk_ids


def make_router(hf_config: dict[str, Any], hidden_size: int, default_topk_method: str) -> TopKRouter:
    """The router a DeepSeek config.json asks for (`topk_method`, else `default_topk_method`)."""
    c = hf_config
    common = {
        "hidden_size": hidden_size,
        "num_experts": int(c["n_routed_experts"]),
        "top_k": int(c["num_experts_per_tok"]),
        "routed_scaling_factor": float(c.get("routed_scaling_factor", 1.0)),
        "n_group": int(c.get("n_group") or 1),
        "topk_group": int(c.get("topk_group") or 1),
    }
    method = c.get("topk_method") or default_topk_method
    norm = bool(c.get("norm_topk_prob", False))
    if method == "noaux_tc":
        if c.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError("topk_method noaux_tc needs scoring_func sigmoid")
        return NoAuxTCRouter(norm_topk_prob=norm, **common)
    if c.get("scoring_func", "softmax") != "softmax":
        raise ValueError(f"topk_method {method!r} needs scoring_func softmax")
    return SoftmaxTopKRouter(topk_method=method, norm_topk_prob=norm, **common)
