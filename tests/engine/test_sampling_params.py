"""SamplingParams: parsing from JSON-like dicts, range checks, normalisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from shared.sampling import SamplingParams
from shared.sampling.params import MAX_CONSTRAINT_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

VOCAB = 1000


def test_defaults_match_sglang() -> None:
    p = SamplingParams.from_dict(None)
    assert p == SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.n, p.seed, p.stop) == (1.0, 1, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens and not p.no_stop_trim
    p.verify(VOCAB)


def test_from_dict_reads_every_field() -> None:
    d: dict[str, Any] = {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.2,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [3, 4],
        "ignore_eos": True,
        "n": 2,
        "seed": 42,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
        "json_schema": None,
        "regex": "[a-z]+",
        "ebnf": None,
        "structural_tag": None,
    }
    p = SamplingParams.from_dict(d)
    assert dataclasses.asdict(p) == d
    p.verify(VOCAB)
    assert p.constraint == ("regex", "[a-z]+")


def test_at_most_one_constraint_of_bounded_size() -> None:
    with pytest.raises(ValueError, match="at most one constraint"):
        SamplingParams(regex="a", json_schema="{}").verify(VOCAB)
    with pytest.raises(ValueError, match=r"^ebnf is too large"):
        SamplingParams(ebnf="x" * (MAX_CONSTRAINT_CHARS + 1)).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^regex must be a string or null"):
        SamplingParams.from_dict({"regex": 3})
    assert SamplingParams().constraint is None


def test_ints_accepted_for_floats_and_stored_as_float() -> None:
    p = SamplingParams.from_dict({"temperature": 1, "top_p": 1, "repetition_penalty": 2})
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert isinstance(p.repetition_penalty, float)


def test_unknown_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ValueError, match="'max_tokens'") as err:
        SamplingParams.from_dict({"max_tokens": 5, "temperature": 0.5})
    assert "max_new_tokens" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", True),  # bool is not an int here
        ("max_new_tokens", 1.5),
        ("max_new_tokens", "10"),
        ("top_k", None),
        ("temperature", "0.5"),
        ("temperature", False),
        ("top_p", None),
        ("ignore_eos", 1),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop_token_ids", 3),
        ("stop_token_ids", [1, True]),
        ("seed", 1.0),
        ("n", 2.0),
    ],
)
def test_wrong_types_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams.from_dict({field: value})


def test_non_mapping_rejected() -> None:
    with pytest.raises(ValueError, match="object"):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("n", 0),
        ("seed", -1),
        ("seed", 2**63),
        ("stop_token_ids", [VOCAB]),
        ("stop_token_ids", [-1]),
    ],
)
def test_verify_rejects_out_of_range(field: str, value: object) -> None:
    p = SamplingParams.from_dict({field: value})
    with pytest.raises(ValueError, match=f"^{field} "):
        p.verify(VOCAB)


def test_min_new_tokens_bounded_by_max_new_tokens() -> None:
    SamplingParams(max_new_tokens=5, min_new_tokens=5).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^min_new_tokens"):
        SamplingParams(max_new_tokens=5, min_new_tokens=6).verify(VOCAB)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": 10**9},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"frequency_penalty": -2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1e-3},
        {"temperature": 0.0},
        {"max_new_tokens": 0},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop_token_ids": [0, VOCAB - 1]},
        {"stop": "x" * 256},
    ],
)
def test_verify_accepts_boundaries(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs).verify(VOCAB)


def test_stop_string_limits() -> None:
    SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS)]).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^stop may hold at most"):
        SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)]).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^stop strings must be non-empty"):
        SamplingParams(stop=["ok", ""]).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^stop strings must be non-empty"):
        SamplingParams(stop="").verify(VOCAB)
    with pytest.raises(ValueError, match=r"^stop strings must be at most"):
        SamplingParams(stop="x" * 257).verify(VOCAB)
    with pytest.raises(ValueError, match=r"^stop_token_ids may hold at most"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))).verify(VOCAB)


def test_normalized_canonical_forms() -> None:
    p = SamplingParams(stop="END", top_k=0, temperature=1e-6).normalized()
    assert p.stop == ["END"]
    assert p.top_k == -1
    assert p.temperature == 0.0 and p.is_greedy
    assert SamplingParams().normalized().stop == []
    assert SamplingParams(stop=("a", "b")).normalized().stop == ["a", "b"]  # type: ignore[arg-type]
    assert p.normalized() == p  # idempotent


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_frozen() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
