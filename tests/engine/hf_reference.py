"""HF transformers as the numerical oracle: greedy continuations on the same weights, float32."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM


def load_hf(path: str | Path, auto_class: Any = AutoModelForCausalLM) -> torch.nn.Module:
    """The checkpoint in HF transformers, float32, with the plain ("eager") attention: other
    implementations are not the same oracle in every version (transformers 5.17's default SDPA
    path drops Gemma 2's attention soft-capping; 5.24's does not)."""
    return auto_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@lru_cache(maxsize=8)
def _hf_model(path: str) -> torch.nn.Module:
    return load_hf(path)


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


@torch.inference_mode()
def hf_greedy_constrained(
    path: Path, prompt_ids: list[int], max_new_tokens: int, matcher: object
) -> list[int]:
    """HF greedy decoding under an xgrammar matcher, masked with xgrammar's own kernel (not the
    engine's): stops after the token that completes the grammar."""
    import xgrammar as xgr

    assert isinstance(matcher, xgr.GrammarMatcher)
    model = _hf_model(str(path))
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]), use_cache=False).logits[:, -1].float()  # [1, V]
        bitmask = xgr.allocate_token_bitmask(1, logits.shape[1])
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask, backend="torch_native")
        token = int(logits[0].argmax())
        assert matcher.accept_token(token)
        ids.append(token)
        if matcher.is_terminated():
            break
    return ids[len(prompt_ids) :]
