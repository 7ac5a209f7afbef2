"""`tools`, `tool_choice` and `parallel_tool_calls` of a chat request, validated into a `ToolRequest`.

Shapes (a tool's `type`, its name's characters, `parameters` being an object schema) are checked
by the pydantic models in `protocol.py`; the rules spanning fields live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from services.gateway.protocol import ChatCompletionRequest, bad_request

ToolChoiceMode = Literal["none", "auto", "required", "named"]
# OpenAI's default when a tool has no `parameters`: a function without arguments.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionTool:
    """One callable function: its name and the JSON schema of its arguments object."""

    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request asks of tool calling.

    `none`: the tools are shown to the model but its output is neither constrained nor parsed.
    `auto`: free text, and any call it starts must be complete and valid. `required`: at least one
    call. `named`: exactly one call, of `named`. `parallel`: more than one call allowed.
    """

    tools: tuple[FunctionTool, ...]
    mode: ToolChoiceMode
    parallel: bool = True
    named: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(tool.name for tool in self.tools)

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        """Each tool's arguments schema by name."""
        return {tool.name: tool.parameters for tool in self.tools}

    def forced(self) -> FunctionTool:
        """The one tool a `named` choice forces."""
        return next(tool for tool in self.tools if tool.name == self.named)


_CHOICE_SHAPE = '\'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'


def resolve_tools(req: ChatCompletionRequest) -> ToolRequest | None:
    """The request's tool calling, None when it gives no tools; raises 400s naming the field."""
    choice = req.tool_choice
    if not req.tools:  # `tools: []` is "no tools", as some clients send it
        if choice is None or choice == "none":
            return None
        raise bad_request("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
    tools: list[FunctionTool] = []
    for i, tool in enumerate(req.tools):
        name = tool.function.name
        if any(t.name == name for t in tools):
            raise bad_request(f"the tool name '{name}' is given more than once", f"tools[{i}].function.name")
        tools.append(FunctionTool(name, tool.function.parameters or NO_PARAMETERS))
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice in ("none", "auto", "required"):
        return ToolRequest(tuple(tools), choice or "auto", parallel)
    return ToolRequest(tuple(tools), "named", parallel, _named_choice(choice, [t.name for t in tools]))


def _named_choice(choice: Any, names: list[str]) -> str:
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise bad_request(f"'tool_choice' must be {_CHOICE_SHAPE}", "tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice.function.name' must be a string", "tool_choice.function.name")
    if name not in names:
        raise bad_request(
            f"'tool_choice' names the function '{name}', which is not among 'tools'",
            "tool_choice.function.name",
        )
    return name
