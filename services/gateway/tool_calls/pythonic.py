"""The pythonic tool-call format (Llama 3.2 / 4 and others): the output is a Python list of calls,

    [get_weather(city="Paris", days=2), get_time(zone='UTC')]

keyword arguments only, each value a Python literal (strings, numbers, True/False/None, lists,
dicts). The arguments JSON is the literals converted (`True` -> `true`, `None` -> `null`).

The grammar forces the list's shape and the function names, and each call's keyword arguments
from its parameters' schema: in the schema's order (as xgrammar orders JSON objects), every
required one present, each value a literal of its parameter's type or one of its enum values;
an integer range is kept when it is small (at most 256 values) or a lower bound of 0 or 1.
String patterns and lengths, and the schemas of nested lists and dicts, are not enforced (any
literal of the type parses), unlike the JSON formats.
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
number ::= int ("." [0-9]+)?
int ::= "-"? nat
nat ::= "0" | [1-9] [0-9]*
"""
_TYPES = {
    "integer": "int",
    "number": "number",
    "string": "string",
    "boolean": '"True" | "False"',
    "null": '"None"',
    "array": "list",
    "object": "dict",
}
_SMALL_RANGE = 256


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
        properties: dict[str, Any] = tool.parameters.get("properties", {})
        if not properties:
            return {"type": "grammar", "grammar": 'root ::= ""'}
        required = set(tool.parameters.get("required", []))
        # head_i: the arguments from the i-th on, none written yet; tail_i: after one was written.
        n = len(properties)
        rules = ["root ::= head_0", f'head_{n} ::= ""', f'tail_{n} ::= ""']
        for i, (key, schema) in enumerate(properties.items()):
            rules.append(f"kwarg_{i} ::= {json.dumps(key + '=')} ({_value_rule(schema)})")
            if key in required:
                rules.append(f"head_{i} ::= kwarg_{i} tail_{i + 1}")
                rules.append(f'tail_{i} ::= ", " kwarg_{i} tail_{i + 1}')
            else:
                rules.append(f"head_{i} ::= kwarg_{i} tail_{i + 1} | head_{i + 1}")
                rules.append(f'tail_{i} ::= (", " kwarg_{i})? tail_{i + 1}')
        return {"type": "grammar", "grammar": "\n".join(rules) + "\n" + _LITERALS}

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


def _value_rule(schema: Any) -> str:
    """The EBNF of a value its parameter's schema admits (a Python literal)."""
    if not isinstance(schema, dict):
        return "value"
    if "enum" in schema or "const" in schema:
        choices = schema["enum"] if "enum" in schema else [schema["const"]]
        return " | ".join(json.dumps(_literal(c)) for c in choices) or "value"
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if types == ["integer"]:
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(low, int) and isinstance(high, int) and 0 <= high - low < _SMALL_RANGE:
            return " | ".join(json.dumps(str(v)) for v in range(low, high + 1))
        if isinstance(low, int) and low >= 0:
            return "nat" if low == 0 else "[1-9] [0-9]*"
    rules = [_TYPES[t] for t in types if t in _TYPES]
    return " | ".join(rules) or "value"


def _literal(value: Any) -> str:
    """`value` (JSON data) as a Python literal."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)
