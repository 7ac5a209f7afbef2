"""Every tool-call format and the reasoning split over a real engine: `tandem up` (one unified
worker, the tiny random-weight llama) with its gateway in `--reasoning-parser deepseek_r1`, and one
more gateway per `--tool-call-parser` format on the same router. The model's weights are random,
so only the format's grammar can make a call come out whole; each must parse and validate, whole
and streamed.

The extra gateways are the gateway's app in this process, under Starlette's TestClient (its
lifespan included: the router connection over gRPC, the tokenizer), not seven more processes
each importing transformers; the suite's own gateway is `tandem up`'s process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from services.gateway import GatewayConfig
from services.gateway.server import create_app
from services.gateway.tool_calls.formats import TOOL_CALL_FORMATS
from tests.suite.cluster import tandem_up
from tests.suite.test_structured import TIME, WEATHER

pytestmark = pytest.mark.xdist_group("suite_formats")

SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MESSAGES = [{"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    args = ("--prefill", "0", "--decode", "0", "--gateway-args", "--reasoning-parser deepseek_r1")
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("formats"), args=args) as info:
        yield info


@pytest.fixture(scope="module")
def gateways(up: dict[str, Any], tiny_llama: Path) -> Iterator[dict[str, openai.OpenAI]]:
    """A client per extra gateway on the suite's router: one per tool-call format, and "plain"
    (no reasoning parser)."""
    with contextlib.ExitStack() as stack:
        clients: dict[str, openai.OpenAI] = {}
        for name in ("plain", *TOOL_CALL_FORMATS):
            parser = {} if name == "plain" else {"tool_call_parser": name}
            config = GatewayConfig(router=up["router_grpc"], tokenizer=str(tiny_llama), **parser)
            http = stack.enter_context(TestClient(create_app(config), base_url="http://gateway"))
            clients[name] = openai.OpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http)
        yield clients


def _check(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("fmt", TOOL_CALL_FORMATS)
def test_forced_calls_parse_in_every_format(
    fmt: str, gateways: dict[str, openai.OpenAI], up: dict[str, Any]
) -> None:
    client = gateways[fmt]
    resp = client.chat.completions.create(
        model=up["model"],
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=200,
    )
    for choice in resp.choices:
        assert choice.finish_reason == "tool_calls", (fmt, choice.message)
        (call,) = choice.message.tool_calls or []
        _check(call.function.name, call.function.arguments)
    named = {"type": "function", "function": {"name": "get_time"}}
    resp = client.chat.completions.create(
        model=up["model"],
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice=named,  # type: ignore[arg-type]
        seed=4,
        temperature=1.0,
        max_tokens=200,
    )
    (choice,) = resp.choices
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls or []] == ["get_time"]

    # Streamed: the deltas reassemble to a call that validates.
    calls: dict[int, dict[str, str]] = {}
    finish = None
    stream = client.chat.completions.create(
        model=up["model"],
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        seed=5,
        temperature=1.0,
        max_tokens=200,
        stream=True,
    )
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                call["arguments"] += (delta.function.arguments if delta.function else None) or ""
    assert finish == "tool_calls" and list(calls) == [0], (fmt, calls)
    assert calls[0]["name"] == "get_weather"
    _check("get_weather", calls[0]["arguments"])


def test_reasoning_is_split_from_the_engines_output(
    client: openai.OpenAI, gateways: dict[str, openai.OpenAI], up: dict[str, Any]
) -> None:
    # DeepSeek-R1's format: the output begins inside the reasoning, which the random model never
    # closes, so all of it is reasoning. The same greedy output without the parser is content.
    kwargs: dict[str, Any] = {"model": up["model"], "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    plain = gateways["plain"].chat.completions.create(**kwargs).choices[0].message
    assert plain.content and "</think>" not in plain.content
    split = client.chat.completions.create(**kwargs).choices[0].message
    assert split.content is None
    assert split.model_extra is not None and split.model_extra["reasoning_content"] == plain.content

    reasoning, content = "", ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (plain.content, "")
