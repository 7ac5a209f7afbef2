"""Tiny Hugging Face model directories for tests: a trained tokenizer plus random weights.

`make_tiny_model(out_dir, arch)` writes config.json, generation_config.json, safetensors
weights and the tokenizer for one of `ARCHS`; `build_tokenizer(out_dir)` writes only the
tokenizer. Nothing is downloaded. Command line: `python -m shared.tiny_model --help`.
"""

from __future__ import annotations

from shared.tiny_model.maker import ARCHS, make_tiny_model
from shared.tiny_model.tokenizer import build_tokenizer

__all__ = ["ARCHS", "build_tokenizer", "make_tiny_model"]
