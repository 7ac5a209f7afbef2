"""Overlap scheduling (EngineCore.step): step N+1 is scheduled and launched before step N's tokens
are read, its inputs patched from the device. It must change no output. On CPU the forward is
synchronous, so nothing overlaps in time here, but every code path of the overlap runs: the
placeholders, the patched inputs, the extra step of a request that just finished, parking at
the length limit, retraction and abort with a token in flight, and falling back to a
synchronous step for penalties and grammars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.engine_core import EngineCore
from shared.sampling import SamplingParams
from shared.scheduler.request import PENDING
from tests.engine.hf_reference import hf_greedy
from tests.engine.test_disagg import TRANSPORTS, make_pair, run_pd
from tests.engine.test_parity import attention_backend, build_core, make_prompts, run_staggered

OVERLAP = {"enable_overlap_schedule": True}


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_greedy_parity_with_hf(tiny_model_factory: Callable[..., Path], arch: str, page_size: int) -> None:
    path = tiny_model_factory(arch)
    core = build_core(
        path,
        page_size=page_size,
        chunked_prefill_size=16,
        attention_backend=attention_backend(arch),
        **OVERLAP,
    )
    assert core.overlap
    prompts = make_prompts(core.runner.vocab_size)
    outputs = run_staggered(core, prompts)
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(path, ids, 12), f"prompt {i}"


def test_retraction_with_tokens_in_flight_keeps_parity(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, page_size=4, max_total_tokens=80, chunked_prefill_size=32, **OVERLAP)
    prompts = [p[:30] for p in make_prompts(core.runner.vocab_size, seed=1)]
    outputs = run_staggered(core, prompts, max_new_tokens=20)
    assert core.scheduler.num_retractions > 0
    for i, ids in enumerate(prompts):
        assert outputs[f"r{i}"] == hf_greedy(tiny_llama, ids, 20), f"prompt {i}"


def run_all(core: EngineCore, requests: list[tuple[str, list[int], SamplingParams, bool]]) -> dict[str, Any]:
    """Add every request, step until idle; per rid: tokens, text, logprobs, finish reason."""
    for rid, ids, params, logprobs in requests:
        core.add_request(
            [rid] if params.n == 1 else [f"{rid}.{i}" for i in range(params.n)],
            ids,
            params,
            logprobs,
            2 if logprobs else 0,
        )
    results: dict[str, Any] = {}
    while core.has_work or core.waiting_in_background:
        for out in core.step():
            r = results.setdefault(out.rid, {"ids": [], "text": "", "lps": [], "tops": []})
            r["ids"] += out.new_ids
            r["text"] += out.new_text
            r["lps"] += out.new_logprobs
            r["tops"] += out.new_top_logprobs
            assert PENDING not in out.new_ids
            assert len(r["ids"]) == out.completion_tokens
            if out.finished:
                r["finish"] = out.finish_reason
    core.check_idle()
    return results


def mixed_requests(vocab: int) -> list[tuple[str, list[int], SamplingParams, bool]]:
    prompts = make_prompts(vocab, count=8, seed=4)
    sampled = {"temperature": 1.0, "max_new_tokens": 40}
    params = {
        "greedy": (SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True), True),
        "seeded": (SamplingParams(max_new_tokens=30, temperature=0.9, seed=5, n=3), True),
        "short": (SamplingParams(max_new_tokens=1, temperature=0.7, seed=1), False),
        "stops": (SamplingParams(**sampled, seed=2, stop=["e", "a "]), False),
        "stop-ids": (SamplingParams(**sampled, seed=3, stop_token_ids=list(range(5, 60))), False),
        "min": (SamplingParams(max_new_tokens=12, min_new_tokens=6, temperature=1.0, seed=4), True),
        "penalty": (SamplingParams(**sampled, seed=6, repetition_penalty=1.3, frequency_penalty=0.5), False),
        "top": (SamplingParams(**sampled, top_k=20, top_p=0.9, min_p=0.05, seed=7), False),
    }
    return [(rid, ids, p, lps) for ids, (rid, (p, lps)) in zip(prompts, params.items())]


@pytest.mark.parametrize("page_size", [1, 4])
def test_seeded_mixed_batch_is_identical_with_and_without_overlap(tiny_llama: Path, page_size: int) -> None:
    """Sampling, stop strings and ids, min/max tokens, n > 1, logprobs and a penalty request
    (which forces synchronous steps while it runs) give byte-identical results."""
    plain = build_core(tiny_llama, page_size=page_size)
    requests = mixed_requests(plain.runner.vocab_size)
    expected = run_all(plain, requests)
    got = run_all(build_core(tiny_llama, page_size=page_size, **OVERLAP), requests)
    assert got == expected
    assert expected["stops"]["finish"]["type"] == "stop" and len(expected["short"]["ids"]) == 1


def test_abort_with_a_token_in_flight_frees_everything(tiny_llama: Path) -> None:
    core = build_core(tiny_llama, page_size=4, **OVERLAP)
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    core.add_request(["a"], list(range(10, 30)), params)
    core.add_request(["b"], list(range(40, 45)), params)
    seen: dict[str, int] = {}
    for _ in range(6):
        for out in core.step():
            seen[out.rid] = seen.get(out.rid, 0) + len(out.new_ids)
    assert core._inflight is not None and any(it.req.pending for it in core._inflight.items)
    core.abort("a")
    outs = []
    while core.has_work:
        outs += core.step()
    (a_end,) = [o for o in outs if o.rid == "a"]
    assert a_end.finish_reason == {"type": "abort", "message": "aborted"} and PENDING not in a_end.new_ids
    b_ids = [t for o in outs if o.rid == "b" for t in o.new_ids]
    assert seen["b"] + len(b_ids) == 50
    core.check_idle()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pd_engines_with_overlap_match_hf(tiny_llama: Path, transport: str) -> None:
    # Both engines overlap: the prefill engine launches the next chunks before reading a
    # prompt's first token (the prompt is parked meanwhile, never decoded there) and streams a
    # chunk's pages once its step has been waited for; staggered prompts of 1-41 tokens in
    # 16-token chunks and 4-token pages cover pages granted before, between and after chunks.
    prefill, decode = make_pair(tiny_llama, transport, page_size=4, chunked_prefill_size=16, **OVERLAP)
    assert decode.overlap and prefill.overlap
    prompts = make_prompts(prefill.runner.vocab_size)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    tokens, _last = run_pd(prefill, decode, prompts, params)  # both end idle, holding no KV
    assert prefill.counters["generated_tokens"] == len(prompts)  # each its first token, no more
    for i, ids in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(tiny_llama, ids, 10), f"prompt {i}"
