"""The batched sampler: greedy, filters, seeded draws, distribution, penalties, logprobs.

Every test is deterministic: unseeded draws use a `torch.Generator` with a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shared.sampling import Sampler, SamplingBatch, SamplingParams
from shared.sampling.penalties import (
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    suppress_tokens,
)
from shared.sampling.sampler import filter_probs, seeded_exponential


def build(
    params: Sequence[SamplingParams],
    vocab: int,
    outputs: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    stop_ids: Sequence[set[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        list(params),
        [list(o) for o in outputs] if outputs is not None else [[] for _ in range(n)],
        [list(p) for p in prompts] if prompts is not None else [[0] for _ in range(n)],
        list(stop_ids) if stop_ids is not None else [set() for _ in range(n)],
        vocab,
        "cpu",
    )


def sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.Generator().manual_seed(seed))


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one logits row (n identical rows of one batch)."""
    vocab = logits_row.shape[0]
    logits = logits_row[None, :].expand(n, vocab).contiguous()
    return sampler(seed).sample(logits, build([params] * n, vocab)).next_token_ids


def counts(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(draws, minlength=vocab).double()


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic over the categories with nonzero expected count."""
    expected = probs.double() * observed.sum()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "drew a category of probability zero"
    return float((((observed - expected) ** 2)[keep] / expected[keep]).sum())


# Upper 0.1% quantiles of chi-square: a correct sampler fails a given test with p < 0.001
# (and with fixed seeds, never changes its mind).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88}


def log_probs(probs: Sequence[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_rows_take_argmax_in_a_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=gen)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=1),
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=1e-7),
        SamplingParams(min_p=0.1, seed=3),
        SamplingParams(temperature=0.0, seed=5),
        SamplingParams(temperature=2.0),
    ]
    greedy = torch.tensor([p.is_greedy for p in params])
    out = sampler().sample(logits, build(params, 300))
    expected = logits.argmax(-1)
    assert torch.equal(out.next_token_ids[greedy], expected[greedy])
    assert out.next_token_ids.dtype == torch.int64 and out.next_token_ids.shape == (8,)


def test_all_greedy_batch() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    out = sampler().sample(logits, build([SamplingParams(temperature=0.0)] * 5, 50))
    assert torch.equal(out.next_token_ids, logits.argmax(-1))


def test_low_precision_logits_and_input_not_mutated() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0)] * 4
    out = sampler().sample(logits, build(params, 64, outputs=[[1, 2]] * 4, prompts=[[3]] * 4))
    assert torch.equal(logits, before)
    assert out.next_token_ids.shape == (4,)
    logits32 = torch.randn(4, 64)
    before32 = logits32.clone()
    sampler().sample(logits32, build(params, 64, outputs=[[1, 2]] * 4, prompts=[[3]] * 4))
    assert torch.equal(logits32, before32)


# ---- seeded draws ----------------------------------------------------------------------------


def run_steps(seed: int, steps: int, vocab: int, others: int, position: int, global_seed: int) -> list[int]:
    """Generate `steps` tokens for one seeded request (temperature 0.9, top-p 0.95) whose logits
    are fixed per step, sitting at `position` in a batch with `others` unrelated requests."""
    torch.manual_seed(global_seed)  # the unseeded rows must not influence the seeded one
    row_gen = torch.Generator().manual_seed(1000)  # the request's own logits, same every run
    noise_gen = torch.Generator().manual_seed(global_seed + 7)  # everyone else's logits
    s = Sampler(torch.Generator().manual_seed(global_seed))
    mine = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    other_params = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=5, seed=77),
        SamplingParams(min_p=0.2),
        SamplingParams(top_p=0.5, temperature=1.3),
        SamplingParams(seed=seed),
        SamplingParams(repetition_penalty=1.3),
    ]
    tokens: list[int] = []
    for step in range(steps):
        my_logits = torch.randn(vocab, generator=row_gen) * 2
        rows = [torch.randn(vocab, generator=noise_gen) * 2 for _ in range(others)]
        rows.insert(position, my_logits)
        params = [other_params[i % len(other_params)] for i in range(others)]
        params.insert(position, mine)
        outputs = [[step] * (i % 3) for i in range(others)]  # other rows at other steps
        outputs.insert(position, tokens)
        batch = build(params, vocab, outputs=outputs, prompts=[[1, 2]] * (others + 1))
        out = s.sample(torch.stack(rows), batch)
        tokens = [*tokens, int(out.next_token_ids[position])]
    return tokens


def test_seeded_request_reproducible_and_batch_independent() -> None:
    alone = run_steps(seed=1234, steps=30, vocab=200, others=0, position=0, global_seed=0)
    again = run_steps(seed=1234, steps=30, vocab=200, others=0, position=0, global_seed=99)
    in_batch = run_steps(seed=1234, steps=30, vocab=200, others=7, position=5, global_seed=5)
    at_front = run_steps(seed=1234, steps=30, vocab=200, others=7, position=0, global_seed=6)
    assert alone == again == in_batch == at_front
    # The request really samples (the sequence is not just the argmax of each step's logits).
    greedy = run_greedy(steps=30, vocab=200)
    assert alone != greedy


def run_greedy(steps: int, vocab: int) -> list[int]:
    row_gen = torch.Generator().manual_seed(1000)
    return [int((torch.randn(vocab, generator=row_gen) * 2).argmax()) for _ in range(steps)]


def test_different_seeds_differ() -> None:
    a = run_steps(seed=1, steps=30, vocab=200, others=0, position=0, global_seed=0)
    b = run_steps(seed=2, steps=30, vocab=200, others=0, position=0, global_seed=0)
    assert a != b


def test_unseeded_rows_follow_the_generator() -> None:
    logits = torch.zeros(16, 1000)
    params = [SamplingParams()] * 16
    a = sampler(1).sample(logits, build(params, 1000)).next_token_ids
    b = sampler(1).sample(logits, build(params, 1000)).next_token_ids
    c = sampler(2).sample(logits, build(params, 1000)).next_token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_noise_depends_on_seed_step_and_token() -> None:
    noise = seeded_exponential(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 4096)
    assert noise.shape == (3, 4096) and noise.dtype == torch.float32
    assert bool((noise > 0).all()) and bool(torch.isfinite(noise).all())
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], seeded_exponential(torch.tensor([5]), torch.tensor([0]), 4096)[0])
    # Exp(1): mean 1, variance 1; neighbouring seeds and steps are uncorrelated.
    for row in noise:
        assert abs(float(row.mean()) - 1) < 0.06 and abs(float(row.var()) - 1) < 0.15
    assert abs(float(torch.corrcoef(noise)[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(noise)[0, 2])) < 0.05


# ---- distribution ----------------------------------------------------------------------------


def test_temperature_row_matches_softmax_unseeded() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2])
    t = 0.7
    draws = draw_many(logits, SamplingParams(temperature=t), 40_000, seed=11)
    expected = torch.softmax(logits / t, -1)
    observed = counts(draws, 6)
    assert chi_square(observed, expected) < CHI2_999[5]
    assert float((observed / observed.sum() - expected).abs().sum()) / 2 < 0.01  # total variation


def test_temperature_row_matches_softmax_seeded() -> None:
    """The hash noise must be a good Exp(1): across seeds and across steps of one seed."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2])
    t = 1.3
    expected = torch.softmax(logits / t, -1)
    n = 40_000
    rows = logits[None, :].expand(n, 6).contiguous()
    across_seeds = build([SamplingParams(temperature=t, seed=s) for s in range(n)], 6)
    draws = sampler().sample(rows, across_seeds).next_token_ids
    assert chi_square(counts(draws, 6), expected) < CHI2_999[5]
    # One seed over many steps: steps come from the output length.
    steps = 4000
    outputs = [[3] * i for i in range(steps)]
    params = [SamplingParams(temperature=t, seed=424242)] * steps
    draws = sampler().sample(rows[:steps], build(params, 6, outputs=outputs)).next_token_ids
    assert chi_square(counts(draws, 6), expected) < CHI2_999[5]


# ---- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "params", "allowed"),
    [
        # top-k: the 3 most likely of 6; the excluded ones still carry 25% of the mass.
        ([0.3, 0.05, 0.2, 0.15, 0.25, 0.05], SamplingParams(top_k=3), [0, 2, 4]),
        # top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the smallest set reaching it has 3 tokens.
        ([0.05, 0.4, 0.2, 0.3, 0.05], SamplingParams(top_p=0.75), [1, 2, 3]),
        ([0.05, 0.4, 0.2, 0.3, 0.05], SamplingParams(top_p=0.65), [1, 3]),
        # The top token survives however small top_p is.
        ([0.05, 0.4, 0.2, 0.3, 0.05], SamplingParams(top_p=1e-4), [1]),
        # min-p 0.2: threshold 0.2 * 0.4 = 0.08.
        ([0.4, 0.06, 0.3, 0.2, 0.04], SamplingParams(min_p=0.2), [0, 2, 3]),
        # top-p is measured after top-k, on the renormalised survivors: 0.3/0.75 = 0.4,
        # 0.55/0.75 = 0.73 >= 0.7, so 2 tokens (without renormalising it would be 3).
        ([0.3, 0.25, 0.2, 0.15, 0.1], SamplingParams(top_k=3, top_p=0.7), [0, 1]),
        # All three at once.
        ([0.3, 0.25, 0.2, 0.15, 0.1], SamplingParams(top_k=4, top_p=0.9, min_p=0.7), [0, 1]),
    ],
)
def test_filters_exact_and_not_over_restrictive(
    probs: list[float], params: SamplingParams, allowed: list[int]
) -> None:
    vocab = len(probs)
    logits = log_probs(probs)
    draws = draw_many(logits, params, 20_000, seed=3)
    observed = counts(draws, vocab)
    # Never an excluded token; every allowed one, in proportion to its renormalised mass.
    assert sorted(torch.nonzero(observed).flatten().tolist()) == allowed
    expected = torch.zeros(vocab, dtype=torch.float64)
    expected[allowed] = torch.tensor(probs, dtype=torch.float64)[allowed]
    expected /= expected.sum()
    if len(allowed) > 1:
        assert chi_square(observed, expected) < CHI2_999[len(allowed) - 1]


