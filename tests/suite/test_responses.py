"""/v1/responses end to end: `tandem up` with one unified worker serving the tiny random-weight
llama, driven by the official `openai` SDK and the OpenAI Agents SDK (`openai-agents`).

The weights are random, so only grammars make an output parse: tool calls are forced with
`tool_choice`, the Agents SDK's structured answer by its output type (`text.format`
json_schema); free text is cut by `max_output_tokens` (with `ignore_eos`, so always)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from pydantic import BaseModel

from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_responses")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}
WEATHER: Any = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}
TIME: Any = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]},
}
SHORT: Any = {"ignore_eos": True}  # random weights: stop only at max_output_tokens


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    args = ("--prefill", "0", "--decode", "0")  # one unified worker
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("responses"), args=args) as info:
        yield info


def test_text_whole_and_streamed(client: openai.OpenAI, up: dict[str, Any]) -> None:
    body: Any = {
        "model": up["model"],
        "input": "Tell me about the sea.",
        "instructions": "Be brief.",
        "max_output_tokens": 6,
        "temperature": 0.0,
        "extra_body": SHORT,
    }
    whole = client.responses.create(**body)
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage is not None and whole.usage.output_tokens == 6 and whole.output_text

    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the sea."},
    ]
    chat = client.chat.completions.create(model=up["model"], messages=messages, max_tokens=1)
    assert chat.usage is not None and whole.usage.input_tokens == chat.usage.prompt_tokens

    events = list(client.responses.create(**body, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == whole.output_text  # greedy: the same text


def test_function_call_round_trip(client: openai.OpenAI, up: dict[str, Any]) -> None:
    first = client.responses.create(
        model=up["model"],
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        extra_body={"seed": 3},
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 14}'}
    second = client.responses.create(
        model=up["model"],
        previous_response_id=first.id,
        input=[result],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=4,
        extra_body=SHORT,
    )
    # The prompt is exactly the chat completion's of the same conversation.
    function = {"name": call.name, "arguments": call.arguments}
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp_c": 14}'},
    ]
    chat_tool: Any = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS},
    }
    chat = client.chat.completions.create(
        model=up["model"], messages=messages, tools=[chat_tool], tool_choice="none", max_tokens=1
    )
    assert second.usage is not None and chat.usage is not None and first.usage is not None
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens


def test_streamed_named_function_call(client: openai.OpenAI, up: dict[str, Any]) -> None:
    named: Any = {"type": "function", "name": "get_time"}
    with client.responses.stream(
        model=up["model"], input="Time?", tools=[WEATHER, TIME], tool_choice=named, temperature=1.0
    ) as stream:
        pieces = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = final.output
    assert final.status == "completed" and call.type == "function_call" and call.name == "get_time"
    assert "".join(pieces) == call.arguments
    jsonschema.validate(json.loads(call.arguments), TIME["parameters"])


class Answer(BaseModel):
    sunny: bool
    city: Literal["Paris", "Oslo", "Lima"]


def test_agents_sdk_tool_round_trip(client: openai.OpenAI, up: dict[str, Any]) -> None:
    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Lima"]) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"sunny in {city}"

    async def run() -> tuple[Any, Any, Any]:
        client = openai.AsyncOpenAI(base_url=up["openai"], api_key="unused", max_retries=0)
        model = OpenAIResponsesModel(model=up["model"], openai_client=client)
        # A random model's free text never ends on its own: the tool's result is the answer here,
        # and the structured answer after it is shaped by the output type's grammar.
        weather = Agent(
            name="weather",
            instructions="Call get_weather.",
            tools=[get_weather],
            model=model,
            model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=1.0),
            tool_use_behavior="stop_on_first_tool",
        )
        answer = Agent(name="answer", instructions="Answer.", model=model, output_type=Answer)
        called = await Runner.run(weather, "Weather in Paris?")
        answered = await Runner.run(answer, called.to_input_list())
        streamed = Runner.run_streamed(weather, "Weather in Oslo?")
        async for _ in streamed.stream_events():
            pass
        return called, answered, streamed

    called, answered, streamed = asyncio.run(run())
    assert len(asked) == 2
    assert called.final_output == f"sunny in {asked[0]}" and streamed.final_output == f"sunny in {asked[1]}"
    user, call, result = called.to_input_list()
    assert (call["type"], result["type"], result["output"]) == (
        "function_call",
        "function_call_output",
        called.final_output,
    )
    assert isinstance(answered.final_output, Answer)
    # The answer's prompt is the chat completion's of the same conversation, the call and its result.
    function = {"name": call["name"], "arguments": call["arguments"]}
    messages: Any = [
        {"role": "system", "content": "Answer."},
        user,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call["call_id"], "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call["call_id"], "content": result["output"]},
    ]
    chat = client.chat.completions.create(model=up["model"], messages=messages, max_tokens=1)
    assert chat.usage is not None
    assert answered.context_wrapper.usage.input_tokens == chat.usage.prompt_tokens
