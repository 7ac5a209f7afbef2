"""Reasoning output (`--reasoning-parser`): the splitter fed whole and cut at every position, and
the HTTP stack against a scripted stub router: `reasoning_content` streamed and not, with tool
calls after it, constraints applied after the reasoning, `reasoning_effort`; and what LangChain's
OpenAI chat models make of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from services.gateway import GatewayConfig
from services.gateway.args import parse_args
from services.gateway.constraints import Constraint
from services.gateway.reasoning import (
    ReasoningSplitter,
    after_reasoning,
    reasoning_format,
    split_reasoning,
    template_kwargs,
)
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter, split_text

pytestmark = pytest.mark.xdist_group("gateway_reasoning")

CASES = [
    # (format, output begins inside, text, reasoning, content)
    ("qwen3", False, "<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "Paris."),
    ("qwen3", False, "  <think>a < b </thi</think>x", "a < b </thi", "x"),
    ("qwen3", False, "No thinking. <think>x</think>", None, "No thinking. <think>x</think>"),
    ("qwen3", False, "<thin", None, "<thin"),
    ("qwen3", True, "inside</think>\n\nout", "inside", "out"),
    ("deepseek_r1", False, "no opening tag</think>answer", "no opening tag", "answer"),
    ("deepseek_r1", False, "<think>\nhm</think>\nanswer", "\nhm", "answer"),
    ("deepseek_r1", False, "never closed <", "never closed <", ""),
    ("qwen3", False, "", None, ""),
]


@pytest.mark.parametrize(("fmt", "inside", "text", "reasoning", "content"), CASES)
def test_split_is_the_same_whole_and_cut_anywhere(
    fmt: Any, inside: bool, text: str, reasoning: str | None, content: str
) -> None:
    assert split_reasoning(fmt, inside, text) == (reasoning, content)
    splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        splitter = ReasoningSplitter(fmt, inside)
        parts = [splitter.feed(p, last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        if not pieces:
            parts = [splitter.feed("", last=True)]
        assert "".join(r for r, _ in parts) == (reasoning or ""), pieces
        assert "".join(c for _, c in parts) == content, pieces


def test_auto_detection_and_effort() -> None:
    assert reasoning_format("auto", "{{ '<｜Assistant｜>' }}<think>\\n") == "deepseek_r1"
    assert reasoning_format("auto", "{% if enable_thinking is false %}<think>\\n\\n</think>") == "qwen3"
    assert reasoning_format("auto", "<|im_start|>") is None
    assert reasoning_format("off", "<think>") is None and reasoning_format("qwen3", None) == "qwen3"
    qwen = "{% if enable_thinking %}"
    assert template_kwargs("none", None, qwen) == {"enable_thinking": False}
    assert template_kwargs("minimal", {"enable_thinking": True}, qwen) == {"enable_thinking": True}
    assert template_kwargs("high", None, qwen) == {}
    assert template_kwargs(None, {"x": 1}, qwen) == {"x": 1}
    assert template_kwargs("low", None, "{{ reasoning_effort }}") == {"reasoning_effort": "low"}
    assert parse_args(["--router", "r:1", "--tokenizer", "t"]).reasoning_parser == "off"
    assert (
        parse_args(["--router", "r:1", "--tokenizer", "t", "--reasoning-parser", "qwen3"]).reasoning_parser
        == "qwen3"
    )


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize("inside", [False, True])
def test_constraints_apply_after_the_reasoning(inside: bool) -> None:
    open_ = "" if inside else "<think>"
    for constraint, good, bad in [
        (Constraint("json_schema", json.dumps(SCHEMA), "response_format"), '{"city": "Oslo"}', '{"x": 1}'),
        (Constraint("regex", "[0-9]{3}", "regex"), "123", "12a"),
        (Constraint("ebnf", 'root ::= "yes" | "no"', "ebnf"), "no", "maybe"),
    ]:
        tag = after_reasoning(constraint, inside)
        assert tag.field == "structural_tag" and tag.param == constraint.param
        grammar = xgrammar.Grammar.from_structural_tag(tag.value)
        reasoning = open_ + "free { text, not JSON\n</think>\n\n"
        assert _is_grammar_accept_string(grammar, reasoning + good)
        assert not _is_grammar_accept_string(grammar, reasoning + bad)
        assert _is_grammar_accept_string(grammar, good) is (not inside)  # thinking is optional outside


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer with a Qwen3-like template that reads `enable_thinking`."""
    out = tmp_path_factory.mktemp("thinking")
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    router = StubRouter(tokenizer_dir, max_context_len=2048).start()
    yield router
    router.stop()


