"""The offline Engine API: shapes of inputs and outputs, streaming, async, n > 1, stops, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import Engine
from tests.engine.hf_reference import hf_greedy

GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator[Engine]:
    with Engine(model_path=str(tiny_llama), page_size=4, debug_invariants=True) as eng:
        yield eng


def test_single_prompt_returns_dict_matching_hf(engine: Engine, tiny_llama: Path) -> None:
    out = engine.generate("The quick brown fox", GREEDY)
    assert isinstance(out, dict)
    ids = engine.tokenizer("The quick brown fox")["input_ids"]
    assert out["output_ids"] == hf_greedy(tiny_llama, ids, 10)
    assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids)
    assert meta["completion_tokens"] == 10
    assert meta["finish_reason"] == {"type": "length"}
    assert meta["cached_tokens"] >= 0


def test_batch_of_prompts_and_input_ids(engine: Engine) -> None:
    outs = engine.generate(["a b c", "hello world, this is a longer prompt"], GREEDY)
    assert isinstance(outs, list) and len(outs) == 2
    ids = [engine.tokenizer(p)["input_ids"] for p in ["a b c", "hello world, this is a longer prompt"]]
    by_ids = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in by_ids]  # type: ignore[index]
    single = engine.generate(input_ids=ids[0], sampling_params=GREEDY)
    assert isinstance(single, dict) and single["output_ids"] == outs[0]["output_ids"]  # type: ignore[index]


def test_per_prompt_sampling_params(engine: Engine) -> None:
    outs = engine.generate(["x y", "x y"], [dict(GREEDY, max_new_tokens=3), dict(GREEDY, max_new_tokens=6)])
    assert [len(o["output_ids"]) for o in outs] == [3, 6]  # type: ignore[index]


def test_stream_increments_concatenate_to_the_full_result(engine: Engine) -> None:
    full = engine.generate("streaming test prompt", GREEDY)
    chunks = list(engine.generate("streaming test prompt", GREEDY, stream=True))  # type: ignore[arg-type]
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == full["text"]  # type: ignore[index]
    assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]  # type: ignore[index]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length"}


def test_async_generate_and_async_stream(engine: Engine) -> None:
    expected = engine.generate("async prompt", GREEDY)

    async def main() -> tuple[Any, list[dict[str, Any]], list[Any]]:
        out = await engine.async_generate("async prompt", GREEDY)
        stream = await engine.async_generate("async prompt", GREEDY, stream=True)
        chunks = [c async for c in stream]  # type: ignore[union-attr]
        concurrent = await asyncio.gather(*(engine.async_generate("async prompt", GREEDY) for _ in range(4)))
        return out, chunks, list(concurrent)

    out, chunks, concurrent = asyncio.run(main())
    assert out["output_ids"] == expected["output_ids"]  # type: ignore[index]
    assert "".join(c["text"] for c in chunks) == expected["text"]  # type: ignore[index]
    assert all(c["output_ids"] == expected["output_ids"] for c in concurrent)  # type: ignore[index]


def test_n_samples_share_the_prompt_kv(engine: Engine) -> None:
    prompt = "a prompt long enough to fill several pages of four tokens each, surely"
    params = {"n": 3, "max_new_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    outs = engine.generate(prompt, params)
    assert isinstance(outs, list) and len(outs) == 3
    prompt_len = outs[0]["meta_info"]["prompt_tokens"]
    # The siblings start from the first sample's cached prompt pages (all but the last partial page).
    assert all(o["meta_info"]["cached_tokens"] >= (prompt_len - 1) // 4 * 4 for o in outs[1:])
    assert all(len(o["output_ids"]) == 8 for o in outs)
    # Sample i draws with seed + i: the samples differ, and the whole set is reproducible.
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    again = engine.generate(prompt, params)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in outs]  # type: ignore[index]


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 1234, "ignore_eos": True}
    a = engine.generate("seeded", params)
    b = engine.generate(
        ["other prompt", "seeded", "third"], [dict(params, seed=1), params, dict(params, seed=2)]
    )
    assert a["output_ids"] == b[1]["output_ids"]  # type: ignore[index]
    c = engine.generate("seeded", dict(params, seed=99))
    assert c["output_ids"] != a["output_ids"]  # type: ignore[index]


def test_stop_string_cuts_text_exactly(engine: Engine) -> None:
    base = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16))
    text = base["text"]  # type: ignore[index]
    assert len(text) >= 6
    stop = text[3:6]
    out = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16, stop=stop))
    assert out["text"] == text[: text.index(stop)]  # type: ignore[index]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}  # type: ignore[index]
    kept = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16, stop=stop, no_stop_trim=True))
    assert kept["text"] == text[: text.index(stop) + len(stop)]  # type: ignore[index]


def test_stop_token_ids_and_min_new_tokens(engine: Engine) -> None:
    base = engine.generate("stop token", dict(GREEDY, max_new_tokens=8))
    stop_id = base["output_ids"][4]  # type: ignore[index]
    first = base["output_ids"].index(stop_id)  # type: ignore[index]
    out = engine.generate("stop token", dict(GREEDY, max_new_tokens=8, stop_token_ids=[stop_id]))
    assert out["output_ids"] == base["output_ids"][: first + 1]  # type: ignore[index]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}  # type: ignore[index]
    forced = engine.generate(
        "stop token",
        {"max_new_tokens": 8, "min_new_tokens": 8, "stop_token_ids": [stop_id], "temperature": 0.0},
    )
    assert len(forced["output_ids"]) == 8 and stop_id not in forced["output_ids"]  # type: ignore[index]


def test_stop_strings_wait_for_min_new_tokens(engine: Engine) -> None:
    """A stop string in the first min_new_tokens tokens' text stays in the text (the QA pass:
    `min_tokens` held back stop ids but not stop strings); one ending later still stops it."""
    base = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16))
    text, ids = base["text"], base["output_ids"]  # type: ignore[index]
    stop = text[:2]
    assert len(stop) == 2
    early = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16, stop=stop))
    assert early["text"] == ""  # type: ignore[index]
    out = engine.generate("stop string test", dict(GREEDY, max_new_tokens=16, stop=stop, min_new_tokens=6))
    assert out["output_ids"] == ids[: len(out["output_ids"])] and len(out["output_ids"]) >= 6  # type: ignore[index]
    assert out["text"].startswith(stop)  # type: ignore[index]
    if out["meta_info"]["finish_reason"]["type"] == "stop":  # type: ignore[index]
        assert out["meta_info"]["finish_reason"]["matched"] == stop  # type: ignore[index]
        assert text[len(out["text"]) :].startswith(stop) and len(out["text"]) > 0  # type: ignore[index]
    else:
        assert out["text"] == text and len(out["output_ids"]) == 16  # type: ignore[index]


def test_logprobs_and_top_logprobs(engine: Engine) -> None:
    out = engine.generate("logprobs", GREEDY, return_logprob=True, top_logprobs_num=3)
    lps = out["meta_info"]["output_token_logprobs"]  # type: ignore[index]
    tops = out["meta_info"]["output_top_logprobs"]  # type: ignore[index]
    assert len(lps) == len(tops) == 10
    for (lp, tok, _), top in zip(lps, tops):
        assert tok == top[0][1]  # greedy picks the most likely token
        assert lp == pytest.approx(top[0][0], abs=1e-5)
        assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
        assert lp <= 0.0


def test_invalid_inputs_raise_value_error_and_engine_keeps_serving(engine: Engine) -> None:
    with pytest.raises(ValueError, match="temperatur"):
        engine.generate("x", {"temperatur": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", {"top_p": 1.5})
    with pytest.raises(ValueError):
        engine.generate(input_ids=[10**9])
    with pytest.raises(ValueError, match="empty"):
        engine.generate(input_ids=[[]])
    with pytest.raises(ValueError, match="exactly one"):
        engine.generate()
    with pytest.raises(ValueError, match="context"):
        engine.generate(input_ids=[5] * 5000)
    assert len(engine.generate("still serving", GREEDY)["output_ids"]) == 10  # type: ignore[index]


def test_abandoned_stream_frees_the_request(engine: Engine) -> None:
    stream = engine.generate("abandon me", dict(GREEDY, max_new_tokens=200), stream=True)
    next(stream)  # type: ignore[call-overload]
    stream.close()  # type: ignore[union-attr]
    engine.generate("after abandon", GREEDY)  # the loop kept going
    engine._call(engine.core.check_idle).result(timeout=10)


def test_invalid_engine_options(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine option"):
        Engine(model_path=str(tiny_llama), page_sise=4)
    with pytest.raises(ValueError, match="dtype"):
        Engine(model_path=str(tiny_llama), dtype="float8")
    with pytest.raises(ValueError, match="schedule_policy"):
        Engine(model_path=str(tiny_llama), schedule_policy="sjf")
    with pytest.raises(FileNotFoundError):
        Engine(model_path=str(tiny_llama / "missing"))


def test_shutdown_refuses_new_work(tiny_llama: Path) -> None:
    eng = Engine(model_path=str(tiny_llama))
    eng.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate("x", GREEDY)
