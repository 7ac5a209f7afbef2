"""/v1/responses' refusals and failures: every unsupported field or value is a 400 naming it (and a
default value is accepted), the chat path's limits apply under the Responses' names, router
failures keep their statuses or end a stream with `response.failed`, a client leaving cancels
the router call, and API keys guard the routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.gateway import GatewayConfig
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter
from tests.gateway.test_responses_api import OPENING

pytestmark = pytest.mark.xdist_group("gateway_responses_errors")

TOOL = {"type": "function", "name": "get_time"}
BASE = {"model": MODEL_ID, "input": "Hi", "max_output_tokens": 2}


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    router = StubRouter(tokenizer_dir, max_context_len=1024).start()
    yield router
    router.stop()


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(
    ("change", "param"),
    [
        # OpenAI features this server does not offer
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"truncation": "auto"}, "truncation"),
        ({"prompt_cache_retention": "24h"}, "prompt_cache_retention"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [TOOL, {"type": "file_search", "vector_store_ids": []}]}, "tools[1].type"),
        ({"tools": [TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            "input[0].content",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
            "input[0].content",
        ),
        # shapes and values
        ({"model": None}, "model"),
        ({"input": 3}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": ["hi"]}, "input[0]"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
            "input[0].arguments",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        (  # an output without its call
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call_output", "call_id": "c", "output": "x"},
                ]
            },
            "input[1].call_id",
        ),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"text": {"format": {"type": "json_schema", "name": "bad name"}}}, "text.format.name"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
            "tools[0].parameters",
        ),
        ({"tools": [TOOL, TOOL]}, "tools[1].name"),  # the chat path's check, named the Responses' way
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"max_output_tokens": 5000}, "max_output_tokens"),  # beyond the 1024-token context
        ({"input": "x " * 40_000}, "input"),  # over --max-prompt-chars (64 Ki)
        ({"min_tokens": 5}, "min_tokens"),  # more than max_output_tokens
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs.add_generation_prompt",
        ),
    ],
)
def test_refused_with_the_param_named(
    http: httpx.Client, stub: StubRouter, change: dict[str, Any], param: str
) -> None:
    error = _error(http.post("/v1/responses", json={**BASE, **change}))
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert not stub.service.requests  # refused before any router call


@pytest.mark.parametrize(
    "change",
    [
        {"background": False},
        {"include": []},
        {"truncation": "disabled"},
        {"service_tier": "auto"},
        {"top_logprobs": 0},
        {"text": {"verbosity": "medium"}},
        {"reasoning": {"summary": "auto", "effort": "none"}},
        {"prompt_cache_key": "k", "safety_identifier": "s", "user": "u"},  # hints, ignored
        {"tools": [], "tool_choice": "none"},
        {"some_future_field": 1},  # unknown fields are ignored, as on the other endpoints
    ],
)
def test_defaults_and_hints_are_accepted(http: httpx.Client, change: dict[str, Any]) -> None:
    assert http.post("/v1/responses", json={**BASE, **change}).status_code == 200


def test_unknown_model_is_404(http: httpx.Client) -> None:
    error = _error(http.post("/v1/responses", json={**BASE, "model": "nope"}), 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_retrieve_and_delete_unknown_are_404(http: httpx.Client) -> None:
    assert _error(http.get("/v1/responses/resp_nope"), 404)["code"] == "not_found"
    assert _error(http.delete("/v1/responses/resp_nope"), 404)["code"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_router_refusal_keeps_its_status(http: httpx.Client, stream: bool) -> None:
    body = {**BASE, "input": "RESOURCE_EXHAUSTED", "stream": stream}
    assert _error(http.post("/v1/responses", json=body), 429)["code"] == "rate_limit_exceeded"


def test_failure_mid_stream_is_response_failed(client: openai.OpenAI, http: httpx.Client) -> None:
    body: Any = {"model": MODEL_ID, "input": "ABORT_LATER the cat runs the page", "max_output_tokens": 20}
    events = list(client.responses.create(**body, stream=True))
    types = [e.type for e in events]
    assert types[:4] == OPENING
    assert "response.output_text.delta" in types and types[-1] == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
    assert "aborted" in failed.error.message and failed.output[0].status == "incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Not streamed, the same failure is the HTTP status.
    assert _error(http.post("/v1/responses", json=body), 500)["type"] == "server_error"


def test_stream_disconnect_cancels_the_router_call(gateway: GatewayThread, stub: StubRouter) -> None:
    stub.reset()
    body = {
        **BASE,
        "input": "SLOW the cat runs the page and a dog sees the blue sky",
        "max_output_tokens": 50,
    }
    with (
        httpx.Client(base_url=gateway.url, timeout=10) as http,
        http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "event: response.created"
    assert stub.wait_cancelled(2.0)


def test_api_key_guards_every_route(stub: StubRouter, tokenizer_dir: Path) -> None:
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), api_keys=("sekret",))
    server = GatewayThread(config).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for method, path in [
                ("POST", "/v1/responses"),
                ("GET", "/v1/responses/r"),
                ("DELETE", "/v1/responses/r"),
            ]:
                answer = http.request(method, path, json=BASE if method == "POST" else None)
                assert _error(answer, 401)["code"] == "invalid_api_key"
            keyed = http.post("/v1/responses", json=BASE, headers={"Authorization": "Bearer sekret"})
            assert keyed.status_code == 200 and keyed.json()["status"] == "incomplete"
    finally:
        server.stop()
