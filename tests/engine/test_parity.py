"""Greedy parity with HF transformers under continuous batching, chunked prefill, paging,
prefix reuse and retraction (float32, same weights, the torch attention backend)."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.config import EngineConfig
from shared.engine_core import EngineCore
from shared.sampling import SamplingParams
from shared.tiny_model import ARCHS
from tests.engine.hf_reference import hf_greedy

NEW_TOKENS = 12


@functools.cache
def _hf_greedy_cached(path: Path, prompt_ids: tuple[int, ...], max_new_tokens: int) -> tuple[int, ...]:
    return tuple(hf_greedy(path, list(prompt_ids), max_new_tokens))


def hf_greedy_cached(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """`hf_greedy`, remembered for the session: parametrizations over page size and chunking
    ask HF for the same continuations (HF re-runs the whole sequence per token)."""
    return list(_hf_greedy_cached(path, tuple(prompt_ids), max_new_tokens))


def make_prompts(vocab: int, count: int = 8, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 41, 17, 8, 29, 1, 33, 12, 24, 5][:count]
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def run_staggered(
    core: EngineCore, prompts: list[list[int]], max_new_tokens: int = NEW_TOKENS
) -> dict[str, list[int]]:
    """Add request i at step 2*i (they arrive while others run); step until all finish."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    step = 0
    pending = list(enumerate(prompts))
    while pending or core.has_work:
        while pending and pending[0][0] * 2 <= step:
            i, ids = pending.pop(0)
            core.add_request([f"r{i}"], ids, params)
        for out in core.step():
            outputs.setdefault(out.rid, []).extend(out.new_ids)
            if out.finished:
                finished.add(out.rid)
        step += 1
        assert step < 2000, "engine made no progress"
    assert finished == {f"r{i}" for i in range(len(prompts))}
    core.check_idle()
    return outputs


def run_alone(core: EngineCore, rid: str, ids: list[int]) -> tuple[list[int], int]:
    """One greedy request run to the end on an otherwise idle engine: (its tokens, the cached
    prompt tokens it reported)."""
    core.add_request([rid], ids, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    out_ids: list[int] = []
    cached = -1
    while core.has_work:
        for out in core.step():
            out_ids += out.new_ids
            cached = out.cached_tokens
    return out_ids, cached


def attention_backend(arch: str) -> str:
    """The backend an arch's parity runs on: Gemma 2's soft-capping exists on the torch backend
    only (the triton one refuses it); the others take the default (triton on a GPU)."""
    return "torch" if arch == "gemma2" else "auto"


def build_core(path: Path, **options: object) -> EngineCore:
    # A fixed pool: on a GPU the default sizes it from free memory, and a test holding several
    # engines would leave the later ones none.
    options.setdefault("max_total_tokens", 4096)
    return EngineCore(EngineConfig.from_options(str(path), debug_invariants=True, **options))


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity_with_hf(
    tiny_model_factory: Callable[..., Path], arch: str, chunked: bool, page_size: int
) -> None:
    path = tiny_model_factory(arch)
    core = build_core(
        path,
        page_size=page_size,
        chunked_prefill_size=16 if chunked else -1,
        attention_backend=attention_backend(arch),
    )
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy_cached(path, ids, NEW_TOKENS), f"prompt {i} (len {len(ids)})"


@pytest.mark.parametrize("page_size", [1, 16])
def test_retraction_keeps_parity(tiny_model_factory: Callable[..., Path], page_size: int) -> None:
    """A pool far too small for the batch: requests are retracted and requeued, and still match HF."""
    path = tiny_model_factory("llama")
    core = build_core(path, page_size=page_size, max_total_tokens=80, chunked_prefill_size=32)
    prompts = make_prompts(core.runner.vocab_size, seed=1)
    prompts = [p[:30] for p in prompts]  # each fits alone with its output, all together do not
    outputs = run_staggered(core, prompts, max_new_tokens=20)
    assert core.scheduler.num_retractions > 0
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, 20), f"prompt {i}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefix_reuse_reports_cached_tokens_and_keeps_output(
    tiny_model_factory: Callable[..., Path], page_size: int
) -> None:
    path = tiny_model_factory("qwen3")
    core = build_core(path, page_size=page_size)
    vocab = core.runner.vocab_size
    rng = random.Random(7)
    shared_prefix = [rng.randrange(5, vocab) for _ in range(70)]
    first = shared_prefix + [rng.randrange(5, vocab) for _ in range(5)]
    second = shared_prefix + [rng.randrange(5, vocab) for _ in range(9)]
    out1, cached1 = run_alone(core, "a", first)
    out2, cached2 = run_alone(core, "b", second)
    assert cached1 == 0
    assert cached2 >= 64 and cached2 <= 70 and cached2 % page_size == 0
    assert out1 == hf_greedy(path, first, NEW_TOKENS)
    assert out2 == hf_greedy(path, second, NEW_TOKENS)
    core.check_idle()


def test_lpm_policy_and_disabled_cache_keep_parity(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("qwen2")
    for options in ({"schedule_policy": "lpm"}, {"disable_radix_cache": True}):
        core = build_core(path, **options)
        prompts = make_prompts(core.runner.vocab_size, seed=3)
        prompts += [prompts[1] + [7, 8, 9], prompts[6] + [10]]  # share long prefixes with earlier ones
        outputs = run_staggered(core, prompts)
        for i, ids in enumerate(prompts):
            assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"{options} prompt {i}"


def test_mistral_sliding_window_matches_hf(tiny_model_factory: Callable[..., Path]) -> None:
    """A window of 8 tokens, far shorter than the prompts: every masked key must stay masked,
    also across chunks and cached prefixes."""
    path = tiny_model_factory("mistral", sliding_window=8)
    core = build_core(path, page_size=4, chunked_prefill_size=16)
    prompts = make_prompts(core.runner.vocab_size, seed=5)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"
