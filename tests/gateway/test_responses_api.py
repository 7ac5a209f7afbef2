"""/v1/responses through the HTTP stack and the official `openai` SDK, against the stub router:
conversations render exactly as the equivalent chat completions do, scripted outputs come back as
output items (whole and as the SDK's typed stream events), tool calls round-trip through
`previous_response_id`, and the store keeps, evicts and forgets responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from services.gateway import GatewayConfig
from services.gateway.args import parse_args
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter, split_text

pytestmark = pytest.mark.xdist_group("gateway_responses")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    {"type": "function", "name": "get_time"},
]
CHAT_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time"}},
]
PARIS = '{"city": "Paris"}'
CALL_PARIS = f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'


@pytest.fixture(scope="module")
def stub(tokenizer_dir: Path) -> Iterator[StubRouter]:
    # Tool prompts are longer than the default stub's 256-token context.
    router = StubRouter(tokenizer_dir, max_context_len=2048).start()
    yield router
    router.stop()


# How every stream opens: the response, then its first item with its text part.
OPENING = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]


def _events(stream: Any) -> list[Any]:
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def _prompt_ids(stub: StubRouter) -> list[int]:
    return list(stub.last_request.token_ids)


def test_text_renders_like_the_chat_completion(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(["Hi", " there", "!"])
    reply = client.responses.create(
        model=MODEL_ID, input="Hello", instructions="Be brief.", metadata={"k": "v"}, temperature=0.5
    )
    prompt = _prompt_ids(stub)
    assert stub.last_request.sampling_params.temperature == 0.5
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == MODEL_ID
    assert (reply.status, reply.instructions, reply.metadata, reply.store) == (
        "completed",
        "Be brief.",
        {"k": "v"},
        True,
    )
    assert reply.temperature == 0.5 and reply.tool_choice == "auto" and reply.parallel_tool_calls
    (message,) = reply.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and [c.type for c in message.content] == ["output_text"]
    assert reply.output_text == "Hi there!"

    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1)
    assert _prompt_ids(stub) == prompt
    assert reply.usage is not None and chat.usage is not None
    assert reply.usage.input_tokens == chat.usage.prompt_tokens == len(prompt)
    assert reply.usage.output_tokens == 5  # "Hi", " there", "!" in the tiny tokenizer
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.usage.output_tokens_details.reasoning_tokens == 0


def test_streamed_text_events(client: openai.OpenAI, stub: StubRouter) -> None:
    text = "The cat sat on the mat, and then it ran off."
    stub.script(split_text(text))
    events = _events(client.responses.create(model=MODEL_ID, input="Tell me.", stream=True))
    types = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert types == [
        *OPENING,
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    assert all(e.item_id == item_id and e.output_index == 0 and e.content_index == 0 for e in deltas)
    assert "".join(e.delta for e in deltas) == text == events[-4].text
    final = events[-1].response
    assert final.id == events[0].response.id and final.status == "completed" and final.output_text == text
    assert final.usage is not None and final.usage.input_tokens == len(stub.last_request.token_ids)

    stub.script(split_text(text))
    with client.responses.stream(model=MODEL_ID, input="Tell me.") as stream:
        snapshot = [e.snapshot for e in stream if e.type == "response.output_text.delta"][-1]
        assert snapshot == text  # the SDK's own accumulation of our events
        assert stream.get_final_response().output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI, stub: StubRouter, stream: bool) -> None:
    # The stub echoes the prompt: more than three tokens are left when the limit ends it.
    body: dict[str, Any] = {"model": MODEL_ID, "input": "the cat runs the page", "max_output_tokens": 3}
    if stream:
        events = _events(client.responses.create(**body, stream=True))
        assert events[-1].type == "response.incomplete"
        reply = events[-1].response
    else:
        reply = client.responses.create(**body)
    assert stub.last_request.sampling_params.max_new_tokens == 3
    assert reply.status == "incomplete" and reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens" and reply.max_output_tokens == 3
    assert reply.output[0].status == "incomplete" and reply.usage is not None
    assert reply.usage.output_tokens == 3


def test_function_call_round_trip(client: openai.OpenAI, stub: StubRouter) -> None:
    user: Any = [{"role": "user", "content": "Weather in Paris?"}]
    client.chat.completions.create(model=MODEL_ID, messages=user, tools=CHAT_TOOLS, tool_choice="required")
    chat_tag = stub.last_request.sampling_params.structural_tag

    stub.script(split_text(CALL_PARIS))
    first = client.responses.create(
        model=MODEL_ID, input="Weather in Paris?", tools=TOOLS, tool_choice="required"
    )
    assert stub.last_request.sampling_params.structural_tag == chat_tag  # the chat path's grammar
    (call,) = first.output
    assert call.type == "function_call" and call.status == "completed" and call.id.startswith("fc_")
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert [t.name for t in first.tools] == ["get_weather", "get_time"]

    stub.script(["It is sunny."])
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}
    second = client.responses.create(
        model=MODEL_ID, previous_response_id=first.id, input=[output], tools=TOOLS
    )
    assert second.output_text == "It is sunny." and second.previous_response_id == first.id
    prompt = _prompt_ids(stub)
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in stub.last_request.text

    assistant = {"role": "assistant", "content": None, "tool_calls": [_chat_call(call)]}
    tool = {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "sunny"}'}
    messages: Any = [*user, assistant, tool]
    chat = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=CHAT_TOOLS, max_tokens=1)
    assert _prompt_ids(stub) == prompt
    assert second.usage is not None and chat.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens  # type: ignore[union-attr]


def _chat_call(call: Any) -> dict[str, Any]:
    return {
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def test_streamed_text_then_function_call(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(["Let me check. ", *split_text(CALL_PARIS)])
    events = _events(client.responses.create(model=MODEL_ID, input="Weather?", tools=TOOLS, stream=True))
    types = [e.type for e in events]
    arg_deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert types == [
        *OPENING,
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(arg_deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[8]
    assert added.output_index == 1 and added.item.type == "function_call" and added.item.name == "get_weather"
    assert all(e.item_id == added.item.id and e.output_index == 1 for e in arg_deltas)
    assert "".join(e.delta for e in arg_deltas) == PARIS == events[-3].arguments
    final = events[-1].response
    assert [i.type for i in final.output] == ["message", "function_call"]
    assert final.output_text == "Let me check. " and final.output[1].arguments == PARIS

    stub.script(["Let me check. ", *split_text(CALL_PARIS)])
    with client.responses.stream(model=MODEL_ID, input="Weather?", tools=TOOLS) as stream:
        done = [e for e in stream if e.type == "response.function_call_arguments.done"]
        assert [e.arguments for e in done] == [PARIS]
        assert stream.get_final_response().output[1].call_id.startswith("call_")


def test_input_items_render_like_chat_messages(client: openai.OpenAI, stub: StubRouter) -> None:
    items: Any = [
        {"role": "developer", "content": "Be terse."},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Weather in"},
                {"type": "input_text", "text": "Paris?"},
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": []},  # sent back by clients, not rendered
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": PARIS},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "noon"}],
        },
        {"role": "user", "content": "Thanks."},
    ]
    reply = client.responses.create(
        model=MODEL_ID,
        instructions="Be brief.",
        input=items,
        tools=TOOLS,
        tool_choice="none",
        max_output_tokens=1,
    )
    prompt = _prompt_ids(stub)
    assert not stub.last_request.sampling_params.HasField("structural_tag")  # "none": not constrained
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Be terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}],
        },
        {"role": "assistant", "content": "Checking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "name": "get_time", "content": "noon"},
        {"role": "user", "content": "Thanks."},
    ]
    chat = client.chat.completions.create(
        model=MODEL_ID, messages=messages, tools=CHAT_TOOLS, tool_choice="none", max_tokens=1
    )
    assert _prompt_ids(stub) == prompt
    assert reply.usage is not None and chat.usage is not None
    assert reply.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize(
    ("tool_choice", "chat_choice"),
    [
        ({"type": "function", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}),
        ("auto", "auto"),
    ],
)
def test_tool_choice_is_the_chat_paths(
    http: httpx.Client, stub: StubRouter, tool_choice: Any, chat_choice: Any
) -> None:
    user = [{"role": "user", "content": "What time?"}]
    chat = {
        "model": MODEL_ID,
        "messages": user,
        "tools": CHAT_TOOLS,
        "tool_choice": chat_choice,
        "max_tokens": 2,
    }
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    expected = stub.last_request.sampling_params
    body = {
        "model": MODEL_ID,
        "input": user,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_output_tokens": 2,
    }
    reply = http.post("/v1/responses", json={**body, "parallel_tool_calls": False})
    assert reply.status_code == 200 and reply.json()["tool_choice"] == tool_choice
    assert not reply.json()["parallel_tool_calls"]
    tag = json.loads(stub.last_request.sampling_params.structural_tag)
    assert tag["format"] == {**json.loads(expected.structural_tag)["format"], **_no_parallel(tag)}


def _no_parallel(tag: dict[str, Any]) -> dict[str, Any]:
    return {"stop_after_first": True} if "stop_after_first" in tag["format"] else {}


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        (
            {"format": {"type": "json_schema", "name": "city", "schema": WEATHER, "strict": True}},
            "json_schema",
            WEATHER,
        ),
        ({"format": {"type": "json_object"}}, "json_schema", {"type": "object"}),
        ({"format": {"type": "text"}}, None, None),
    ],
)
def test_text_format_is_the_response_format(
    http: httpx.Client, stub: StubRouter, text: Any, field: str | None, value: Any
) -> None:
    body = {"model": MODEL_ID, "input": "A city.", "text": text, "max_output_tokens": 2}
    reply = http.post("/v1/responses", json=body)
    assert reply.status_code == 200 and reply.json()["text"]["format"] == text["format"]
    params = stub.last_request.sampling_params
    assert params.WhichOneof("constraint") == field
    if field is not None:
        assert json.loads(getattr(params, field)) == value


def test_text_format_gives_way_to_required_tools(http: httpx.Client, stub: StubRouter) -> None:
    # Only calls follow under "required": no text the format could shape, so the tools' grammar runs.
    fmt = {"format": {"type": "json_object"}}
    body = {"model": MODEL_ID, "input": "Go.", "tools": TOOLS, "text": fmt, "max_output_tokens": 2}
    assert http.post("/v1/responses", json={**body, "tool_choice": "required"}).status_code == 200
    assert stub.last_request.sampling_params.WhichOneof("constraint") == "structural_tag"
    assert http.post("/v1/responses", json={**body, "tool_choice": "none"}).status_code == 200
    assert stub.last_request.sampling_params.WhichOneof("constraint") == "json_schema"
    refused = http.post("/v1/responses", json=body)  # "auto": both would apply
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "text.format"


def test_sampling_extras_reach_the_router(http: httpx.Client, stub: StubRouter) -> None:
    extras = {"seed": 7, "top_k": 5, "ignore_eos": True, "stop": ["zz"], "top_p": 0.5}
    body = {"model": MODEL_ID, "input": "Go.", "max_output_tokens": 2, **extras}
    assert http.post("/v1/responses", json=body).status_code == 200
    params = stub.last_request.sampling_params
    assert (params.seed, params.top_k, params.ignore_eos, list(params.stop)) == (7, 5, True, ["zz"])
    assert params.top_p == 0.5


def test_store_retrieve_delete(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(["Kept."])
    kept = client.responses.create(model=MODEL_ID, input="Hi")
    assert client.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    client.responses.delete(kept.id)
    for call in (lambda: client.responses.retrieve(kept.id), lambda: client.responses.delete(kept.id)):
        with pytest.raises(openai.NotFoundError):
            call()

    unstored = client.responses.create(model=MODEL_ID, input="Hi", store=False, max_output_tokens=1)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    for previous in (unstored.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(model=MODEL_ID, input="Hi", previous_response_id=previous)
        assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_previous_response_continues_without_instructions(client: openai.OpenAI, stub: StubRouter) -> None:
    stub.script(["Paris."])
    first = client.responses.create(model=MODEL_ID, input="Capital of France?", instructions="Be brief.")
    stub.script(["Lyon."])
    client.responses.create(model=MODEL_ID, input="And the second city?", previous_response_id=first.id)
    # OpenAI's rule: a previous response's instructions are not carried over.
    assert stub.last_request.text == (
        "<|begin_of_text|><|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd the second city?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_store_evicts_the_least_recently_used(stub: StubRouter, tokenizer_dir: Path) -> None:
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), responses_store_size=2)
    server = GatewayThread(config).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)

        def create() -> str:
            return client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=1).id

        first, second = create(), create()
        client.responses.retrieve(first)  # now the most recently used
        third = create()
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(second)
        assert {client.responses.retrieve(r).id for r in (first, third)} == {first, third}
        create()
        create()
        for gone in (first, third):
            with pytest.raises(openai.NotFoundError):
                client.responses.create(model=MODEL_ID, input="Hi", previous_response_id=gone)
    finally:
        server.stop()


def test_store_size_zero_keeps_nothing(stub: StubRouter, tokenizer_dir: Path) -> None:
    config = parse_args(
        ["--router", stub.address, "--tokenizer", str(tokenizer_dir), "--responses-store-size", "0"]
    )
    server = GatewayThread(config).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)
        reply = client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=1)
        with pytest.raises(openai.NotFoundError, match="responses-store-size 0"):
            client.responses.create(model=MODEL_ID, input="Hi", previous_response_id=reply.id)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def thinking(stub: StubRouter, tokenizer_dir: Path) -> Iterator[openai.OpenAI]:
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), reasoning_parser="qwen3")
    server = GatewayThread(config).start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)
    server.stop()


def test_reasoning_is_an_item_before_the_message(thinking: openai.OpenAI, stub: StubRouter) -> None:
    stub.reset()
    output = "<think>\nThe user greets.\n</think>\n\nHello!"
    stub.script([output])
    reply = thinking.responses.create(model=MODEL_ID, input="Hi", reasoning={"effort": "low"})
    assert [i.type for i in reply.output] == ["reasoning", "message"]
    reasoning = reply.output[0]
    assert reasoning.id.startswith("rs_") and reasoning.summary == []
    assert [(c.type, c.text) for c in reasoning.content or []] == [("reasoning_text", "\nThe user greets.\n")]
    assert reply.output_text == "Hello!" and reply.reasoning is not None and reply.reasoning.effort == "low"

    stub.script(split_text(output))
    events = _events(thinking.responses.create(model=MODEL_ID, input="Hi", stream=True))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thought, answer) == ("\nThe user greets.\n", "Hello!")
    added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    assert [e.text for e in events if e.type == "response.reasoning_text.done"] == [thought]


def test_agents_sdk_runs_its_tool_loop(gateway: GatewayThread, stub: StubRouter) -> None:
    """The Agents SDK's default loop (call a tool, read its result, answer), whole and streamed."""
    set_tracing_disabled(True)
    stub.reset()

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async def run() -> tuple[Any, Any]:
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        model = OpenAIResponsesModel(model=MODEL_ID, openai_client=client)
        settings = ModelSettings(tool_choice="required")  # reset to auto once the tool ran
        agent = Agent(name="w", tools=[get_weather], model=model, model_settings=settings)
        stub.script(split_text(CALL_PARIS))
        stub.script(["It is ", "sunny."])
        whole = await Runner.run(agent, "Weather in Paris?")
        stub.script(split_text(CALL_PARIS))
        stub.script(["Nice ", "day."])
        streamed = Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in streamed.stream_events():
            pass
        return whole, streamed

    whole, streamed = asyncio.run(run())
    assert (whole.final_output, streamed.final_output) == ("It is sunny.", "Nice day.")
    first, second = stub.service.requests[:2]
    assert first.sampling_params.HasField("structural_tag")  # "required": the call is forced
    assert "<tool_response>\nsunny in Paris\n</tool_response>" in second.text
    kinds = [i["type"] for i in whole.to_input_list()[1:]]
    assert kinds == ["function_call", "function_call_output", "message"]
