"""The random-weight checkpoints the benchmarks build (bench/gpu_bench.py `build_model`, which
`bench/serving.py --make-model` runs): their config names the tokenizer's own special tokens, so
an engine serving one stops on the end of a text or of a chat turn, as a real model does."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from bench.gpu_bench import PRESETS, build_model
from shared.models.config import ModelConfig


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek"])
def test_a_bench_checkpoint_stops_on_its_tokenizers_end_tokens(tmp_path: Path, preset: str) -> None:
    args = argparse.Namespace(**{"arch": "llama", **PRESETS[preset]})
    build_model(args, tmp_path, torch.device("cpu"))
    config = json.loads((tmp_path / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (
        tokenizer.convert_ids_to_tokens(config["bos_token_id"]) == tokenizer.bos_token == "<|begin_of_text|>"
    )
    ends = tokenizer.convert_ids_to_tokens(config["eos_token_id"])
    assert ends == [tokenizer.eos_token, "<|im_end|>"]  # the chat template ends a turn with the latter
    assert ModelConfig.from_model_path(tmp_path).eos_token_ids == frozenset(config["eos_token_id"])
