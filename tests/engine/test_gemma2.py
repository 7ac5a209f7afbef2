"""Gemma 2 (shared/models/gemma2.py) against HF transformers, beyond the per-architecture runs
(tests/engine/test_parity.py: continuous batching and chunked prefill at page sizes 1 and 16;
test_models.py: logits, `layer_types`, cached-prefix decode; test_overlap.py): prefix reuse and
retraction across the sliding window, the offline Engine, the embedder, config defaults, and the
start-up refusal of attention backends without soft-capping.

The tiny checkpoint has a window of 8 on layer 0 (every prompt here is longer), attention scores
capped at 5.0 and logits at 3.0: enough to change the greedy tokens if either were dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from shared import Engine
from shared.attention import available_backends
from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.engine_core import EngineCore
from shared.models import ModelConfig
from shared.pooling import PoolingParams
from shared.sampling import SamplingParams
from tests.engine.hf_reference import hf_greedy, load_hf
from tests.engine.test_embeddings import hf_embedding, run
from tests.engine.test_parity import NEW_TOKENS, build_core, make_prompts, run_alone, run_staggered

TORCH = {"attention_backend": "torch"}


@pytest.fixture(scope="module")
def gemma2(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("gemma2")


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_reuse_across_the_window(gemma2: Path, page_size: int) -> None:
    """The second prompt reuses 40 cached tokens (5 windows): its new tokens must see exactly the
    last 8 keys on the sliding layer, cached or not, and all of them on the full one."""
    core = build_core(gemma2, page_size=page_size, chunked_prefill_size=16, **TORCH)
    vocab = core.runner.vocab_size
    rng = random.Random(11)
    prefix = [rng.randrange(5, vocab) for _ in range(40)]
    first = prefix + [rng.randrange(5, vocab) for _ in range(5)]
    second = prefix + [rng.randrange(5, vocab) for _ in range(9)]
    out1, cached1 = run_alone(core, "a", first)
    out2, cached2 = run_alone(core, "b", second)
    assert cached1 == 0
    assert 40 - page_size < cached2 <= 40 and cached2 % page_size == 0
    assert out1 == hf_greedy(gemma2, first, NEW_TOKENS)
    assert out2 == hf_greedy(gemma2, second, NEW_TOKENS)
    core.check_idle()


def test_retraction_and_lpm_keep_parity(gemma2: Path) -> None:
    """A pool too small for the batch (requests retracted, then recomputed past their cached
    prefix) under longest-prefix-match scheduling, with prompts sharing prefixes."""
    core = build_core(
        gemma2, page_size=4, max_total_tokens=80, chunked_prefill_size=32, schedule_policy="lpm", **TORCH
    )
    prompts = [p[:30] for p in make_prompts(core.runner.vocab_size, seed=1)]
    prompts += [[*prompts[1][:20], 7, 8, 9]]
    outputs = run_staggered(core, prompts, max_new_tokens=20)
    assert core.scheduler.num_retractions > 0
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(gemma2, ids, 20), f"prompt {i}"


def test_logprobs_come_from_the_capped_logits(gemma2: Path) -> None:
    """Greedy tokens cannot tell the final soft-cap (a monotone map) from none; logprobs can."""
    core = build_core(gemma2, page_size=4, chunked_prefill_size=16, **TORCH)
    prompt = make_prompts(core.runner.vocab_size, count=2, seed=9)[1]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    core.add_request(["lp"], prompt, params, True)
    ids: list[int] = []
    logprobs: list[float] = []
    while core.has_work:
        for out in core.step():
            ids += out.new_ids
            logprobs += out.new_logprobs
    hf = load_hf(gemma2)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]  # [6, V], capped
    want = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), want, atol=1e-4, rtol=0)


def test_offline_engine_generate_matches_hf(gemma2: Path) -> None:
    greedy = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    texts = ["The quick brown fox jumps over the lazy dog, again and again", "a b c"]
    with Engine(model_path=str(gemma2), page_size=4, **TORCH) as engine:
        outs = engine.generate(texts, greedy)
        assert isinstance(outs, list)
        for text, out in zip(texts, outs):
            ids = engine.tokenizer(text)["input_ids"]
            assert len(ids) > 8 or text == "a b c"
            assert out["output_ids"] == hf_greedy(gemma2, ids, 10), text


def test_embedder_matches_hf(tiny_model_factory: Callable[..., Path]) -> None:
    """A `Gemma2Model` checkpoint (bge-multilingual-gemma2's layout) serves embeddings."""
    path = tiny_model_factory("gemma2", embedding=True)
    core = EngineCore(EngineConfig.from_options(str(path), page_size=4, chunked_prefill_size=16, **TORCH))
    assert core.runner.is_embedding
    ids = list(range(3, 40))
    core.add_request(["e"], ids, SamplingParams(), pooling=PoolingParams())
    got = torch.tensor(run(core)["e"].embedding)
    torch.testing.assert_close(got, hf_embedding(path, ids, "last"), atol=1e-4, rtol=1e-4)


def test_config_defaults_follow_transformers() -> None:
    """Released Gemma 2 configs leave out keys whose transformers defaults matter (tied weights)."""
    config = ModelConfig.from_dict(
        {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 512,
            "final_logit_softcapping": None,
        }
    )
    assert config.tie_word_embeddings and config.head_dim == 256 and config.sliding_window == 4096
    assert config.hf_config["attn_logit_softcapping"] == 50.0
    assert config.hf_config["final_logit_softcapping"] is None  # an explicit null stays null


# ---- backends without soft-capping --------------------------------------------------------------

needs_triton = pytest.mark.skipif("triton" not in available_backends(), reason="needs Triton installed")
REFUSAL = r"Gemma2ForCausalLM needs attention logit soft-capping.*'triton'.*--attention-backend torch"


@needs_triton
def test_triton_backend_refuses_it_at_start_up(gemma2: Path) -> None:
    with pytest.raises(ValueError, match=REFUSAL):
        EngineCore(EngineConfig.from_options(str(gemma2), device="cpu", attention_backend="triton"))


@needs_triton
def test_auto_takes_torch_where_it_would_be_triton(
    gemma2: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`auto` is triton on CUDA, which lacks soft-capping: the runner serves Gemma 2 with the
    torch backend instead of refusing it, and says so. CUDA is what this machine lacks, so `auto`
    is made to resolve as it does there; the GPU run of the same path is
    tests/engine/test_gpu.py::test_gemma2_on_cuda_takes_the_torch_backend_and_matches_hf."""
    import shared.model_runner

    monkeypatch.setattr(
        shared.model_runner, "resolve_backend_name", lambda name, device: "triton" if name == "auto" else name
    )
    with caplog.at_level("WARNING", logger="shared.model_runner"):
        core = build_core(gemma2, device="cpu", page_size=4, chunked_prefill_size=16)
    assert core.runner.backend.name == "torch"
    assert (
        "attention backend torch, not triton: Gemma2ForCausalLM needs attention logit soft-capping"
        in caplog.text
    )
    prompts = make_prompts(core.runner.vocab_size, count=3, seed=3)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(gemma2, ids, NEW_TOKENS), f"prompt {i}"


@needs_triton
def test_triton_refusal_reaches_the_engine_client(gemma2: Path) -> None:
    """What a worker started with `--attention-backend triton` reports."""
    with pytest.raises(RuntimeError, match="failed to start: ValueError: " + REFUSAL):
        EngineClient(EngineConfig.from_options(str(gemma2), device="cpu", attention_backend="triton"))


@needs_triton
def test_without_soft_capping_the_triton_backend_serves_it(tiny_model_factory: Callable[..., Path]) -> None:
    """The refusal is about soft-capping only: the triton backend already takes a window and a
    scale per layer. Run through the kernels' torch references (CPU), so this checks the backend's
    wiring, not the kernels on a GPU."""
    from kernels.config import reference_mode

    path = tiny_model_factory("gemma2", attn_logit_softcapping=None)
    with reference_mode(True):
        core = build_core(
            path, device="cpu", attention_backend="triton", page_size=4, chunked_prefill_size=16
        )
        prompts = make_prompts(core.runner.vocab_size, count=5, seed=2)
        outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, NEW_TOKENS), f"prompt {i}"
