"""HF transformers as the numerical oracle: greedy continuations on the same weights, float32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


@lru_cache(maxsize=8)
def _hf_model(path: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy decoding, ignoring EOS (the engine runs with ignore_eos). Each step re-runs the
    whole sequence: slower than HF's cache, but it is the plainest oracle across HF versions."""
    model = _hf_model(str(path))
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]), use_cache=False).logits  # [1, L, V]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
