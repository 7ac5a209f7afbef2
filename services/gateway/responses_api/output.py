"""The chat path's stream chunks -> a Responses `response` object and its stream events.

`OutputStream` folds the chunks of one chat completion (`Handler.stream`, with usage) into the
response's output items, returning the events each chunk makes; a whole (non-streamed) response
is the same fold with the events dropped, so both shapes come from one place.

    reasoning_content   a `reasoning` item, its text a `reasoning_text` content part
    content             a `message` item with one `output_text` part
    tool_calls          a `function_call` item per call (`call_id` the chat path's `call_...` id)

Items stream one at a time in output order: a new item closes the one before it (a call starting
ends the text before it). Events, each with its `sequence_number`:

    response.created, response.in_progress                       on the router's first increment
    response.output_item.added, response.content_part.added      an item (and its text part) opens
    response.output_text.delta | response.reasoning_text.delta   text pieces
    response.function_call_arguments.delta                       argument pieces
    *.done, response.content_part.done, response.output_item.done   an item closes
    response.completed | response.incomplete | response.failed   the end (with the whole response)

A sample ending by length is `incomplete` (`incomplete_details.reason` "max_output_tokens"), its
last item too. A completed response without a message or a call gets an empty message: clients
(the Agents SDK) read a turn with neither as unfinished.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from services.gateway.protocol import OpenAIError
from services.gateway.responses_api.request import FunctionToolSpec, ResponsesRequest

Event = dict[str, Any]
_TextKind = Literal["reasoning", "message"]
# Per text item: its id prefix, its content part's type, the prefix of its delta/done events.
_TEXT: dict[_TextKind, tuple[str, str, str]] = {
    "reasoning": ("rs", "reasoning_text", "response.reasoning_text"),
    "message": ("msg", "output_text", "response.output_text"),
}


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: `resp_...`, `msg_...`, `fc_...`, `rs_...`."""
    return f"{prefix}_{uuid.uuid4().hex}"


