"""vLLM's and SGLang's request extras: `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`, `structured_outputs` and SGLang's `json_schema` reach the router as the same
`constraint` their native twins send (never ignored); `include_stop_str_in_output` is
`no_stop_trim`, `add_special_tokens` reaches the tokenizer; conflicts, and every other option of
the peers that Tandem does not honour, are 400s naming the field unless the value is the peer's
default; `chat_template_kwargs` reaches the chat template."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from services.gateway import GatewayConfig
from services.gateway.constraints import choice_regex
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_vllm_extras")

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "The cat runs."}], "max_tokens": 2}
COMPLETION = {"model": MODEL_ID, "prompt": "The cat runs.", "max_tokens": 2}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
GRAMMAR = 'root ::= "yes" | "no"'
PATHS = ["/v1/chat/completions", "/v1/completions"]
# The template variable a test sets through chat_template_kwargs (Qwen3 reads `enable_thinking`).
THINKING_SWITCH = "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}"


@pytest.fixture(scope="module")
def template_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with a chat template that reads `enable_thinking`."""
    out = tmp_path_factory.mktemp("thinking-tokenizer")
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = THINKING_SWITCH + config["chat_template"]
    config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def gateway(stub: StubRouter, template_dir: Path) -> Iterator[GatewayThread]:
    server = GatewayThread(GatewayConfig(router=stub.address, tokenizer=str(template_dir))).start()
    yield server
    server.stop()


def _body(path: str, change: dict[str, Any]) -> dict[str, Any]:
    return {**(CHAT if "chat" in path else COMPLETION), **change}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({"guided_json": PERSON}, "json_schema", json.dumps(PERSON)),
        ({"guided_json": json.dumps(PERSON)}, "json_schema", json.dumps(PERSON)),
        ({"guided_regex": "(yes|no)[.!]"}, "regex", "(yes|no)[.!]"),
        ({"guided_choice": ["yes", "no"]}, "regex", "(yes|no)"),
        ({"guided_grammar": GRAMMAR}, "ebnf", GRAMMAR),
        ({"structured_outputs": {"json": PERSON}}, "json_schema", json.dumps(PERSON)),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
        ({"structured_outputs": {"choice": ["a.b", "c"]}}, "regex", r"(a\.b|c)"),
        ({"structured_outputs": {"grammar": GRAMMAR}}, "ebnf", GRAMMAR),
        ({"structured_outputs": {"json_object": True}}, "json_schema", '{"type": "object"}'),
        ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "regex", "a"),
        ({"json_schema": PERSON}, "json_schema", json.dumps(PERSON)),
        ({"json_schema": json.dumps(PERSON)}, "json_schema", json.dumps(PERSON)),
    ],
)
def test_vllm_extra_reaches_the_router(
    http: httpx.Client, stub: StubRouter, path: str, change: dict[str, Any], field: str, value: str
) -> None:
    response = http.post(path, json=_body(path, change))
    assert response.status_code == 200, response.text
    params = stub.last_request.sampling_params
    assert params.WhichOneof("constraint") == field
    got = getattr(params, field)
    assert json.loads(got) == json.loads(value) if field == "json_schema" else got == value


