"""Tool calling through the HTTP stack: tools rendered and turned into a structural tag, scripted
outputs parsed into `tool_calls` (whole and streamed), and every 400 of `tools` / `tool_choice`."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import xgrammar
from transformers import AutoTokenizer
from xgrammar.testing import _is_grammar_accept_string

from services.gateway import GatewayConfig
from services.gateway.args import parse_args
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter, split_text

pytestmark = pytest.mark.xdist_group("gateway_tools")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: no arguments
]
MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
PARIS = '{"city": "Paris", "unit": "c"}'
LYON = '{"city": "Ly\\"on {}"}'  # an escaped quote and braces inside a string
CALL_PARIS = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
CALL_LYON = f'<tool_call>\n{{"name": "get_weather", "arguments": {LYON}}}\n</tool_call>'


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    # The tool prompt alone is longer than the default stub's 256-token context.
    router = StubRouter(tokenizer_dir, max_context_len=2048).start()
    yield router
    router.stop()


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tag(stub: StubRouter) -> dict[str, Any]:
    return json.loads(stub.last_request.sampling_params.structural_tag)


def _accepts(stub: StubRouter, text: str) -> bool:
    """Whether the grammar the gateway sent accepts `text` (the scripts must be outputs it allows)."""
    grammar = xgrammar.Grammar.from_structural_tag(stub.last_request.sampling_params.structural_tag)
    return _is_grammar_accept_string(grammar, text)


def test_tools_are_rendered_and_constrained(
    client: openai.OpenAI, stub: StubRouter, hf_tokenizer: Any
) -> None:
    client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, max_tokens=50)
    request = stub.last_request
    assert request.text == hf_tokenizer.apply_chat_template(
        MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert "<tools>\n" + json.dumps(TOOLS[0]) in request.text
    assert json.loads(request.sampling_params.structural_tag) == {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": ["<tool_call>"],
            "tags": [
                {
                    "type": "tag",
                    "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
                    "content": {"type": "json_schema", "json_schema": WEATHER},
                    "end": "}\n</tool_call>",
                },
                {
                    "type": "tag",
                    "begin": '<tool_call>\n{"name": "get_time", "arguments": ',
                    "content": {"type": "json_schema", "json_schema": {"type": "object", "properties": {}}},
                    "end": "}\n</tool_call>",
                },
            ],
            "at_least_one": False,
            "stop_after_first": False,
        },
    }


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # required: nothing but the calls (tags with a separator), so the output ends with them
        (
            {"tool_choice": "required"},
            {"type": "tags_with_separator", "at_least_one": True, "stop_after_first": False},
        ),
        (
            {"tool_choice": "auto", "parallel_tool_calls": False},
            {"type": "triggered_tags", "at_least_one": False, "stop_after_first": True},
        ),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "tags_with_separator", "at_least_one": True, "stop_after_first": True},
        ),
    ],
)
def test_tool_choice_sets_the_tags(
    http: httpx.Client, stub: StubRouter, change: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 5, **change}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    fmt = _tag(stub)["format"]
    assert {k: fmt[k] for k in expected} == expected


def test_named_tool_choice_is_a_single_tag(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script([CALL_PARIS])
    reply = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert _tag(stub)["format"] == {
        "type": "tag",
        "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
        "content": {"type": "json_schema", "json_schema": WEATHER},
        "end": "}\n</tool_call>",
    }
    assert _accepts(stub, CALL_PARIS) and not _accepts(stub, "Sure. " + CALL_PARIS)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.arguments == PARIS


def test_tool_choice_none_renders_tools_but_neither_constrains_nor_parses(
    client: openai.OpenAI, stub: StubRouter
) -> None:
    stub.script([CALL_PARIS])
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert stub.last_request.sampling_params.WhichOneof("constraint") is None
    assert "<tools>" in stub.last_request.text
    assert reply.choices[0].message.content == CALL_PARIS and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


# Scripted outputs: (pieces per sample, finish per sample) and what each choice must come out as.
SCRIPTS: dict[str, tuple[list[str], str, str | None, list[tuple[str, str]], str]] = {
    # name: (output, engine finish, content, [(function, arguments)], finish_reason)
    "text and one call": (
        "I will look.\n" + CALL_PARIS,
        "stop",
        "I will look.\n",
        [("get_weather", PARIS)],
        "tool_calls",
    ),
    "two parallel calls": (
        CALL_PARIS + "\n" + CALL_LYON,
        "stop",
        None,
        [("get_weather", PARIS), ("get_weather", LYON)],
        "tool_calls",
    ),
    "call cut by length": ("Hm. " + CALL_PARIS[:58], "length", "Hm. " + CALL_PARIS[:58], [], "length"),
    "content only": ("It is sunny <3 {ok}", "stop", "It is sunny <3 {ok}", [], "stop"),
    "a call then cut": (
        CALL_PARIS + "\n" + CALL_LYON[:60],
        "length",
        "\n" + CALL_LYON[:60],
        [("get_weather", PARIS)],
        "length",
    ),
}


def _check_message(message: Any, finish: str, expected: tuple[Any, ...]) -> None:
    _, _, content, calls, reason = expected
    assert message.content == content and finish == reason
    got = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert got == calls
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
        json.loads(call.function.arguments)


@pytest.mark.parametrize("name", SCRIPTS, ids=list(SCRIPTS))
def test_tool_calls_parsed(client: openai.OpenAI, stub: StubRouter, name: str) -> None:
    output, engine_finish, *_ = SCRIPTS[name]
    stub.script(split_text(output), finish=engine_finish)
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS)
    if engine_finish == "stop":
        assert _accepts(stub, output)
    _check_message(reply.choices[0].message, reply.choices[0].finish_reason, SCRIPTS[name])


def _collect_stream(chunks: list[Any], n: int) -> list[dict[str, Any]]:
    """Per choice: content, calls (id, name, arguments) and the finish reason, from stream chunks."""
    out: list[dict[str, Any]] = [{"content": "", "calls": {}, "finish": None} for _ in range(n)]
    for chunk in chunks:
        for choice in chunk.choices:
            state, delta = out[choice.index], choice.delta
            state["content"] += delta.content or ""
            for call in delta.tool_calls or []:
                if call.id is not None:
                    assert call.index not in state["calls"] and call.function.arguments == ""
                    state["calls"][call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.function.name is None
                state["calls"][call.index]["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                assert state["finish"] is None
                state["finish"] = choice.finish_reason
    return out


@pytest.mark.parametrize("name", SCRIPTS, ids=list(SCRIPTS))
@pytest.mark.parametrize("sizes", [(1,), (3, 1, 4), (1000,)], ids=["by-char", "awkward", "whole"])
def test_tool_calls_streamed(
    client: openai.OpenAI, stub: StubRouter, name: str, sizes: tuple[int, ...]
) -> None:
    output, engine_finish, content, calls, reason = SCRIPTS[name]
    stub.script(split_text(output, sizes), finish=engine_finish)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, stream=True))
    (got,) = _collect_stream(chunks, 1)
    assert got["finish"] == reason
    # A call cut by length was streamed as far as it went; the whole response shows it as content.
    streamed_calls = [(c["name"], c["arguments"]) for c in got["calls"].values()]
    if reason == "length":
        # Streamed: the complete calls, then the cut one as far as it went (its text is no content).
        assert streamed_calls[: len(calls)] == calls and len(streamed_calls) == len(calls) + 1
        assert content.startswith(got["content"]) and output.endswith(streamed_calls[-1][1])
        return
    assert (got["content"] or None) == content and streamed_calls == calls
    for _, arguments in streamed_calls:
        json.loads(arguments)
    assert chunks[0].choices[0].delta.role == "assistant"


def test_n2_each_choice_parsed_on_its_own(client: openai.OpenAI, stub: StubRouter) -> None:
    outputs = ["I will look.\n" + CALL_PARIS, "No tool needed."]
    stub.script(*[split_text(o) for o in outputs])
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, n=2)
    _check_message(reply.choices[0].message, reply.choices[0].finish_reason, SCRIPTS["text and one call"])
    assert reply.choices[1].message.content == "No tool needed." and reply.choices[1].finish_reason == "stop"

    stub.script(*[split_text(o, (2, 1)) for o in outputs])
    chunks = list(
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=TOOLS, n=2, stream=True)
    )
    first, second = _collect_stream(chunks, 2)
    assert first["content"] == "I will look.\n" and first["finish"] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in first["calls"].values()] == [("get_weather", PARIS)]
    assert second == {"content": "No tool needed.", "calls": {}, "finish": "stop"}


def test_streamed_logprobs_cover_every_token(
    client: openai.OpenAI, stub: StubRouter, hf_tokenizer: Any
) -> None:
    output = "Ok " + CALL_PARIS
    stub.script(split_text(output))
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, tools=TOOLS, stream=True, logprobs=True
        )
    )
    tokens = [e.token for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    expected = [t for p in split_text(output) for t in hf_tokenizer.encode(p, add_special_tokens=False)]
    assert len(tokens) == len(expected)


def test_tool_messages_are_accepted_and_rendered(
    client: openai.OpenAI, stub: StubRouter, hf_tokenizer: Any
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": LYON}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "18 C"}]},
    ]
    stub.script(["Paris 21, Lyon 18."])
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    assert reply.choices[0].message.content == "Paris 21, Lyon 18."
    # As HF templates expect: arguments parsed, null content as "", text parts joined.
    template_messages = copy.deepcopy(messages)
    template_messages[2]["content"] = ""
    template_messages[4]["content"] = "18 C"
    for call in template_messages[2]["tool_calls"]:
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    expected = hf_tokenizer.apply_chat_template(
        template_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert stub.last_request.text == expected
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' + PARIS + "}\n</tool_call>" in expected
    assert "<|im_start|>user\n<tool_response>\n21 C\n</tool_response>\n<tool_response>\n18 C" in expected
    # Without tools in this request, the history still renders.
    client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=2)
    assert "<tool_response>\n21 C" in stub.last_request.text and "<tools>" not in stub.last_request.text


CHAT = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[0], TOOLS[1], TOOLS[0]]}, "tools[2].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "custom", "name": "x"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": TOOLS, "functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "tool", "content": "21 C"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
        (
            {
                "messages": [
                    *MESSAGES,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tools_are_400(http: httpx.Client, change: dict[str, Any], param: str) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert http.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS}).status_code == 200


def test_no_tools_accepts_the_defaults(http: httpx.Client, stub: StubRouter) -> None:
    body = {**CHAT, "tools": [], "tool_choice": "none", "parallel_tool_calls": True}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    assert stub.last_request.sampling_params.WhichOneof("constraint") is None
    assert "<tools>" not in stub.last_request.text


def test_llama3_json_parser_flag(stub: StubRouter, tokenizer_dir: Path) -> None:
    assert (
        parse_args(
            ["--router", "r:1", "--tokenizer", "t", "--tool-call-parser", "llama3_json"]
        ).tool_call_parser
        == "llama3_json"
    )
    assert parse_args(["--router", "r:1", "--tokenizer", "t"]).tool_call_parser == "auto"
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), tool_call_parser="llama3_json")
    gateway = GatewayThread(config).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10)
        output = f'{{"name": "get_weather", "parameters": {PARIS}}}'
        stub.script(split_text(output))
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=MESSAGES, tools=TOOLS, tool_choice="required"
        )
        fmt = _tag(stub)["format"]
        assert fmt["type"] == "tags_with_separator"
        assert fmt["tags"][0]["begin"] == '{"name": "get_weather", "parameters": '
        assert fmt["tags"][0]["end"] == "}" and _accepts(stub, output)
        assert reply.choices[0].finish_reason == "tool_calls" and reply.choices[0].message.content is None
        assert reply.choices[0].message.tool_calls[0].function.arguments == PARIS
    finally:
        gateway.stop()
