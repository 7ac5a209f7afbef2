"""Grammar-constrained decoding (xgrammar) in the engine: outputs of a random-weight model that
must parse, greedy parity with HF under the same grammar, refusals, the compile cache and time
limit, and the PD hand-off continuing the grammar on the decode engine."""

from __future__ import annotations

import ast
import copy
import json
import random
import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from shared.constrained import GrammarCompiler, apply_token_bitmask_reference
from shared.constrained.grammar import can_finish
from shared.engine import Engine
from shared.errors import Unavailable
from shared.sampling import SamplingParams
from tests.engine.hf_reference import hf_greedy_constrained
from tests.engine.test_disagg import TRANSPORTS, make_pair, run_pd, wait_idle
from tests.engine.test_parity import build_core

SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                    "admin": {"type": "boolean"},
                },
                "required": ["id", "admin"],
            },
            # A random model rarely picks the closing quote: bound free text so outputs end.
            "note": {"type": "string", "pattern": "^[a-z ]{0,10}$"},
        },
        "required": ["user"],
    },
    "bounded_array": {
        "type": "object",
        "properties": {
            "xs": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["xs"],
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", 3]}},
        "required": ["color", "size"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "k": {"type": "integer", "minimum": 1, "maximum": 300},
            "x": {"type": "number", "minimum": -1.5, "maximum": 100},
        },
        "required": ["k", "x"],
    },
    "optional_keys": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "null"},
            "c": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 5},
}