def test_filters_with_seeded_rows_and_temperature() -> None:
    # Temperature 2 flattens the distribution: top-k must still cut at the same 2 tokens.
    logits = log_probs([0.5, 0.3, 0.1, 0.1])
    n = 5000
    params = [SamplingParams(temperature=2.0, top_k=2, seed=s) for s in range(n)]
    draws = sampler().sample(logits[None].expand(n, 4).contiguous(), build(params, 4))
    assert sorted(torch.unique(draws.next_token_ids).tolist()) == [0, 1]


def test_filters_do_not_leak_across_rows() -> None:
    logits = log_probs([0.3, 0.25, 0.2, 0.15, 0.1])
    n = 4000
    params = [SamplingParams(top_k=2) if i % 2 else SamplingParams() for i in range(n)]
    draws = sampler().sample(logits[None].expand(n, 5).contiguous(), build(params, 5))
    ids = draws.next_token_ids
    assert sorted(torch.unique(ids[1::2]).tolist()) == [0, 1]
    assert sorted(torch.unique(ids[0::2]).tolist()) == [0, 1, 2, 3, 4]


def reference_filter(probs: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Which tokens survive, computed the slow obvious way in float64."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k >= 1 else order
    mass = sum(probs[i] for i in kept)
    survivors: list[int] = []
    before = 0.0
    for i in kept:
        if top_p < 1.0 and before >= top_p * mass:
            break
        survivors.append(i)
        before += probs[i]
    top = probs[order[0]]
    return [i in survivors and probs[i] >= min_p * top for i in range(len(probs))]


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=40),
    top_k=st.integers(-1, 45),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_filter_matches_reference(logits: list[float], top_k: int, top_p: float, min_p: float) -> None:
    assume(top_k != 1)  # top_k == 1 is a greedy row: argmax, not filtered
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1)
    p64 = probs.tolist()
    # Ties and near-boundary cases are decided by float rounding; skip them.
    assume(len(set(round(p, 6) for p in p64)) == len(p64))
    order = sorted(p64, reverse=True)
    kept = order[: top_k if top_k >= 1 else None]
    mass, before = sum(kept), 0.0
    for p in kept:
        assume(abs(before - top_p * mass) > 1e-4)
        before += p
    assume(all(abs(p - min_p * order[0]) > 1e-5 for p in p64))
    params = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
    out = filter_probs(probs.float()[None, :], build([params], len(logits)))
    assert (out[0] > 0).tolist() == reference_filter(p64, top_k, top_p, min_p)
    kept_probs = out[0][out[0] > 0]
    assert torch.allclose(kept_probs, probs.float()[out[0] > 0])  # survivors keep their values


