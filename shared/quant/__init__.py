"""Weight and KV-cache quantization: block-wise FP8 (W8A8) and its loading rules."""

from __future__ import annotations

from shared.quant.fp8 import Fp8Config

__all__ = ["Fp8Config"]
