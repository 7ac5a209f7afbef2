"""Write an FP8 copy of a checkpoint in DeepSeek-V3's layout: offline block-wise quantization.

Every linear projection's weight (`*_proj.weight`, `kv_a_proj_with_mqa.weight`, the experts')
becomes E4M3 with a float32 `<name>_scale_inv` of one multiplier per 128 x 128 block; embeddings,
norms, the lm head and MoE router gates stay as they are. config.json gains the
`quantization_config` DeepSeek-V3 ships with, so the engine loads the result directly as FP8.
The same rounding as `quantization="fp8"` while loading (`kernels.fp8_quant.block_quant_fp8`), so
both paths hold identical weights. Command line: `python -m shared.quant.checkpoint SRC DST`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.models.loader import INDEX_FILE, weight_files

WEIGHT_BLOCK = (128, 128)
# Linear projections: q/k/v/o, gate/up/down (dense, shared and routed experts), MLA's a/b.
_QUANTIZED = re.compile(r"(_proj|_proj_with_mqa)\.weight$")


def quantization_config(block: tuple[int, int] = WEIGHT_BLOCK) -> dict[str, object]:
    """config.json's `quantization_config` for block-wise FP8 with dynamic activation scales."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether the FP8 layout stores checkpoint tensor `name` as E4M3 with block scales."""
    return tensor.dim() == 2 and _QUANTIZED.search(name) is not None


def write_fp8_checkpoint(src: str | Path, dst: str | Path, block: tuple[int, int] = WEIGHT_BLOCK) -> Path:
    """Quantize checkpoint directory `src` into `dst` (created; tokenizer and other files copied).

    Shards keep their names and tensor grouping; an index is rewritten to list the scales.
    """
    from kernels.fp8_quant import block_quant_fp8

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("write the FP8 checkpoint to a different directory")
    dst.mkdir(parents=True, exist_ok=True)
    files = weight_files(src)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json", INDEX_FILE):
            shutil.copy2(item, dst / item.name)
    weight_map: dict[str, str] = {}
    total = 0
    for file in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensor = f.get_tensor(name)
                if is_quantized(name, tensor):
                    w_q, scale_inv = block_quant_fp8(tensor.float(), block)
                    out[name] = w_q
                    out[f"{name}_scale_inv"] = scale_inv
                else:
                    out[name] = tensor
        tensors = {k: v.contiguous() for k, v in out.items()}
        save_file(tensors, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file.name))
        total += sum(t.numel() * t.element_size() for t in out.values())
    if (src / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config(block)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.quant.checkpoint",
        description="Write a block-wise FP8 (DeepSeek-V3 layout) copy of a Hugging Face checkpoint.",
    )
    parser.add_argument("src", help="checkpoint directory (bf16/fp16/fp32 safetensors)")
    parser.add_argument("dst", help="output directory")
    args = parser.parse_args(argv)
    print(write_fp8_checkpoint(args.src, args.dst))


if __name__ == "__main__":
    main()
