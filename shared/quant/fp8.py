"""Block-wise FP8 W8A8: what a layer needs to know to hold and run FP8 weights.

Weights are E4M3 in 128 x 128 blocks, each with a float32 dequantization multiplier
(`weight_scale_inv`, DeepSeek-V3's name: w ~= w_q * scale_inv); activations are quantized per
token in groups of 128 along the reduction dimension with dynamic scales, at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn  # E4M3, no infinities: the format DeepSeek-V3 and Hopper use
QUANTIZATION_OPTIONS = (None, "fp8")


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


def resolve_fp8(hf_config: dict[str, Any], quantization: str | None) -> Fp8Config | None:
    """The FP8 settings for a checkpoint and the engine's `quantization` option.

    A config.json `quantization_config` with `quant_method: "fp8"` and a `weight_block_size`
    (DeepSeek-V3's layout) means the weights are stored as FP8: they load as they are, with or
    without the option. Otherwise `quantization="fp8"` quantizes while loading, and None keeps
    the checkpoint's dtype. Anything else is a `ValueError` saying what is supported.
    """
    if quantization not in QUANTIZATION_OPTIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_OPTIONS}, got {quantization!r}")
    qc = hf_config.get("quantization_config")
    if not qc:
        return Fp8Config(checkpoint_is_fp8=False) if quantization == "fp8" else None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"checkpoint quantization {method!r} is not supported (only block-wise fp8)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("FP8 checkpoints with static activation scales are not supported (dynamic only)")
    block = qc.get("weight_block_size")
    if not block or len(block) != 2:
        raise ValueError("FP8 checkpoints without weight_block_size (per-tensor scales) are not supported")
    if int(block[1]) != 128:
        # The activation groups are the weight blocks' width; the kernels run 128-wide groups.
        raise ValueError(f"FP8 weight_block_size {list(block)} is not supported (input blocks must be 128)")
    ignored = tuple(str(m) for m in qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
    return Fp8Config(checkpoint_is_fp8=True, weight_block=(int(block[0]), int(block[1])), ignored=ignored)


def keep_unquantized(model: nn.Module, ignored: tuple[str, ...]) -> None:
    """Leave the layers a checkpoint does not quantize (`modules_to_not_convert`) in the model
    dtype; called after construction, before loading. A name matches by module-path prefix."""
    if not ignored:
        return
    for name, module in model.named_modules():
        hook = getattr(module, "keep_unquantized", None)
        if callable(hook) and any(name == m or name.startswith(m + ".") for m in ignored):
            hook()