def new_response(
    req: ResponsesRequest, model: str, tools: list[FunctionToolSpec], store: bool
) -> dict[str, Any]:
    """The response object before any output: the request's settings echoed, `in_progress`."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    effort = req.reasoning.effort if req.reasoning is not None else None
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": None,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": effort, "summary": None},
        "store": store,
        "temperature": req.temperature,
        "text": {"format": fmt.model_dump() if fmt is not None else {"type": "text"}},
        "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
        "tools": [tool.echo() for tool in tools],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": req.user,
        "metadata": req.metadata or {},
    }


@dataclass
class _OpenItem:
    index: int  # output_index
    item: dict[str, Any]
    pieces: list[str] = field(default_factory=list)  # text or arguments so far


class OutputStream:
    """One response's output, folded from chat chunks; each call returns the events it makes."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.started = False
        self._sequence = 0
        self._open: _OpenItem | None = None
        self._finish_reason: str | None = None

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events of one chat chunk (the first also opens the response)."""
        out: list[Event] = []
        if not self.started:
            self.started = True
            out += [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                out += self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                out += self._text("message", delta["content"])
            for call in delta.get("tool_calls") or ():
                out += self._call(call)
            self._finish_reason = choice["finish_reason"] or self._finish_reason
        if chunk.get("usage"):
            self.response["usage"] = _usage(chunk["usage"])
        return out

    def finish(self) -> list[Event]:
        """The events that end the response: the last item closed, then completed or incomplete."""
        cut = self._finish_reason == "length"
        out = self._close("incomplete" if cut else "completed")
        if not cut and not any(i["type"] in ("message", "function_call") for i in self.response["output"]):
            out += self._text("message", "") + self._close("completed")
        status = "incomplete" if cut else "completed"
        self.response["status"] = status
        if cut:
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["completed_at"] = int(time.time())
        out.append(self._lifecycle(f"response.{status}"))
        return out

    def fail(self, error: OpenAIError) -> list[Event]:
        """The event that ends a response the router or engine failed (the items so far in it)."""
        if self._open is not None:
            self._open.item["status"] = "incomplete"
            self._open = None
        code = error.code or ("server_error" if error.status >= 500 else "invalid_prompt")
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": error.message}
        return [self._lifecycle("response.failed")]

    # ---- items -----------------------------------------------------------------------------

    def _text(self, kind: _TextKind, text: str) -> list[Event]:
        prefix, part_type, event = _TEXT[kind]
        out: list[Event] = []
        current = self._open
        if current is None or current.item["type"] != kind:
            out += self._close("completed")
            item = {"id": new_id(prefix), "type": kind, "status": "in_progress", "content": []}
            if kind == "message":
                item["role"] = "assistant"
            else:
                item["summary"] = []
            current = self._add(item)
            out.append(self._event("response.output_item.added", output_index=current.index, item=item))
            out.append(self._part_event("response.content_part.added", current, _part(part_type, "")))
        current.pieces.append(text)
        if text:
            out.append(self._part_event(f"{event}.delta", current, delta=text, **_logprobs(part_type)))
        return out

    def _call(self, call: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        function = call.get("function") or {}
        if "id" in call:  # a call's first delta: its id and name
            out += self._close("completed")
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call["id"],
                "name": function["name"],
                "arguments": "",
            }
            added = self._add(item)
            out.append(self._event("response.output_item.added", output_index=added.index, item=item))
        current, arguments = self._open, function.get("arguments")
        assert current is not None and current.item["type"] == "function_call", "arguments of no call"
        if arguments:
            current.pieces.append(arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=current.item["id"],
                    output_index=current.index,
                    delta=arguments,
                )
            )
        return out

    def _add(self, item: dict[str, Any]) -> _OpenItem:
        self._output.append(item)
        self._open = _OpenItem(len(self._output) - 1, item)
        return self._open

    def _close(self, status: str) -> list[Event]:
        """The events closing the open item, if any, with `status`."""
        current, self._open = self._open, None
        if current is None:
            return []
        item, text = current.item, "".join(current.pieces)
        item["status"] = status
        out: list[Event] = []
        if item["type"] == "function_call":
            item["arguments"] = text
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=current.index,
                    arguments=text,
                )
            )
        else:
            _, part_type, event = _TEXT[item["type"]]
            part = _part(part_type, text)
            item["content"] = [part]
            out.append(self._part_event(f"{event}.done", current, text=text, **_logprobs(part_type)))
            out.append(self._part_event("response.content_part.done", current, part))
        out.append(self._event("response.output_item.done", output_index=current.index, item=item))
        return out

    # ---- events ----------------------------------------------------------------------------

    @property
    def _output(self) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = self.response["output"]
        return output

    def _lifecycle(self, kind: str) -> Event:
        return self._event(kind, response=self.response)

    def _part_event(
        self, kind: str, current: _OpenItem, part: dict[str, Any] | None = None, **fields: Any
    ) -> Event:
        where = {"item_id": current.item["id"], "output_index": current.index, "content_index": 0}
        return self._event(kind, **where, **({"part": part} if part is not None else {}), **fields)

    def _event(self, kind: str, **fields: Any) -> Event:
        # A copy: the items and the response change as later chunks arrive.
        event = {"type": kind, "sequence_number": self._sequence, **copy.deepcopy(fields)}
        self._sequence += 1
        return event


def _part(part_type: str, text: str) -> dict[str, Any]:
    if part_type == "output_text":
        return {"type": part_type, "text": text, "annotations": [], "logprobs": []}
    return {"type": part_type, "text": text}


def _logprobs(part_type: str) -> dict[str, Any]:
    """The `logprobs` field output_text events carry (empty: they are not offered here)."""
    return {"logprobs": []} if part_type == "output_text" else {}


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The chat path's usage in the Responses' names (reasoning tokens are not counted apart)."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
