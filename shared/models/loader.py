"""Load a Hugging Face checkpoint directory into one of our models.

Tensors are streamed shard by shard through safetensors' memory-mapped `safe_open`, each copied
straight into the parameter whose `weight_loader` claims it, so the checkpoint never exists twice
in memory. The model is constructed under the target device and dtype as defaults: parameters are
born in their final place and format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from shared.models.base import CausalLM
from shared.models.config import ModelConfig
from shared.models.registry import get_model_class
from shared.quant.fp8 import keep_unquantized, resolve_fp8

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Show progress for checkpoints that take noticeable time to read.
_PROGRESS_BYTES = 1 << 30


def load_model(
    model_path: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    quantization: str | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """Build the model for `model_path`'s architecture on `device` in `dtype` and load its weights.

    `quantization="fp8"` quantizes an unquantized checkpoint's linear layers to block-wise FP8
    while loading; a checkpoint whose config.json carries an FP8 `quantization_config`
    (DeepSeek-V3's layout) loads as FP8 whatever the option (see `resolve_fp8`).

    Raises `FileNotFoundError` (with the path) for a missing directory, config.json, weights or
    shard; `ValueError` for an unsupported architecture or quantization, a tensor matching no
    parameter, a shape mismatch, or a parameter the checkpoint did not provide.
    """
    path = Path(model_path)
    config = ModelConfig.from_model_path(path)
    config = dataclasses.replace(config, quant=resolve_fp8(config.hf_config, quantization))
    files = weight_files(path)
    model_cls = get_model_class(config, bare_stack=is_bare_stack(files))
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(config)
        if config.quant is not None:
            keep_unquantized(model, config.quant.ignored)
    loaded = model.load_weights(iter_weights(files))
    expected = {name for name, _ in model.named_parameters()}
    if config.tie_word_embeddings or model.is_embedding:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for parameters: {', '.join(missing)}")
    process_weights_after_loading(model)
    return model.eval(), config


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Call every module's `process_weights_after_loading()` hook, children before parents:
    FP8 quantization of linear layers first, then what is derived from them (MLA's absorbed
    weights)."""
    for module in reversed(list(model.modules())):  # modules() is pre-order: reversed, children first
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook):
            hook()


def is_bare_stack(files: list[Path]) -> bool:
    """Whether the checkpoint stores the decoder stack without the `model.` prefix (embedding
    checkpoints: `embed_tokens.weight`, `layers.0...`)."""
    with safe_open(str(files[0]), framework="pt", device="cpu") as f:
        names = list(f.keys())
    return "embed_tokens.weight" in names or any(n.startswith("layers.") for n in names)


def weight_files(model_path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard its index names."""
    index = model_path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [model_path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint shard {file} listed in {index} not found")
        return files
    single = model_path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {model_path}")


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every file, one memory-mapped file at a time."""
    total = sum(f.stat().st_size for f in files)
    show = (len(files) > 1 or total > _PROGRESS_BYTES) and sys.stderr.isatty()
    for file in tqdm(files, desc="Loading weights", unit="shard", disable=not show):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                yield name, f.get_tensor(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
