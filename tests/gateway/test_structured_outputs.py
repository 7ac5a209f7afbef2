"""Structured outputs: `response_format`, `regex` and `ebnf` reach the router as SamplingParams'
`constraint`, at most one per request; bad shapes and constraints the engine cannot compile are 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_structured")

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "The cat runs."}], "max_tokens": 2}
COMPLETION = {"model": MODEL_ID, "prompt": "The cat runs.", "max_tokens": 2}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
ANY_OBJECT = '{"type": "object"}'


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    # A tool prompt alone is longer than the default stub's 256-token context.
    router = StubRouter(tokenizer_dir, max_context_len=2048).start()
    yield router
    router.stop()


def _body(path: str, change: dict[str, Any]) -> dict[str, Any]:
    return {**(CHAT if "chat" in path else COMPLETION), **change}


def _assert_still_works(http: httpx.Client) -> None:
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({}, None, None),
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, "json_schema", ANY_OBJECT),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}},
            "json_schema",
            json.dumps(PERSON),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "any"}}},
            "json_schema",
            ANY_OBJECT,
        ),
        ({"regex": "(yes|no)[.!]"}, "regex", "(yes|no)[.!]"),
        ({"ebnf": 'root ::= "yes" | "no"'}, "ebnf", 'root ::= "yes" | "no"'),
    ],
)
def test_constraint_reaches_the_router(
    http: httpx.Client,
    stub: StubRouter,
    path: str,
    change: dict[str, Any],
    field: str | None,
    value: str | None,
) -> None:
    response = http.post(path, json=_body(path, change))
    assert response.status_code == 200, response.text
    params = stub.last_request.sampling_params
    assert params.WhichOneof("constraint") == field
    if field is not None:
        assert getattr(params, field) == value
        if field == "json_schema":
            assert json.loads(getattr(params, field)) == json.loads(value)


def test_openai_client_json_schema_and_regex(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(['{"name": "Ada", ', '"age": 36}'])
    reply = client.chat.completions.create(
        model=MODEL_ID,
        messages=CHAT["messages"],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    assert json.loads(stub.last_request.sampling_params.json_schema) == PERSON
    assert json.loads(reply.choices[0].message.content) == {"name": "Ada", "age": 36}
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.tool_calls is None
    client.completions.create(
        model=MODEL_ID, prompt="Yes or no?", max_tokens=2, extra_body={"regex": "yes|no"}
    )
    assert stub.last_request.sampling_params.regex == "yes|no"


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        ("/v1/chat/completions", {"response_format": "json"}, "response_format"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
            "response_format.json_schema.name",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}},
            "response_format.json_schema.name",
        ),
        (
            "/v1/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": "object"}}},
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"regex": 5}, "regex"),
        ("/v1/completions", {"regex": ""}, "regex"),
        ("/v1/chat/completions", {"ebnf": ["root ::= 'a'"]}, "ebnf"),
        ("/v1/completions", {"regex": "a+", "ebnf": 'root ::= "a"'}, "ebnf"),
        ("/v1/completions", {"response_format": {"type": "json_object"}, "regex": "a+"}, "regex"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}, "ebnf": 'root ::= "a"'},
            "ebnf",
        ),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("/v1/chat/completions", {"tools": [WEATHER_TOOL], "tool_choice": "required", "regex": "a"}, "regex"),
    ],
)
def test_bad_constraint_is_a_400(http: httpx.Client, path: str, change: dict[str, Any], param: str) -> None:
    response = http.post(path, json=_body(path, change))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    _assert_still_works(http)


def test_tools_with_choice_none_do_not_conflict(http: httpx.Client, stub: StubRouter) -> None:
    change = {"tools": [WEATHER_TOOL], "tool_choice": "none", "response_format": {"type": "json_object"}}
    response = http.post("/v1/chat/completions", json=_body("chat", change))
    assert response.status_code == 200, response.text
    assert stub.last_request.sampling_params.json_schema == ANY_OBJECT


@pytest.mark.parametrize(
    ("path", "change", "kind"),
    [
        ("/v1/completions", {"regex": "[a-"}, "regex"),
        ("/v1/completions", {"ebnf": "root ::= undefined_rule"}, "ebnf"),
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": {"type": "objec"}},
                }
            },
            "json_schema",
        ),
        ("/v1/chat/completions", {"stream": True, "regex": "(unclosed"}, "regex"),
    ],
)
def test_engine_rejection_is_a_400(http: httpx.Client, path: str, change: dict[str, Any], kind: str) -> None:
    # The stub compiles constraints with xgrammar as the engine does and answers INVALID_ARGUMENT.
    response = http.post(path, json=_body(path, change))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(f"{kind} is invalid")
    # The engine's message starts with its field: named as the request field it came from.
    assert error["param"] == {"json_schema": "response_format", "structural_tag": "tools"}.get(kind, kind)
    _assert_still_works(http)
