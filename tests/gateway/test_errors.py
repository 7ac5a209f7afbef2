"""Errors: OpenAI-style 400s naming the parameter, 404 for unknown models, router status mapping."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import openai
import pytest

from services.common.errors import PARAM_METADATA_KEY
from services.gateway.server import to_openai_error
from shared.errors import (
    CapacityError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

pytestmark = pytest.mark.xdist_group("gateway_errors")

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "The cat runs."}], "max_tokens": 2}
COMPLETION = {"model": MODEL_ID, "prompt": "The cat runs.", "max_tokens": 2}


def _assert_still_works(http: httpx.Client) -> None:
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        ("/v1/chat/completions", {"temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"n": 17}, "n"),  # the router's bound (services/common/convert.py)
        ("/v1/completions", {"repetition_penalty": 1e-300}, "repetition_penalty"),  # 0.0 as a 32-bit float
        ("/v1/completions", {"repetition_penalty": 1e308}, "repetition_penalty"),  # inf as a 32-bit float
        ("/v1/chat/completions", {"top_p": 1e-300}, "top_p"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f g"}}]},
            "tools[0].function.name",
        ),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "hi"}]},
            "messages[0].tool_call_id",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("/v1/completions", {"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
        ("/v1/chat/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"max_tokens": 10_000}, "max_tokens"),  # past the context (256)
        ("/v1/chat/completions", {"min_tokens": 5}, "min_tokens"),  # more than max_tokens=2
        ("/v1/chat/completions", {"stop": [1, 2]}, "stop"),
        ("/v1/chat/completions", {"model": None}, "model"),
        ("/v1/completions", {"max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {"prompt": [5, 100_000]}, "prompt"),  # outside the vocabulary
        ("/v1/completions", {"prompt": [5, True]}, "prompt"),  # a bool is no token id
        ("/v1/completions", {"prompt": [5, -2]}, "prompt"),
        ("/v1/completions", {"prompt": [5, 2**31]}, "prompt"),
        ("/v1/completions", {"prompt": [5, 6.0]}, "prompt"),
        ("/v1/completions", {"prompt": [5, [6]]}, "prompt"),
        ("/v1/completions", {"prompt": [[5, 6], [7, "x"]]}, "prompt"),
        ("/v1/completions", {"prompt": "word " * 1000}, "prompt"),  # past the context; tokenized in a thread
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"echo": True, "logprobs": 1}, "echo"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("/v1/chat/completions", {"verbosity": "low"}, "verbosity"),
        ("/v1/completions", {"seed": 2**63}, "seed"),  # past int64
        ("/v1/completions", {"seed": -(2**63) - 1}, "seed"),
        ("/v1/chat/completions", {"store": True}, "store"),  # nothing is stored to read back
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/completions", {"stop_token_ids": [100_000]}, "stop_token_ids"),  # the router's 400
        ("/v1/completions", {"prompt": "", "add_special_tokens": False}, "prompt"),  # no tokens at all
        ("/v1/completions", {"prompt": ["The cat", ""], "add_special_tokens": False}, "prompt[1]"),
        ("/v1/completions", {"max_tokens": None, "min_tokens": 100}, "min_tokens"),  # the default 16
    ],
)
def test_bad_request(http: httpx.Client, path: str, change: dict[str, Any], param: str) -> None:
    base = CHAT if "chat" in path else COMPLETION
    body = {k: v for k, v in {**base, **change}.items() if v is not None}
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    _assert_still_works(http)


@pytest.mark.parametrize(
    ("field", "literal"), [("temperature", "NaN"), ("top_p", "Infinity"), ("top_p", "-Infinity")]
)
def test_a_non_finite_number_is_a_400_naming_its_field(http: httpx.Client, field: str, literal: str) -> None:
    # Python's JSON reader takes NaN and Infinity, which are no JSON; the request is refused for
    # them by name, not for a range they happen to fail.
    body = json.dumps(CHAT)[:-1] + f', "{field}": {literal}}}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and "finite" in error["message"]
    _assert_still_works(http)


def test_malformed_json_is_a_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    _assert_still_works(http)


@pytest.mark.parametrize(
    ("content", "headers"),
    [(b"[1, 2]", {"content-type": "application/json"}), (b"null", {"content-type": "application/json"}),
     (b"model=x", {"content-type": "application/x-www-form-urlencoded"})],
)  # fmt: skip
def test_a_body_that_is_no_json_object_says_so(
    http: httpx.Client, content: bytes, headers: dict[str, str]
) -> None:
    response = http.post("/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is None and error["message"].startswith("The request body must be a JSON object")
    assert "None" not in error["message"]
    _assert_still_works(http)


def test_a_union_field_is_named_without_pydantic_branch_tags(http: httpx.Client) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": 5}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages[0].content"


def test_a_wrong_method_is_a_405_with_allow(http: httpx.Client) -> None:
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()
    assert "POST" in response.headers["allow"]


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], n=0)
    assert info.value.status_code == 400 and info.value.param == "n"


def test_unknown_fields_are_ignored_and_defaults_accepted(http: httpx.Client) -> None:
    body = {
        **CHAT,
        "some_future_field": 1,
        "service_tier": "auto",
        "verbosity": "medium",
        "store": False,
        "metadata": {"a": "b"},
        "prompt_cache_key": "k",
        "safety_identifier": "k",
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert http.get("/v1/models/gpt-4").status_code == 404
    _assert_still_works(http)


def test_unknown_route_has_an_openai_body(http: httpx.Client) -> None:
    response = http.get("/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_router_resource_exhausted_is_429(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "RESOURCE_EXHAUSTED"}]
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=messages)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "1"  # temporary: when to come back
    # Streaming too: the gateway waits for the first increment before committing to a 200.
    with pytest.raises(openai.RateLimitError):
        list(client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True))
    _assert_still_works(http)


def test_router_unavailable_is_503(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL_ID, prompt="UNAVAILABLE")
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["type"] == "service_unavailable_error"
    # The router answered (its worker, say, was gone): no "the router is unavailable" in front.
    assert info.value.body["message"] == "stub router: unavailable (magic word)"
    _assert_still_works(http)


def test_abort_before_any_output_is_an_error_status(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL_ID, prompt="ABORT_NOW please")
    assert info.value.status_code == 500 and "aborted" in info.value.message


def test_abort_mid_stream_is_an_error_event(http: httpx.Client) -> None:
    body = {**COMPLETION, "prompt": "ABORT_LATER the cat runs", "max_tokens": 10, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "aborted" in error["message"] and error["type"] == "server_error"
    assert "text" in json.loads(events[0])["choices"][0]  # output reached the client first


_DEEP = json.loads("[" * 600 + "1" + "]" * 600)  # past the recursion of the chat template's helpers
_USER = [{"role": "user", "content": "x"}]
_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": _DEEP})}}


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": _USER, "chat_template_kwargs": {"x": _DEEP}},
        {"messages": [*_USER, {"role": "assistant", "content": None, "tool_calls": [_CALL]}]},
        {"messages": _USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "array", "default": _DEEP}}}}}]},
    ],
    ids=["chat_template_kwargs", "tool_call_arguments", "tool_parameters"],
)  # fmt: skip
def test_json_nested_too_deep_for_the_chat_template_is_a_400_and_the_connection_serves_on(
    http: httpx.Client, fields: dict[str, Any]
) -> None:
    body = json.dumps({"model": MODEL_ID, "max_tokens": 2, **fields})
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "nest too deeply" in response.json()["error"]["message"]
    assert response.headers.get("connection") != "close"
    _assert_still_works(http)


def test_an_unexpected_error_is_a_500_that_closes_its_connection_and_says_so(
    gateway: GatewayThread, http: httpx.Client
) -> None:
    # Starlette raises it again after the answer and uvicorn closes the connection: the answer
    # says so, so the client opens a new one for its next request instead of losing it.
    async def boom() -> None:
        raise RuntimeError("a bug")

    gateway.app.add_api_route("/test-only/boom", boom, methods=["GET"])
    response = http.get("/test-only/boom")
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.json()["error"] == {
        "message": "internal error in the gateway", "type": "server_error", "param": None, "code": None
    }  # fmt: skip
    for _ in range(3):
        _assert_still_works(http)


def test_health(http: httpx.Client, stub: StubRouter) -> None:
    before = stub.service.list_models_calls
    response = http.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert stub.service.list_models_calls == before + 1  # it really asked the router


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.CANCELLED, 500),
    ],
)
def test_grpc_status_mapping(code: grpc.StatusCode, status: int) -> None:
    # The field at fault travels as trailing metadata, never parsed out of the message.
    trailing = grpc.aio.Metadata((PARAM_METADATA_KEY, "max_new_tokens"))
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="top_p is in the message")
    error = to_openai_error(exc)
    assert error.status == status
    assert error.param == ("max_tokens" if status == 400 else None)  # the engine's name -> OpenAI's
    bare = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="top_p is bad")
    assert to_openai_error(bare).param is None


@pytest.mark.parametrize(
    ("error", "status", "param"),
    [
        (InvalidRequest("top_p must be in (0, 1]", param="top_p"), 400, "top_p"),
        (NotFound("no such model"), 404, None),
        (CapacityError("full"), 429, None),
        (Unavailable("gone"), 503, None),
        (DeadlineExceeded("late"), 504, None),
        (InternalError("broken"), 500, None),
        (ValueError("a bug, not the client's mistake"), 500, None),
        (KeyError("a bug"), 500, None),
    ],
)
def test_taxonomy_mapping(error: Exception, status: int, param: str | None) -> None:
    # One mapping: the shared taxonomy -> HTTP; anything outside it is a programming error (500).
    got = to_openai_error(error)
    assert (got.status, got.param) == (status, param)
    if status == 500:
        assert "a bug" not in got.message  # no internals leak to the client


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "%s", "prompt": ["ok", "\\udfff"]}', "prompt[1]"),
        ("/v1/completions", '{"model": "%s", "prompt": [[5, 6], [7, "\\ud800"]]}', "prompt[1][1]"),
        ("/v1/completions", '{"model": "%s", "prompt": "ab", "stop": ["x\\ud83d"]}', "stop[0]"),
        (
            "/v1/chat/completions",
            '{"model": "%s", "messages": [{"role": "user", "content": "hi\\udc00"}]}',
            "messages[0].content",
        ),
        ("/v1/completions", '{"model": "%s", "prompt": "a", "\\ud800": 1}', "\\ud800"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_where(http: httpx.Client, path: str, body: str, param: str) -> None:
    # JSON's "\ud800" parses into a string no encoder accepts: refused before it reaches one.
    resp = http.post(path, content=body % MODEL_ID, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]
    assert error["param"] == param  # a bad key is named in its escaped form
    _assert_still_works(http)
