"""DeepSeek-V3 (and R1): DeepSeek-V2's architecture with the V3 router and an optional rope layout.

Differences from V2 that matter here: the MoE router is "noaux_tc" (sigmoid scores, a learned
per-expert bias for the choice, group-limited by top-2 sums; see moe_router.py) even where
config.json names no `topk_method`, and the rope dims are interleaved only when `rope_interleave`
is true (the default, and what the released checkpoints use). The multi-token-prediction layer
(`model.layers.{num_hidden_layers}.*`) is skipped by the shared loading code.
"""

from __future__ import annotations

from typing import ClassVar

from shared.models.config import ModelConfig
from shared.models.deepseek_v2 import DeepseekV2ForCausalLM


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 causal LM (DeepSeek-V2's interface and weight names)."""

    default_topk_method: ClassVar[str] = "noaux_tc"

    @classmethod
    def rope_interleaved(cls, config: ModelConfig) -> bool:
        return bool(config.hf_config.get("rope_interleave", True))
