"""The pythonic tool-call format (Llama 3.2 / 4 and others): the output is a Python list of calls,

    [get_weather(city="Paris", days=2), get_time(zone='UTC')]

keyword arguments only, each value a Python literal (strings, numbers, True/False/None, lists,
dicts). The arguments JSON is the literals converted (`True` -> `true`, `None` -> `null`).

The grammar forces the list's shape, the function names and their parameter names (in any order,
each at most as often as written: presence and types are not checked, unlike the JSON formats),
and keeps every value a literal that parses.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.tool_calls.block_parser import BlockToolCallFormat, ParsedCall, bracket_end
from services.gateway.tool_calls.request import FunctionTool

# Python literals in xgrammar's EBNF; strings stay on one line and use only simple escapes.
_LITERALS = r"""
value ::= string | number | "True" | "False" | "None" | list | dict
list ::= "[" (value (", " value)*)? "]"
dict ::= "{" (string ": " value (", " string ": " value)*)? "}"
string ::= "\"" ([^"\\\x00-\x1f] | "\\" ["\\nrt'])* "\"" | "'" ([^'\\\x00-\x1f] | "\\" ["\\nrt'])* "'"
number ::= "-"? ("0" | [1-9] [0-9]*) ("." [0-9]+)?
"""


class PythonicFormat(BlockToolCallFormat):
    """A Python list of calls with keyword arguments."""

    name = "pythonic"
    trigger = "["
    end = ")"
    separator = ", "
    section_begin = "["
    section_end = "]"

    def begin(self, function: str) -> str:
        return f"{function}("

    def content(self, tool: FunctionTool) -> dict[str, Any]:
        keys = sorted(tool.parameters.get("properties", {}))
        if not keys:
            return {"type": "grammar", "grammar": 'root ::= ""'}
        key = " | ".join(json.dumps(k) for k in keys)
        grammar = f'root ::= "" | kwarg (", " kwarg)*\nkwarg ::= ({key}) "=" value\n{_LITERALS}'
        return {"type": "grammar", "grammar": grammar}

    def header(self, buf: str, names: Sequence[str]) -> bool | None:
        rest = buf[1:]
        if any(rest.startswith(f"{name}(") for name in names):
            return True
        return None if any(f"{name}(".startswith(rest) for name in names) else False

    def block_end(self, buf: str) -> int | None:
        return bracket_end(buf, 0, quotes="\"'")

    def parse_block(
        self, block: str, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]
    ) -> list[ParsedCall] | None:
        try:
            tree = ast.parse(block, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls: list[ParsedCall] = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            if node.func.id not in names or any(kw.arg is None for kw in node.keywords):
                return None
            try:
                arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                calls.append((node.func.id, json.dumps(arguments, ensure_ascii=False)))
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return None
        return calls