# Arithmetic over small integers: checked below with Python's own parser.
ARITHMETIC_EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= [1-9] [0-9]{0,2} | "(" expr ")"
"""

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOL_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "triggered_tags",
        "triggers": ["<tool_call>"],
        "tags": [
            {
                "type": "tag",
                "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
                "content": {"type": "json_schema", "json_schema": WEATHER_PARAMS},
                "end": "}\n</tool_call>",
            }
        ],
        "at_least_one": True,
        "stop_after_first": True,
    },
}


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Any:
    with Engine(model_path=str(tiny_llama), page_size=4, max_total_tokens=8192, debug_invariants=True) as eng:
        yield eng


def sample(engine: Engine, n: int = 12, max_new_tokens: int = 200, **constraint: str) -> list[dict[str, Any]]:
    params = {"temperature": 1.0, "max_new_tokens": max_new_tokens, "n": n, "seed": 7, **constraint}
    outs = engine.generate(prompt="the scheduler sends", sampling_params=params)
    for out in outs:  # a grammar ends its output with the stop token, never by length here
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    return outs


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_json_validates_against_its_schema(engine: Engine, name: str) -> None:
    schema = SCHEMAS[name]
    outs = sample(engine, json_schema=json.dumps(schema))
    for out in outs:
        jsonschema.validate(json.loads(out["text"]), schema)
    assert len({out["text"] for out in outs}) > 1  # temperature 1 really samples


def test_any_json_object(engine: Engine) -> None:
    # Any object allows free-text keys and strings, which a random model rarely closes: only the
    # outputs that ended are whole JSON; every output is at least the start of an object.
    params = {
        "temperature": 1.0,
        "max_new_tokens": 300,
        "n": 12,
        "seed": 7,
        "json_schema": '{"type": "object"}',
    }
    outs = engine.generate(prompt="the scheduler sends", sampling_params=params)
    ended = [out for out in outs if out["meta_info"]["finish_reason"]["type"] == "stop"]
    assert len(ended) >= 6
    assert all(isinstance(json.loads(out["text"]), dict) for out in ended)
    assert all(out["text"].startswith("{") for out in outs)


def test_regex_outputs_match_in_full(engine: Engine) -> None:
    pattern = r"[A-Z][a-z]{1,5}-\d{2,3}( (ok|no))?"
    for out in sample(engine, regex=pattern):
        assert re.fullmatch(pattern, out["text"]), out["text"]


def test_ebnf_outputs_are_in_the_language(engine: Engine) -> None:
    for out in sample(engine, ebnf=ARITHMETIC_EBNF):
        text = out["text"]
        assert re.fullmatch(r"[0-9+\-*/()]+", text), text
        tree = ast.parse(text, mode="eval")  # raises SyntaxError if not an expression
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text


def test_structural_tag_tool_call_validates(engine: Engine) -> None:
    call = re.compile(r'<tool_call>\n\{"name": "get_weather", "arguments": (.*)\}\n</tool_call>', re.S)
    for out in sample(engine, structural_tag=json.dumps(TOOL_TAG)):
        match = call.search(out["text"])
        assert match is not None, out["text"]
        jsonschema.validate(json.loads(match.group(1)), WEATHER_PARAMS)


def test_greedy_matches_hf_under_the_same_grammar(engine: Engine, tiny_llama: Path) -> None:
    schema = json.dumps(SCHEMAS["nested"])
    prompt = engine.tokenizer.encode("the engine caches")
    out = engine.generate(
        input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 80, "json_schema": schema}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    compiler = GrammarCompiler(tokenizer, engine.core.runner.vocab_size, engine.core.eos_ids)
    matcher = xgr.GrammarMatcher(compiler.compile("json_schema", schema).result())
    assert out["output_ids"] == hf_greedy_constrained(tiny_llama, prompt, 80, matcher)
    json.loads(out["text"])


def test_constrained_rows_leave_the_others_alone(engine: Engine) -> None:
    plain = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    alone = engine.generate(prompt="every request waits for", sampling_params=plain)
    mixed = engine.generate(
        prompt=["every request waits for", "a small dog", "the cat"],
        sampling_params=[plain, {"regex": "[0-9]{4}"}, {"json_schema": '{"type": "object"}'}],
    )
    assert mixed[0]["output_ids"] == alone["output_ids"]
    assert re.fullmatch("[0-9]{4}", mixed[1]["text"])


@pytest.mark.parametrize(
    ("ebnf", "finishes"),
    [
        ('root ::= "a" root', False),
        ('root ::= root "a"', False),
        ("root ::= r\nr ::= r", False),
        ('root ::= "a" r\nr ::= "b" r | "c" root', False),
        ('root ::= "a"{2,} root', False),
        ('root ::= "a" b\nb ::= "c" | "d" b', True),
        ('root ::= [a-z]* "x"?', True),
        ('root ::= "a"{2,3} | [^a]', True),
        ('root ::= ""', True),
    ],
)
def test_can_finish_finds_grammars_without_a_finite_output(ebnf: str, finishes: bool) -> None:
    assert can_finish(xgr.Grammar.from_ebnf(ebnf)) is finishes
    assert can_finish(xgr.Grammar.builtin_json_grammar())


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
        ({"json_schema": '{"type": "wat"}'}, 'json_schema is invalid: Unsupported type "wat"'),
        ({"regex": "a(b"}, "regex is invalid: Regex parsing error at position 4"),
        ({"ebnf": "root ::= undefined_rule"}, 'ebnf is invalid: .*Rule "undefined_rule" is not defined'),
        ({"structural_tag": "{}"}, "structural_tag is invalid"),
        ({"regex": "a", "ebnf": "root ::= [a]"}, "at most one constraint"),
        # Parses, but never ends: refused as a bad request, not failed (and retried) at its first token.
        ({"ebnf": 'root ::= root "a"'}, "ebnf could not be compiled: ebnf admits no finite output"),
        # Every token allowed, no output ever complete.
        ({"ebnf": 'root ::= "a" root'}, "ebnf could not be compiled: ebnf admits no finite output"),
        ({"regex": "[^\\s\\S]"}, "regex could not be compiled: regex admits no output"),
    ],
)
def test_bad_constraints_are_refused_and_serving_goes_on(
    engine: Engine, constraint: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt="x", sampling_params=constraint)
    out = engine.generate(prompt="x", sampling_params={"max_new_tokens": 3, "regex": "[ab]{3}"})
    assert re.fullmatch("[ab]{3}", out["text"])


def big_schema(properties: int) -> str:
    props = {f"field_{i}": {"enum": [f"v{i}_{j}" for j in range(8)]} for i in range(properties)}
    return json.dumps({"type": "object", "properties": props, "required": list(props)})


def test_a_slow_compile_is_refused_then_served_from_the_cache(tiny_llama: Path) -> None:
    schema = big_schema(120)
    with Engine(model_path=str(tiny_llama), max_total_tokens=1024, grammar_compile_timeout_s=1e-6) as eng:
        with pytest.raises(ValueError, match="compiling the json_schema took too long"):
            eng.generate(prompt="x", sampling_params={"json_schema": schema, "max_new_tokens": 4})
        compiled = eng.core.grammars.compile("json_schema", schema)  # the refused request's compile
        compiled.result(timeout=60)
        misses = eng.core.grammars.misses
        out = eng.generate(prompt="x", sampling_params={"json_schema": schema, "max_new_tokens": 4})
        assert out["output_ids"] and eng.core.grammars.misses == misses  # a cache hit, no recompile


def test_compiler_cache_is_bounded_and_shared(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [1], cache_size=2)
    a = compiler.compile("regex", "a+")
    assert compiler.compile("regex", "a+") is a and compiler.hits == 1
    compiler.compile("regex", "b+")
    compiler.compile("regex", "c+")  # evicts a+
    assert compiler.compile("regex", "a+") is not a and compiler.misses == 4
    compiler.close()


def test_waiting_for_a_grammar_admits_later_or_aborts_cleanly(tiny_llama: Path) -> None:
    core = build_core(tiny_llama)
    gate: Future[Any] = Future()
    real = core.grammars.compile
    core.grammars.compile = lambda kind, source: gate  # type: ignore[method-assign]
    params = SamplingParams(max_new_tokens=4, regex="[0-9]+", n=2)
    assert core.add_request(["a", "b"], [5, 6, 7], params) is False
    assert core.waiting_in_background and not core.has_work
    core.abort("a")  # the caller leaves while its grammar compiles: the whole add is refused
    ((rids, pages, error, reservation),) = core.take_admissions()
    assert (rids, pages, reservation) == (["a", "b"], None, False)
    assert isinstance(error, Unavailable) and error.message == "aborted"
    assert not core.waiting_in_background

    assert core.add_request(["c"], [5, 6, 7], SamplingParams(max_new_tokens=4, regex="[0-9]+")) is False
    assert core.step() == [] and core.take_admissions() == []  # still compiling
    gate.set_result(real("regex", "[0-9]+").result())
    outputs = core.step()
    assert core.take_admissions() == [(["c"], None, None, False)]  # accepted before any output
    while core.has_work:
        outputs += core.step()
    assert re.fullmatch("[0-9]+", "".join(o.new_text for o in outputs))
    core.check_idle()


def test_mask_reference_matches_xgrammar_kernel() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=generator)
    ours, theirs = logits.clone(), logits.clone()
    apply_token_bitmask_reference(ours, bitmask)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, backend="torch_native")
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pd_decode_continues_the_grammar(tiny_llama: Path, transport: str) -> None:
    schema = SCHEMAS["bounded_array"]
    params = SamplingParams(max_new_tokens=120, temperature=1.0, seed=11, json_schema=json.dumps(schema))
    prompts = [[3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    # Overlap on, as on a GPU: a step with a grammar request is read before the next one.
    prefill, decode = make_pair(tiny_llama, transport, enable_overlap_schedule=True)
    tokens, last = run_pd(prefill, decode, prompts, params)
    unified = build_core(tiny_llama)
    for i, ids in enumerate(prompts):
        assert last[f"r{i}"].finish_reason is not None and last[f"r{i}"].finish_reason["type"] == "stop"
        # Seeded sampling is batch-independent: PD continues exactly where a unified engine would.
        unified.add_request([f"u{i}"], ids, params)
    outs: dict[str, list[int]] = {}
    while unified.has_work or unified.waiting_in_background:
        for out in unified.step():
            outs.setdefault(out.rid, []).extend(out.new_ids)
    wait_idle(unified)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for i in range(len(prompts)):
        assert tokens[f"r{i}"] == outs[f"u{i}"]
        jsonschema.validate(json.loads(tokenizer.decode(tokens[f"r{i}"], skip_special_tokens=True)), schema)


# Strings bounded by length: xgrammar's own length class admits raw control characters.
BOUNDED_STRINGS = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "maxLength": 6},
        "b": {"type": "string", "minLength": 2, "maxLength": 4},
        "c": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}


def _random_walk(
    tools: tuple[GrammarCompiler, Any], kind: str, source: str, rng: random.Random
) -> str | None:
    """One output of the compiled grammar with every step a uniformly random allowed token; None
    when it has not ended after 200 tokens."""
    compiler, tokenizer = tools
    matcher = xgr.GrammarMatcher(compiler.compile(kind, source).result())
    bitmask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    ids: list[int] = []
    for _ in range(200):
        if matcher.is_terminated():
            return str(tokenizer.decode(ids))
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: compiler.vocab_size]
        token = rng.choice(np.flatnonzero(bits).tolist())
        assert matcher.accept_token(token)
        if not matcher.is_terminated():
            ids.append(token)
    return None


@pytest.fixture(scope="module")
def compiler(tiny_llama: Path) -> tuple[GrammarCompiler, Any]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id]), tokenizer


def test_length_bounded_strings_always_parse(compiler: tuple[GrammarCompiler, Any]) -> None:
    rng = random.Random(0)
    outputs = [_random_walk(compiler, "json_schema", json.dumps(BOUNDED_STRINGS), rng) for _ in range(200)]
    assert all(out is not None for out in outputs)
    for out in outputs:
        assert out is not None
        value = json.loads(out)  # raw control characters would raise
        jsonschema.validate(value, BOUNDED_STRINGS)
        assert out == json.dumps(value, ensure_ascii=False)  # compact: `, ` and `: ` only


def test_a_length_bound_admits_every_plain_character_and_no_escape(capfd: pytest.CaptureFixture[str]) -> None:
    """The bounded pattern, byte by byte: characters up to U+10FFFF that JSON needs no escape for
    pass (the ends of its ranges included), quotes, backslashes and control characters do not,
    and xgrammar reads the pattern without a warning (an escape it lacked warned on every such
    schema)."""
    from shared.constrained.schema import json_schema_source

    vocab = [bytes([b]) for b in range(256)]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW)
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]}
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json_schema_source(json.dumps(schema)))

    def accepted(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        data = json.dumps({"a": text}, ensure_ascii=False).encode()  # xgrammar's `, ` and `: `
        return all(matcher.accept_token(b) for b in data) and matcher.is_terminated()

    for text in ("", "abc", " !#", "[]~", "\u007f\u00e9\u4e2d", "\ud7ff\ue000", "\U0001f600", "\U0010ffff"):
        assert accepted(text), repr(text)
    for text in ('a"b', "a\\b", "\x01", "\n", "abcd"):
        assert not accepted(text), repr(text)
    assert "not recognized" not in capfd.readouterr().err


def test_tool_call_arguments_are_compact_and_parse(compiler: tuple[GrammarCompiler, Any]) -> None:
    tag = copy.deepcopy(TOOL_TAG)
    tag["format"]["tags"][0]["content"]["json_schema"] = BOUNDED_STRINGS
    call = re.compile(r'<tool_call>\n\{"name": "get_weather", "arguments": (.*)\}\n</tool_call>', re.S)
    rng = random.Random(1)
    ended = 0
    for _ in range(200):
        out = _random_walk(compiler, "structural_tag", json.dumps(tag), rng)
        if out is None:  # the free text before the call runs on at random
            continue
        ended += 1
        match = call.search(out)
        assert match is not None, out
        arguments = match.group(1)
        value = json.loads(arguments)
        jsonschema.validate(value, BOUNDED_STRINGS)
        assert arguments == json.dumps(value, ensure_ascii=False)  # no whitespace padding
    assert ended >= 20


def test_length_bounded_strings_parse_when_the_engine_samples_them(engine: Engine) -> None:
    """The same schema through the engine: random weights at temperature 1, several seeds."""
    for seed in (1, 2, 3):
        params = {"temperature": 1.0, "max_new_tokens": 200, "n": 8, "seed": seed}
        outs = engine.generate(
            prompt="the scheduler sends",
            sampling_params={**params, "json_schema": json.dumps(BOUNDED_STRINGS)},
        )
        for out in outs:
            assert out["meta_info"]["finish_reason"]["type"] == "stop", out
            jsonschema.validate(
                json.loads(out["text"]), BOUNDED_STRINGS
            )  # raw control characters would raise


def test_tool_arguments_take_whitespace_only_with_json_any_whitespace() -> None:
    """`--json-any-whitespace` on: a call's arguments may be padded; off (the default): compact only."""
    from xgrammar.testing import _is_grammar_accept_string

    from shared.constrained.schema import structural_tag_source

    compact = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
    padded = '<tool_call>\n{"name": "get_weather", "arguments": { "city" :  "Oslo" ,"days":3 }}\n</tool_call>'
    accepts = {}
    for any_whitespace in (False, True):
        grammar = xgr.Grammar.from_structural_tag(structural_tag_source(json.dumps(TOOL_TAG), any_whitespace))
        accepts[any_whitespace] = [_is_grammar_accept_string(grammar, text) for text in (compact, padded)]
    assert accepts == {False: [True, False], True: [True, True]}
