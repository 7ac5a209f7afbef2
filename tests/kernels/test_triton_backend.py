"""The "triton" attention backend against the "torch" one: the same logits for a model forward,
and the same greedy tokens from the full engine under continuous batching, chunked prefill,
paging, cached prefixes and a sliding window (float32, tiny models; on CPU under the interpreter)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shared.attention import create_backend
from shared.attention.testing import single_sequence_batch
from shared.attention.triton_backend import TritonAttentionBackend
from shared.config import EngineConfig
from shared.engine_core import EngineCore
from shared.models import load_model
from shared.sampling import SamplingParams

pytestmark = pytest.mark.kernels

NEW_TOKENS = 6


def test_backend_is_registered_as_triton() -> None:
    assert isinstance(create_backend("triton"), TritonAttentionBackend)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_model_logits_match_torch_backend(
    tiny_model_factory: Callable[..., Path], device: torch.device, arch: str
) -> None:
    """One prefill through the whole model: every layer's attention, compared as logits."""
    overrides = {"sliding_window": 8} if arch == "mistral" else {}
    model, config = load_model(tiny_model_factory(arch, **overrides), torch.float32, device)
    ids = torch.tensor([3, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64], device=device)
    positions = torch.arange(ids.shape[0], device=device)
    logits = {}
    for backend in ("torch", "triton"):
        batch = single_sequence_batch(ids, config, backend=backend)
        with torch.inference_mode():
            logits[backend] = model.compute_logits(model(ids, positions, batch))
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


def _greedy_outputs(core: EngineCore, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Add request i at step i (so prefills, chunks and decodes mix); step until all finish."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or core.has_work:
        if pending and pending[0][0] <= step:
            i, ids = pending.pop(0)
            core.add_request([f"r{i}"], ids, params)
        for out in core.step():
            outputs.setdefault(out.rid, []).extend(out.new_ids)
        step += 1
        assert step < 500, "engine made no progress"
    core.check_idle()
    return outputs


def _greedy_by_backend(
    path: Path, device: torch.device, prompts: list[list[int]], **options: object
) -> dict[str, dict[str, list[int]]]:
    """backend -> greedy outputs of the full engine (float32, chunks of 16) under each backend."""
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig.from_options(
            str(path),
            device=device.type,
            dtype="float32",
            chunked_prefill_size=16,
            attention_backend=backend,
            debug_invariants=True,
            **options,
        )
        outputs[backend] = _greedy_outputs(EngineCore(config), prompts)
    return outputs


@pytest.mark.parametrize(
    ("arch", "overrides", "page_size"),
    [("llama", {}, 1), ("llama", {}, 16), ("mistral", {"sliding_window": 8}, 4)],
    ids=["llama-page1", "llama-page16", "mistral-window8"],
)
def test_engine_greedy_parity_with_torch_backend(
    tiny_model_factory: Callable[..., Path],
    device: torch.device,
    arch: str,
    overrides: dict[str, int],
    page_size: int,
) -> None:
    path = tiny_model_factory(arch, **overrides)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 500) for _ in range(n)] for n in (3, 29, 12, 1)]
    prompts.append([*prompts[1][:20], 7, 8])  # shares a cached prefix with prompt 1
    # chunked_prefill_size 16: the 29-token prompt runs in two chunks
    outputs = _greedy_by_backend(path, device, prompts, page_size=page_size)
    assert outputs["triton"] == outputs["torch"]
    assert all(len(ids) == NEW_TOKENS for ids in outputs["triton"].values())


# ---- MLA (DeepSeek): the triton backend's absorbed decode, absorbed and expanded extend ----------

# The MLA decode kernel takes power-of-two parts of at least 16 (the latent 32, the rope key 16).
_MLA = {"qk_rope_head_dim": 16}


@pytest.mark.parametrize("form", ["absorbed", "expanded"])
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_model_logits_match_torch_backend(
    tiny_model_factory: Callable[..., Path], device: torch.device, arch: str, form: str
) -> None:
    from tests.engine.test_deepseek import set_extend_form

    model, config = load_model(tiny_model_factory(arch, **_MLA), torch.float32, device)
    set_extend_form(model, form)
    ids = torch.tensor([3, 17, 250, 33, 101, 7, 480, 12, 12, 99, 300, 5, 64], device=device)
    logits = {}
    for backend in ("torch", "triton"):
        batch = single_sequence_batch(ids, config, backend=backend)
        with torch.inference_mode():
            logits[backend] = model.compute_logits(model(ids, batch.positions, batch))
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("arch", "overrides", "kv_cache_dtype"),
    [("deepseek_v3", _MLA, "auto"), ("deepseek_v2", _MLA, "fp8_e4m3"), ("llama", {}, "fp8_e4m3")],
    ids=["deepseek_v3", "deepseek_v2-fp8kv", "llama-fp8kv"],
)
def test_mla_and_fp8_kv_engine_greedy_parity_with_torch_backend(
    tiny_model_factory: Callable[..., Path],
    device: torch.device,
    arch: str,
    overrides: dict[str, int],
    kv_cache_dtype: str,
) -> None:
    """Decode (absorbed), both extend forms as the engine picks them (a fresh chunk expanded, a
    short extend after a cached prefix absorbed), paging and an FP8 pool: the same tokens."""
    path = tiny_model_factory(arch, **overrides)
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 500) for _ in range(n)] for n in (3, 29, 12)]
    prompts.append([*prompts[1][:24], 7, 8])  # a long cached prefix: the absorbed form
    outputs = _greedy_by_backend(path, device, prompts, page_size=4, kv_cache_dtype=kv_cache_dtype)
    assert outputs["triton"] == outputs["torch"]