@pytest.fixture(scope="module")
def gateway(stub: StubRouter, thinking_dir: Path) -> Iterator[GatewayThread]:
    config = GatewayConfig(router=stub.address, tokenizer=str(thinking_dir), reasoning_parser="auto")
    server = GatewayThread(config).start()
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayThread, stub: StubRouter) -> openai.OpenAI:
    stub.reset()
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10)


MESSAGES: list[Any] = [{"role": "user", "content": "Capital of France?"}]
OUTPUT = "<think>\nThe user asks </think-ish> about France.\n</think>\n\nParis."


def test_reasoning_content_whole(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(split_text(OUTPUT))
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    message = reply.choices[0].message
    assert message.content == "Paris."
    assert message.model_extra["reasoning_content"] == "\nThe user asks </think-ish> about France.\n"


def test_reasoning_content_streamed(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(split_text(OUTPUT))
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stream=True)
    reasoning, content = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == ("\nThe user asks </think-ish> about France.\n", "Paris.")


def test_tool_calls_after_reasoning(client: openai.OpenAI, stub: StubRouter) -> None:
    tools: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    # A call-like text inside the reasoning is reasoning, not a call.
    output = "<think>maybe <tool_call> later</think>\n\n" + call
    stub.script(split_text(output))
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=tools)
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "maybe <tool_call> later"
    assert message.content is None and message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert reply.choices[0].finish_reason == "tool_calls"
    grammar = xgrammar.Grammar.from_structural_tag(stub.last_request.sampling_params.structural_tag)
    assert _is_grammar_accept_string(grammar, output)


def test_response_format_after_reasoning_and_effort(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(['<think>x</think>{"city": "Oslo"}'])
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, response_format=response_format, reasoning_effort="low"
    )
    assert json.loads(reply.choices[0].message.content or "") == {"city": "Oslo"}
    params = stub.last_request.sampling_params
    assert params.WhichOneof("constraint") == "structural_tag"
    assert not stub.last_request.text.endswith("</think>\n\n")  # "low" leaves thinking on
    stub.script(["Paris."])
    reply = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, reasoning_effort="none")
    assert stub.last_request.text.endswith("<think>\n\n</think>\n\n")  # thinking off
    assert reply.choices[0].message.content == "Paris."
    assert reply.choices[0].message.model_extra["reasoning_content"] is None


def test_bad_reasoning_effort_is_a_400(gateway: GatewayThread) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "reasoning_effort": "max"}
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "reasoning_effort"


# ---- LangChain --------------------------------------------------------------------------------------

REASONING = "\nThe user asks </think-ish> about France.\n"


@pytest.fixture
def langchain_args(gateway: GatewayThread, stub: StubRouter) -> dict[str, Any]:
    stub.reset()
    return {"model": MODEL_ID, "base_url": f"{gateway.url}/v1", "api_key": "unused", "max_retries": 0}


def test_langchain_chat_openai_gets_the_answer_without_the_reasoning(
    langchain_args: dict[str, Any], stub: StubRouter
) -> None:
    # ChatOpenAI keeps only the official API's fields: it drops `reasoning_content` (its docs send
    # other servers' extensions to provider subclasses, below), but its content is the answer alone.
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(**langchain_args)
    stub.script(split_text(OUTPUT))
    reply = chat.invoke("Capital of France?")
    assert reply.content == "Paris."
    stub.script(split_text(OUTPUT))
    assert "".join(str(c.content) for c in chat.stream("Capital of France?")) == "Paris."


def test_langchain_reads_reasoning_content(langchain_args: dict[str, Any], stub: StubRouter) -> None:
    # ChatDeepSeek (langchain-deepseek, on langchain-openai's BaseChatOpenAI) reads the
    # `reasoning_content` extension, streamed and not, into additional_kwargs.
    langchain_deepseek = pytest.importorskip("langchain_deepseek")
    chat = langchain_deepseek.ChatDeepSeek(**langchain_args)  # base_url: its api_base's alias
    stub.script(split_text(OUTPUT))
    reply = chat.invoke("Capital of France?")
    assert (reply.additional_kwargs["reasoning_content"], reply.content) == (REASONING, "Paris.")
    stub.script(split_text(OUTPUT))
    chunks = list(chat.stream("Capital of France?"))
    reasoning = "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks)
    assert (reasoning, "".join(str(c.content) for c in chunks)) == (REASONING, "Paris.")
