"""Parsed tool calls in OpenAI's shapes: a whole `message`, or a choice's stream of `delta`s.

`content` is the text outside calls, None when that is only whitespace; a stream holds back
leading whitespace until other content follows, so its content deltas concatenate to the same.
A call cut by max_tokens is content text in a whole message; a stream has sent its start and
arguments already, and its finish_reason ("length") tells the client it is cut.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Any

from services.gateway.tool_calls.base import CallParser, ToolCallFormat
from services.gateway.tool_calls.parser import (
    CallArguments,
    CallCut,
    CallEnd,
    CallStart,
    Text,
)

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool call id in OpenAI's shape: `call_` and 24 letters or digits."""
    return "call_" + "".join(random.choices(_ID_ALPHABET, k=24))


@dataclass(frozen=True)
class ToolParsing:
    """How to find the calls in a tool-calling request's output: the format, the tools' names and
    their argument schemas (formats whose values are not JSON convert them by type)."""

    format: ToolCallFormat
    names: tuple[str, ...]
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def parser(self) -> CallParser:
        return self.format.parser(self.names, self.parameters)


@dataclass(frozen=True)
class ParsedMessage:
    """A whole output split into OpenAI's `content` and complete `tool_calls`."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_message(parsing: ToolParsing, text: str) -> ParsedMessage:
    """Split one whole output into content and tool calls."""
    parser = parsing.parser()
    content: list[str] = []
    calls: dict[int, tuple[str, list[str]]] = {}  # open or complete: name, argument pieces
    complete: list[int] = []
    for event in [*parser.feed(text), *parser.finish()]:
        if isinstance(event, Text):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls[event.index] = (event.name, [])
        elif isinstance(event, CallArguments):
            calls[event.index][1].append(event.text)
        elif isinstance(event, CallEnd):
            complete.append(event.index)
        elif isinstance(event, CallCut):
            content.append(event.raw)  # the last call, so the content stays in order
    tool_calls = [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": calls[i][0], "arguments": "".join(calls[i][1])},
        }
        for i in complete
    ]
    joined = "".join(content)
    return ParsedMessage(joined if joined.strip() else None, tool_calls)


class ToolCallStream:
    """One choice's stream: output text in, OpenAI delta dicts out (`content` or `tool_calls`)."""

    def __init__(self, parsing: ToolParsing) -> None:
        self._parser = parsing.parser()
        self._held_space = ""  # whitespace-only content, sent once other content follows
        self._content_started = False
        self.complete_calls = 0

    def deltas(self, text: str, last: bool) -> list[dict[str, Any]]:
        """The deltas for the next piece of output; `last` flushes what was held back."""
        events = self._parser.feed(text)
        if last:
            events += self._parser.finish()
        out: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, Text):
                content = self._content(event.text)
                if content:
                    out.append({"content": content})
            elif isinstance(event, CallStart):
                function = {"name": event.name, "arguments": ""}
                call = {"index": event.index, "id": new_call_id(), "type": "function", "function": function}
                out.append({"tool_calls": [call]})
            elif isinstance(event, CallArguments):
                out.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
            elif isinstance(event, CallEnd):
                self.complete_calls += 1
        return out

    def _content(self, text: str) -> str:
        if self._content_started:
            return text
        if not text.strip():
            self._held_space += text
            return ""
        self._content_started = True
        text, self._held_space = self._held_space + text, ""
        return text
