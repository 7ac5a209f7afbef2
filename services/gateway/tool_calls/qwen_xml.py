"""Qwen3-Coder's XML tool calls (its chat template's format):

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    ...
    </function>
    </tool_call>

A value is text; it becomes a JSON string when its parameter's schema allows a string (or gives no
type and no enum), else the JSON (or Python literal) it spells, as vLLM's qwen3_coder parser does;
such a value is read without the whitespace the grammar lets the model put around it (an enum's
`\nOslo\n\r\n` is "Oslo"). The grammar
is xgrammar's `json_schema` content in its `qwen_xml` style.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.tool_calls.block_parser import BlockToolCallFormat, ParsedCall
from services.gateway.tool_calls.request import FunctionTool

_FUNCTION = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)
_HEADER = "<function="


class Qwen3CoderFormat(BlockToolCallFormat):
    """Qwen3-Coder: one `<tool_call>` block per call, parameters as XML elements."""

    name = "qwen3_coder"
    trigger = "<tool_call>"
    end = "\n</function>\n</tool_call>"

    def begin(self, function: str) -> str:
        return f"<tool_call>\n<function={function}>\n"

    def content(self, tool: FunctionTool) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": tool.parameters, "style": "qwen_xml"}

    def header(self, buf: str, names: Sequence[str]) -> bool | None:
        rest = buf[len(self.trigger) :].lstrip()
        if len(rest) < len(_HEADER):
            return None if _HEADER.startswith(rest) else False
        return rest.startswith(_HEADER)

    def block_end(self, buf: str) -> int | None:
        at = buf.find("</tool_call>")
        return None if at < 0 else at + len("</tool_call>")

    def parse_block(
        self, block: str, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]
    ) -> list[ParsedCall] | None:
        match = _FUNCTION.fullmatch(block)
        if match is None or match.group(1) not in names:
            return None
        name = match.group(1)
        properties = parameters.get(name, {}).get("properties", {})
        arguments = {
            key: _value(raw, properties.get(key, {})) for key, raw in _PARAMETER.findall(match.group(2))
        }
        return [(name, json.dumps(arguments, ensure_ascii=False))]


def _value(raw: str, schema: dict[str, Any]) -> Any:
    text = raw.removeprefix("\n").removesuffix("\n")
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if "string" in types or not (types or "enum" in schema or "const" in schema):
        return text  # a string (or untyped) parameter's text is its value, as written
    # Any other value may be padded with whitespace (the grammar admits any around it).
    bare = text.strip()
    if bare in [c for c in schema.get("enum", [schema.get("const")]) if isinstance(c, str)]:
        return bare
    try:
        return json.loads(bare)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(bare)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return bare
    try:
        json.dumps(value)  # a tuple, set or bytes literal is not a JSON value
    except (TypeError, ValueError):
        return bare
    return value
