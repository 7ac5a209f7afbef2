"""The shape every tool-call format shares, and the structural tag built from it.

A call is `begin(name)` + arguments (`content(tool)`, a JSON object unless the format says
otherwise) + `end`. Some formats wrap their calls in a section (`section_begin` ... `section_end`,
calls separated by `separator`): DeepSeek-V3's `<｜tool▁calls▁begin｜>`, Mistral's `[TOOL_CALLS] [`,
the pythonic `[`. The structural tag (xgrammar's JSON, built without importing xgrammar) is

    tool_choice   without a section                          with a section
    auto          triggered_tags(trigger, calls)             triggered_tags(section_begin, [section])
    required      tags_with_separator(calls, at_least_one)   section
    named         the one call                               section of the one call

`required` and named choices admit nothing but the calls, so the grammar is complete once they are
and the engine's stop token ends the sample (free text after them would run to max_tokens).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from services.gateway.tool_calls.parser import Event
    from services.gateway.tool_calls.request import FunctionTool, ToolRequest


class CallParser(Protocol):
    """An incremental parser of one output: text in, events out (see `parser.py`)."""

    def feed(self, text: str) -> list[Event]: ...

    def finish(self) -> list[Event]: ...


class ToolCallFormat(ABC):
    """One way of writing tool calls: the literal pieces around each call's arguments."""

    name: ClassVar[str]
    trigger: ClassVar[str]  # starts every call (or section); text before it is free text
    end: ClassVar[str]  # closes a call after its arguments
    separator: ClassVar[str] = "\n"  # between calls of one turn
    section_begin: ClassVar[str | None] = None
    section_end: ClassVar[str | None] = None

    @abstractmethod
    def begin(self, function: str) -> str:
        """The text of a call to `function` up to its arguments."""

    def content(self, tool: FunctionTool) -> dict[str, Any]:
        """The structural tag's format of `tool`'s arguments."""
        return {"type": "json_schema", "json_schema": tool.parameters}

    def parser(self, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]) -> CallParser:
        """A parser for one output, knowing the tools' names and argument schemas."""
        from services.gateway.tool_calls.parser import ToolCallParser

        return ToolCallParser(self, names)

    def structural_tag(self, request: ToolRequest) -> dict[str, Any] | None:
        """xgrammar's structural tag for `request`; None when the output is not constrained."""
        fmt = self.calls_format(request)
        return None if fmt is None else {"type": "structural_tag", "format": fmt}

    def calls_format(self, request: ToolRequest) -> dict[str, Any] | None:
        """The structural tag's `format` for `request` (None for tool_choice "none")."""
        if request.mode == "none":
            return None
        if self.section_begin is not None:
            tools = (request.forced(),) if request.mode == "named" else request.tools
            section = self._section(tools, request.parallel and request.mode != "named")
            if request.mode != "auto":
                return section
            return {
                "type": "triggered_tags",
                "triggers": [self.section_begin],
                "tags": [section],
                "at_least_one": False,
                "stop_after_first": not request.parallel,
            }
        if request.mode == "named":
            return self._tag(request.forced())
        tags = [self._tag(tool) for tool in request.tools]
        if request.mode == "required":
            return {
                "type": "tags_with_separator",
                "tags": tags,
                "separator": self.separator,
                "at_least_one": True,
                "stop_after_first": not request.parallel,
            }
        return {
            "type": "triggered_tags",
            "triggers": [self.trigger],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": not request.parallel,
        }

    def _tag(self, tool: FunctionTool) -> dict[str, Any]:
        return {"type": "tag", "begin": self.begin(tool.name), "content": self.content(tool), "end": self.end}

    def _section(self, tools: Sequence[FunctionTool], parallel: bool) -> dict[str, Any]:
        assert self.section_begin is not None and self.section_end is not None
        calls = {
            "type": "tags_with_separator",
            "tags": [self._tag(tool) for tool in tools],
            "separator": self.separator,
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
        return {"type": "tag", "begin": self.section_begin, "content": calls, "end": self.section_end}