# ---- penalties -------------------------------------------------------------------------------


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    apply_repetition_penalty(
        logits, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 3]), torch.tensor([2.0, 1.5])
    )
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.5, -4.5]])
    assert torch.equal(logits, expected)


def test_frequency_presence_penalty_hand_computed() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    apply_frequency_presence_penalty(
        logits,
        rows=torch.tensor([0, 0, 1]),
        token_ids=torch.tensor([0, 2, 1]),
        counts=torch.tensor([3, 1, 2]),
        frequency=torch.tensor([0.5, -0.25]),
        presence=torch.tensor([0.25, 1.0]),
    )
    # row 0: token 0: 1 - (0.5*3 + 0.25) = -0.75; token 2: 1 - (0.5 + 0.25) = 0.25
    # row 1: token 1: 0 - (-0.25*2 + 1.0) = -0.5
    expected = torch.tensor([[-0.75, 1.0, 0.25], [0.0, -0.5, 0.0]])
    assert torch.allclose(logits, expected)


def test_suppress_tokens() -> None:
    logits = torch.zeros(2, 3)
    suppress_tokens(logits, torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert logits.tolist() == [[0.0, 0.0, -math.inf], [-math.inf, 0.0, 0.0]]


def greedy_pick(
    logits: list[float],
    params: SamplingParams,
    output: list[int],
    prompt: list[int],
    stop_ids: set[int] | None = None,
) -> int:
    batch = build([params], len(logits), outputs=[output], prompts=[prompt], stop_ids=[stop_ids or set()])
    return int(sampler().sample(torch.tensor([logits]), batch).next_token_ids[0])


def test_repetition_penalty_covers_prompt_and_output() -> None:
    logits = [1.0, 0.6, 0.0]
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert greedy_pick(logits, params, output=[], prompt=[2]) == 0
    assert greedy_pick(logits, params, output=[], prompt=[0]) == 1  # 1.0 / 2 < 0.6
    assert greedy_pick(logits, params, output=[0], prompt=[2]) == 1
    # Applied once per token however often it occurs: 1.0 / 2 = 0.5 > 0.4.
    assert greedy_pick([1.0, 0.4, 0.0], params, output=[0, 0, 0], prompt=[0, 0]) == 0


def test_frequency_presence_cover_output_only() -> None:
    logits = [1.0, 0.5, 0.0]
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert greedy_pick(logits, freq, output=[], prompt=[0, 0, 0, 0]) == 0  # prompt ignored
    assert greedy_pick(logits, freq, output=[0, 0], prompt=[]) == 0  # 1.0 - 0.4 = 0.6 > 0.5
    assert greedy_pick(logits, freq, output=[0, 0, 0], prompt=[]) == 1  # 1.0 - 0.6 = 0.4 < 0.5
    presence = SamplingParams(temperature=0.0, presence_penalty=0.6)
    assert greedy_pick(logits, presence, output=[0, 0, 0], prompt=[]) == 1  # once: 0.4 < 0.5
    assert greedy_pick(logits, presence, output=[2], prompt=[0]) == 0


def test_batch_penalty_rows_are_independent() -> None:
    logits = torch.tensor([[1.0, 0.6, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
    ]
    batch = build(params, 3, outputs=[[0]] * 3, prompts=[[0]] * 3)
    assert sampler().sample(logits, batch).next_token_ids.tolist() == [1, 0, 1]


def test_min_new_tokens_suppresses_stop_ids() -> None:
    logits = torch.tensor([[5.0, 0.0, 4.0, 1.0]])  # eos (0) and a stop token (2) dominate
    stop = {0, 2}
    for params in (
        SamplingParams(temperature=0.0, min_new_tokens=3),
        SamplingParams(temperature=1.0, min_new_tokens=3),
    ):
        for out_len in range(3):
            batch = build([params] * 2000, 4, outputs=[[3] * out_len] * 2000, stop_ids=[stop] * 2000)
            ids = sampler().sample(logits.expand(2000, 4).contiguous(), batch).next_token_ids
            assert not bool(torch.isin(ids, torch.tensor([0, 2])).any())
            assert {1, 3} <= set(ids.tolist()) or params.is_greedy
    done = build([SamplingParams(temperature=0.0, min_new_tokens=3)], 4, outputs=[[3, 3, 3]], stop_ids=[stop])
    assert int(sampler().sample(logits, done).next_token_ids[0]) == 0


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_of_raw_logits() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 100, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.3, repetition_penalty=1.8, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.2, seed=4),
        SamplingParams(),
        SamplingParams(min_p=0.5, temperature=2.0),
    ]
    outputs = [[int(i) for i in logits[r].topk(5).indices] for r in range(6)]
    # Row 1: token 0 leads by 0.5 but was produced before, so presence 2.0 hands it to token 1.
    logits[1, 0], logits[1, 1] = 10.0, 9.5
    outputs[1] = [0]
    batch = build(params, 100, outputs=outputs, prompts=outputs)
    out = sampler().sample(logits, batch, top_logprobs_num=5, return_logprob=True)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_logprob_vals is not None
    assert out.top_logprob_ids is not None
    assert torch.allclose(out.logprobs, raw.gather(1, out.next_token_ids[:, None]).squeeze(1))
    vals, ids = torch.topk(raw, 5, dim=-1)
    assert torch.equal(out.top_logprob_ids, ids)
    assert torch.allclose(out.top_logprob_vals, vals)
    assert bool((out.top_logprob_vals[:, :-1] >= out.top_logprob_vals[:, 1:]).all())
    # Penalties changed the choice of row 1 (greedy), but not the reported distribution.
    assert int(out.next_token_ids[1]) == 1


def test_logprobs_off_by_default() -> None:
    out = sampler().sample(torch.randn(2, 10), build([SamplingParams()] * 2, 10))
    assert out.logprobs is None and out.top_logprob_vals is None and out.top_logprob_ids is None
    out = sampler().sample(torch.randn(2, 10), build([SamplingParams()] * 2, 10), top_logprobs_num=3)
    assert out.logprobs is None and out.top_logprob_ids is not None
    assert out.top_logprob_ids.shape == (2, 3)


def test_build_ignores_ids_outside_vocab() -> None:
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0, min_new_tokens=5)
    ]
    batch = build(params, 4, outputs=[[1, 9]], prompts=[[-1, 2, 4]], stop_ids=[{0, 7}])
    assert batch.repetition_ids is not None and sorted(batch.repetition_ids.tolist()) == [1, 2]
    assert batch.output_ids is not None and batch.output_ids.tolist() == [1]
    assert batch.suppress_ids is not None and batch.suppress_ids.tolist() == [0]