def test_openai_client_extra_body(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(["po", "sitive"])
    reply = client.chat.completions.create(
        model=MODEL_ID,
        messages=CHAT["messages"],
        extra_body={"guided_choice": ["positive", "negative"]},
    )
    assert stub.last_request.sampling_params.regex == "(positive|negative)"
    assert reply.choices[0].message.content == "positive"
    client.completions.create(
        model=MODEL_ID, prompt="Name?", max_tokens=2, extra_body={"structured_outputs": {"json": PERSON}}
    )
    assert json.loads(stub.last_request.sampling_params.json_schema) == PERSON


def test_choice_regex_matches_each_choice_literally() -> None:
    choices = ["a.b", "(x|y)*", "back\\slash", 'quote"s', "tab\there", "new\nline", "[1-2]{3}", "^$/", "é 😀"]
    grammar = xgrammar.Grammar.from_regex(choice_regex(choices, "guided_choice"))
    for choice in choices:
        assert _is_grammar_accept_string(grammar, choice), choice
    for other in ["a", "axb", "x", "xy", "back\\\\slash", "tab here", "1", "a.ba.b", ""]:
        assert not _is_grammar_accept_string(grammar, other), other


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/completions", {"regex": "a", "guided_regex": "b"}, "guided_regex"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}, "guided_json": PERSON},
            "guided_json",
        ),
        ("/v1/completions", {"guided_choice": ["a"], "guided_grammar": GRAMMAR}, "guided_grammar"),
        (
            "/v1/chat/completions",
            {"guided_json": PERSON, "structured_outputs": {"regex": "a"}},
            "structured_outputs.regex",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs.choice",
        ),
        (
            "/v1/completions",
            {"structured_outputs": {"whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
        ),
        ("/v1/completions", {"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
        ("/v1/chat/completions", {"guided_choice": []}, "guided_choice"),
        ("/v1/chat/completions", {"guided_choice": ["a", ""]}, "guided_choice"),
        ("/v1/chat/completions", {"guided_choice": "yes"}, "guided_choice"),
        ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
        ("/v1/completions", {"guided_json": "[1, 2]"}, "guided_json"),
        ("/v1/completions", {"guided_json": 5}, "guided_json"),
        ("/v1/completions", {"structured_outputs": {"json": [1]}}, "structured_outputs.json"),
        ("/v1/completions", {"guided_regex": ""}, "guided_regex"),
        ("/v1/completions", {"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ("/v1/chat/completions", {"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ("/v1/chat/completions", {"json_schema": PERSON, "regex": "a"}, "json_schema"),
        ("/v1/completions", {"json_schema": "{not json"}, "json_schema"),
        (
            "/v1/completions",
            {"include_stop_str_in_output": True, "no_stop_trim": False},
            "include_stop_str_in_output",
        ),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}], "guided_regex": "a"},
            "guided_regex",
        ),
    ],
)
def test_bad_or_conflicting_extra_is_a_400(
    http: httpx.Client, path: str, change: dict[str, Any], param: str
) -> None:
    response = http.post(path, json=_body(path, change))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"guided_json": {"type": "objec"}}, "guided_json"),
        ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs.grammar"),
        ({"regex": "(unclosed"}, "regex"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": {"type": "objec"}},
                }
            },
            "response_format",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_engine_rejection_names_the_request_field(
    http: httpx.Client, change: dict[str, Any], param: str, stream: bool
) -> None:
    # The stub compiles with xgrammar and answers INVALID_ARGUMENT naming the proto field.
    response = http.post("/v1/completions", json=_body("/v1/completions", {**change, "stream": stream}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "is invalid" in error["message"], error


def test_constraint_size_limit_covers_vllm_fields(http: httpx.Client) -> None:
    # The default limit is the engine's 256 Ki characters.
    response = http.post("/v1/completions", json=_body("/v1/completions", {"guided_choice": ["x" * 300_000]}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "guided_choice"


def test_chat_template_kwargs_reach_the_template(http: httpx.Client, stub: StubRouter) -> None:
    response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert "<no-think>" not in stub.last_request.text
    body = {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert stub.last_request.text.startswith("<no-think>")


@pytest.mark.parametrize("key", ["tokenize", "add_generation_prompt", "messages", "return_dict"])
def test_chat_template_kwargs_may_not_set_what_the_server_sets(http: httpx.Client, key: str) -> None:
    body = {**CHAT, "chat_template_kwargs": {key: True}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == f"chat_template_kwargs.{key}"


# Each peer option Tandem does not honour: a value that changes nothing (the peer's default) and
# one that would; the second must be a 400 naming it on every endpoint that has it.
BOTH_ENDPOINTS = [
    ("use_beam_search", False, True),
    ("length_penalty", 1.0, 0.5),
    ("bad_words", [], ["cat"]),
    ("allowed_token_ids", None, [1, 2]),
    ("prompt_logprobs", None, 1),
    ("truncate_prompt_tokens", None, 8),
    ("logits_processors", [], ["my.module:Processor"]),
    ("custom_logit_processor", None, "serialized"),
    ("return_tokens_as_token_ids", False, True),
    ("return_hidden_states", False, True),
    ("priority", 0, 5),
    ("lora_path", None, "adapter"),
    ("mm_processor_kwargs", {}, {"num_crops": 4}),
    ("vllm_xargs", {}, {"k": 1}),
    ("kv_transfer_params", {}, {"do_remote_decode": True}),
    ("cache_salt", None, "salt"),
    ("request_id", None, "mine"),
    ("rid", None, "mine"),
    ("session_params", None, {"id": "s"}),
    ("return_token_ids", False, True),
    ("prompt_embeds", None, "AAAA"),
    ("bootstrap_host", None, "10.0.0.1"),
    ("bootstrap_port", None, 8998),
    ("bootstrap_room", None, 7),
]
CHAT_ONLY = [
    ("best_of", 1, 2),
    ("echo", False, True),
    ("add_generation_prompt", True, False),
    ("continue_final_message", False, True),
    ("add_special_tokens", False, True),
    ("chat_template", None, "{{ messages }}"),
    ("documents", [], [{"title": "t", "text": "x"}]),
    ("separate_reasoning", True, False),
    ("stream_reasoning", True, False),
    ("include_reasoning", True, False),
]
PEER_CASES = [(path, *case) for path in PATHS for case in BOTH_ENDPOINTS] + [
    ("/v1/chat/completions", *case) for case in CHAT_ONLY
]


@pytest.mark.parametrize(("path", "field", "default", "other"), PEER_CASES)
def test_a_peer_option_is_honoured_or_a_400_never_ignored(
    http: httpx.Client, path: str, field: str, default: Any, other: Any
) -> None:
    if default is not None:
        response = http.post(path, json=_body(path, {field: default}))
        assert response.status_code == 200, (field, response.text)
    response = http.post(path, json=_body(path, {field: other}))
    assert response.status_code == 400, (field, response.text)
    error = response.json()["error"]
    assert error["param"] == field and "not supported" in error["message"], error


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("body", "trim"),
    [
        ({"include_stop_str_in_output": True}, True),
        ({"include_stop_str_in_output": False}, False),
        ({"no_stop_trim": True, "include_stop_str_in_output": True}, True),
    ],
)
def test_include_stop_str_in_output_is_no_stop_trim(
    http: httpx.Client, stub: StubRouter, path: str, body: dict[str, Any], trim: bool
) -> None:
    response = http.post(path, json=_body(path, {**body, "stop": ["."]}))
    assert response.status_code == 200, response.text
    params = stub.last_request.sampling_params
    assert params.HasField("no_stop_trim") and params.no_stop_trim is trim


def test_add_special_tokens_reaches_the_tokenizer_on_completions(
    http: httpx.Client, stub: StubRouter, template_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(template_dir)
    ids = {}
    for special in (True, False):
        response = http.post("/v1/completions", json={**COMPLETION, "add_special_tokens": special})
        assert response.status_code == 200, response.text
        ids[special] = list(stub.last_request.token_ids)
        assert ids[special] == tokenizer.encode(COMPLETION["prompt"], add_special_tokens=special)
    assert ids[True] != ids[False]  # the tiny tokenizer adds BOS
    response = http.post("/v1/completions", json=COMPLETION)
    assert list(stub.last_request.token_ids) == ids[True]  # vLLM's default for completions


@pytest.mark.parametrize("path", PATHS)
def test_continuous_usage_stats_is_a_400_not_ignored(http: httpx.Client, path: str) -> None:
    """vLLM's `stream_options.continuous_usage_stats` (usage in every chunk) is not honoured."""
    options = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    with http.stream("POST", path, json=_body(path, options)) as response:
        assert response.status_code == 200
    options["stream_options"]["continuous_usage_stats"] = True  # type: ignore[index]
    response = http.post(path, json=_body(path, options))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "stream_options.continuous_usage_stats"


def test_best_of_equal_to_n_is_honoured_on_completions(http: httpx.Client, stub: StubRouter) -> None:
    """best_of = n (the default) asks for nothing more; any other value is a 400 naming it."""
    response = http.post("/v1/completions", json={**COMPLETION, "n": 2, "best_of": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
    for body, param in (({"n": 2, "best_of": 3}, "best_of"), ({"best_of": 0}, "best_of")):
        response = http.post("/v1/completions", json={**COMPLETION, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
