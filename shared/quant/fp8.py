"""Block-wise FP8 W8A8: what a layer needs to know to hold and run FP8 weights.

Weights are E4M3 in 128 x 128 blocks, each with a float32 dequantization multiplier
(`weight_scale_inv`, DeepSeek-V3's name: w ~= w_q * scale_inv); activations are quantized per
token in groups of 128 along the reduction dimension with dynamic scales, at run time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fp8Config:
    """How a model's linear layers hold FP8 weights (immutable, shared by every layer)."""

    # True: the checkpoint ships E4M3 weights + `weight_scale_inv` (loaded as they are);
    # False: it ships bf16/fp32 weights, quantized while loading (`quantization="fp8"`).
    checkpoint_is_fp8: bool = False
    weight_block: tuple[int, int] = (128, 128)  # [output rows, input columns] per scale
    # Module-name parts left unquantized (a checkpoint's `modules_to_not_convert`).
    ignored: tuple[str, ...] = ()

    @property
    def group_size(self) -> int:
        """Activation quantization group along the reduction dimension (= the weight block's)."""
        return self.weight_block[1]
