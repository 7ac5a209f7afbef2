"""How model families write tool calls, one class per format, and the structural tag forcing them.

Each call is literal text `begin(name)` + the arguments as a JSON object + `end`, and `trigger` (a
prefix of every `begin`) is where a call starts:

    format        trigger        begin(name)                                         end
    hermes        <tool_call>    <tool_call>\\n{"name": "NAME", "arguments":          }\\n</tool_call>
    llama3_json   {"name":       {"name": "NAME", "parameters":                      }

The structural tag is xgrammar's (>= 0.2) JSON, written here as plain data so that the gateway
does not import xgrammar (and torch). For hermes it equals `xgrammar.get_model_structural_tag(
"qwen_3", ..., reasoning="disabled", exclude_special_tokens=False)`; the tests check that.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from services.gateway.tool_calls.request import FunctionTool, ToolRequest


class ToolCallFormat(ABC):
    """One way of writing tool calls: the literal pieces around the arguments object."""

    name: ClassVar[str]
    trigger: ClassVar[str]  # starts every call; text before it is free text
    end: ClassVar[str]  # closes a call after its arguments object

    @abstractmethod
    def begin(self, function: str) -> str:
        """The text of a call to `function` up to its arguments object (starts with `trigger`)."""

    def structural_tag(self, request: ToolRequest) -> dict[str, Any] | None:
        """xgrammar's structural tag for `request`; None when the output is not constrained."""
        if request.mode == "none":
            return None
        if request.mode == "named":
            fmt = self._tag(request.forced())
        else:
            fmt = {
                "type": "triggered_tags",
                "triggers": [self.trigger],
                "tags": [self._tag(tool) for tool in request.tools],
                "at_least_one": request.mode == "required",
                "stop_after_first": not request.parallel,
            }
        return {"type": "structural_tag", "format": fmt}

    def _tag(self, tool: FunctionTool) -> dict[str, Any]:
        return {
            "type": "tag",
            "begin": self.begin(tool.name),
            "content": {"type": "json_schema", "json_schema": tool.parameters},
            "end": self.end,
        }


class HermesFormat(ToolCallFormat):
    """Hermes / Qwen2.5 / Qwen3 (and the tiny ChatML test model): JSON inside <tool_call> tags."""

    name = "hermes"
    trigger = "<tool_call>"
    end = "}\n</tool_call>"

    def begin(self, function: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(function) + ', "arguments": '


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1+ JSON tool calls: a bare `{"name": ..., "parameters": {...}}` object."""

    name = "llama3_json"
    trigger = '{"name": '
    end = "}"

    def begin(self, function: str) -> str:
        return '{"name": ' + json.dumps(function) + ', "parameters": '


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}
TOOL_CALL_PARSERS = ("auto", *TOOL_CALL_FORMATS)  # the values of --tool-call-parser


def tool_call_format(parser: str, chat_template: str | None) -> ToolCallFormat:
    """The format `--tool-call-parser` names; for "auto", the one the chat template writes.

    A template mentioning `<tool_call>` or ChatML's `im_start` is hermes, one with Llama 3's header
    tokens llama3_json; anything else falls back to hermes.
    """
    if parser != "auto":
        return TOOL_CALL_FORMATS[parser]
    template = chat_template or ""
    if "<tool_call>" in template or "im_start" in template:
        return TOOL_CALL_FORMATS["hermes"]
    if "<|start_header_id|>" in template:
        return TOOL_CALL_FORMATS["llama3_json"]
    return TOOL_CALL_FORMATS["hermes"]
