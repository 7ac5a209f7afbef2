"""Structured outputs and tool calls through the whole suite (`tandem up`: gateway, router, a
prefill and a decode worker), driven by the official `openai` client. The model has random
weights, so only the grammar can make its sampled output parse: every output must."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_structured")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "main": {"type": "boolean"}},
            "required": ["zip"],
        },
    },
    "required": ["name", "age", "tags"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]},
    },
}
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("structured")) as info:
        yield info


def chat(client: openai.OpenAI, up: dict[str, Any], **kwargs: Any) -> Any:
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=up["model"], temperature=1.0, **kwargs)


def test_json_schema_outputs_validate(client: openai.OpenAI, up: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    resp = chat(client, up, n=6, seed=3, response_format=fmt)
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in resp.choices}) > 1


def test_json_schema_streamed(client: openai.OpenAI, up: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    for chunk in chat(client, up, n=2, seed=5, response_format=fmt, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert finish == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object(client: openai.OpenAI, up: dict[str, Any]) -> None:
    resp = chat(client, up, n=4, seed=1, max_tokens=300, response_format={"type": "json_object"})
    ended = [c for c in resp.choices if c.finish_reason == "stop"]
    assert ended  # free-text keys can run long for a random model; what ended is an object
    assert all(isinstance(json.loads(c.message.content), dict) for c in ended)


def test_regex_and_ebnf_extras(client: openai.OpenAI, up: dict[str, Any]) -> None:
    pattern = r"[A-Z]{2}-\d{3}( [a-z]{2,4})?"
    resp = client.completions.create(
        model=up["model"],
        prompt="the cat",
        n=4,
        max_tokens=40,
        temperature=1.0,
        extra_body={"regex": pattern},
    )
    for choice in resp.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(pattern, choice.text), choice.text
    grammar = 'root ::= num (("+" | "*") num){0,3}\nnum ::= [1-9] [0-9]{0,2} | "(" num "+" num ")"'
    resp = chat(client, up, n=4, max_tokens=60, extra_body={"ebnf": grammar})
    for choice in resp.choices:
        text = choice.message.content
        assert choice.finish_reason == "stop" and re.fullmatch(r"[0-9+*()]+", text), text
        ast.parse(text, mode="eval")


def check_call(call: Any, tools: dict[str, dict[str, Any]]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(
        json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"]
    )


def test_required_and_named_tool_calls(client: openai.OpenAI, up: dict[str, Any]) -> None:
    tools = {"get_weather": WEATHER, "get_time": TIME}
    resp = chat(
        client, up, n=4, seed=2, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False
    )
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        check_call(call, tools)
    named = {"type": "function", "function": {"name": "get_time"}}
    resp = chat(client, up, n=2, tools=[WEATHER, TIME], tool_choice=named)
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        check_call(choice.message.tool_calls[0], tools)


def test_streamed_tool_calls_reassemble(client: openai.OpenAI, up: dict[str, Any]) -> None:
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    stream = chat(
        client, up, seed=9, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"arguments": ""})
                if delta.id:
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_tool_conversation_round_trip(client: openai.OpenAI, up: dict[str, Any]) -> None:
    first = chat(client, up, seed=4, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 14}'},
    ]
    second = chat(client, up, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert (
        second.choices[0].message.tool_calls is None
        and second.usage.prompt_tokens > first.usage.prompt_tokens
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "u"}}}},
         'Unsupported type "u"'),
        ({"extra_body": {"regex": "a(b"}}, "Regex parsing error"),
        ({"extra_body": {"ebnf": "root ::= nowhere"}}, 'Rule "nowhere" is not defined'),
        ({"extra_body": {"regex": "a" * 300_000}}, "regex is too large"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400_and_serving_goes_on(
    client: openai.OpenAI, up: dict[str, Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        chat(client, up, **kwargs)
    ok = chat(client, up, max_tokens=10, extra_body={"regex": "[ab]{10}"})
    assert re.fullmatch("[ab]{10}", ok.choices[0].message.content)


def test_vllm_guided_choice_and_json(client: openai.OpenAI, up: dict[str, Any]) -> None:
    # vLLM's extras constrain the real engine's output like their native twins.
    choices = ["red", "green", "dark (blue)?", "a|b"]
    resp = chat(client, up, n=6, seed=5, extra_body={"guided_choice": choices})
    for choice in resp.choices:
        assert choice.finish_reason == "stop" and choice.message.content in choices
    completion = client.completions.create(
        model=up["model"],
        prompt="A person:",
        max_tokens=200,
        temperature=1.0,
        n=4,
        seed=7,
        extra_body={"guided_json": PERSON},
    )
    for out in completion.choices:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PERSON)
