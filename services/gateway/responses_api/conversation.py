"""A Responses request as the chat completion the chat path runs, and the chat path's errors back
in the Responses' names.

    instructions            a system message first (never carried over from a previous response)
    message items           messages of the same role (`developer` is the chat path's too)
    function_call items     an assistant message's `tool_calls`: calls right after an assistant
                            message or another call join it, as one turn of the model
    function_call_output    a `tool` message answering `call_id` (with the call's `name`)
    reasoning items         left out, as chat templates drop earlier turns' reasoning

Everything after that (template, tokenizing, limits, tool grammars and parsing, reasoning, stops,
usage) is the chat path's own, so a conversation renders exactly as the same chat messages do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from services.gateway.protocol import ChatCompletionRequest, OpenAIError, SamplingFields, bad_request
from services.gateway.responses_api.request import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolSpec,
    InputItem,
    MessageItem,
    ResponsesRequest,
)

_SAMPLING = tuple(SamplingFields.model_fields)
_TOOL_FIELD = re.compile(r"tools\[(\d+)\]\.function\.(.+)")


def chat_request(
    req: ResponsesRequest,
    tools: Sequence[FunctionToolSpec],
    history: Sequence[InputItem],
    items: Sequence[InputItem],
) -> ChatCompletionRequest:
    """The chat completion that answers `req` (its `tools` and input `items`) after the stored
    `history` (a previous response's conversation); raises 400s naming the Responses' fields."""
    messages = chat_messages(req.instructions, history, items)
    if not messages:
        raise bad_request("the request has no input (and no instructions)", "input")
    tool_choice = req.chat_tool_choice()
    response_format = req.response_format()
    if response_format is not None and tools and tool_choice != "none":
        if tool_choice in ("auto", None):
            raise bad_request(
                "'text.format' cannot be combined with function 'tools' under tool_choice 'auto': a "
                "request takes one output constraint. Use tool_choice 'required', a named function or "
                "'none', or leave out one of them",
                "text.format",
            )
        response_format = None  # 'required' or a named function: only calls follow, no text to shape
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "tools": [tool.chat_tool() for tool in tools] or None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format,
        "reasoning_effort": req.reasoning.effort if req.reasoning is not None else None,
        "chat_template_kwargs": req.chat_template_kwargs,
        # The Responses' output is assembled from the chat stream, usage included (`output.py`).
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update({name: getattr(req, name) for name in _SAMPLING})
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


def chat_messages(
    instructions: str | None, history: Sequence[InputItem], items: Sequence[InputItem]
) -> list[dict[str, Any]]:
    """Chat messages of a conversation: `history` (already checked), then the request's `items`
    (`input[i]`); a function_call_output without its call is a 400 naming it."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    names: dict[str, str] = {}  # call_id -> function name
    turn: dict[str, Any] | None = None  # the assistant message later calls join
    offset = len(history)
    for i, item in enumerate([*history, *items]):
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.content})
            turn = messages[-1] if item.role == "assistant" else None
        elif isinstance(item, FunctionCallItem):
            if turn is None:
                turn = {"role": "assistant", "content": None}
                messages.append(turn)
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            turn.setdefault("tool_calls", []).append(call)
            names[item.call_id] = item.name
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in names:
                at = f"input[{i - offset}].call_id" if i >= offset else "previous_response_id"
                raise bad_request(f"No function call found for the output with call_id '{item.call_id}'", at)
            message = {"role": "tool", "tool_call_id": item.call_id, "content": item.output}
            messages.append({**message, "name": names[item.call_id]})
            turn = None
    return messages


def responses_param(param: str | None) -> str | None:
    """The Responses' name of a chat request field an error names."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"  # instructions and history make message indices differ from input's
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if param.startswith("response_format"):
        return "text.format"
    if param == "tool_choice.function.name":
        return "tool_choice.name"
    tool_field = _TOOL_FIELD.fullmatch(param)
    if tool_field is not None:
        return f"tools[{tool_field[1]}].{tool_field[2]}"
    return param


def responses_error(error: OpenAIError) -> OpenAIError:
    """`error` naming the Responses' field instead of the chat request's."""
    param = responses_param(error.param)
    if param == error.param:
        return error
    return OpenAIError(error.status, error.message, type=error.type, param=param, code=error.code)
