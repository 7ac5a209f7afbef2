"""JSON-schema rewrites applied before xgrammar compiles a constraint.

- A string with `minLength`/`maxLength` (and no `pattern`, `format`, `enum` or `const`) becomes the
  same bounds on a `pattern` of characters that need no escape: xgrammar (0.2.x) compiles the
  length bound to a character class that admits raw control characters, which no JSON parser
  accepts (`"a\\x0e"`). The pattern excludes them (and `"` and `\\`, which that class never
  allowed either), so every string the grammar admits is valid JSON; the rewritten schema is
  stricter than the original, so outputs still validate against what the client sent.
- In a structural tag, every `json_schema` content gets the same rewrite, and unless JSON may use
  any whitespace it becomes the compact grammar `response_format` gets (xgrammar's structural tags
  allow any whitespace in JSON, so a random model pads a tool call with spaces until max_tokens).
"""

from __future__ import annotations

import json
from typing import Any

import xgrammar as xgr

# JSON string characters needing no escape, as positive ranges without the UTF-16 surrogates:
# xgrammar's negated classes also admit surrogates' and overlong byte sequences, which are not UTF-8.
# The range ends are the characters themselves, not escapes: xgrammar's regex reader has no
# `\U........` escape (its FSM builder warned on every such schema that it took it literally).
_PLAIN_CHARS = "[ !#-\\[\\]-\ud7ff\ue000-\U0010ffff]"
_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples", "required"})  # values, not schemas
_STRUCTURAL_JSON_KEYS = frozenset({"type", "json_schema", "style"})


def bounded_strings(schema: Any) -> Any:
    """`schema` with every length-bounded string rewritten to a pattern (see the module docstring)."""
    if isinstance(schema, list):
        return [bounded_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _NOT_SCHEMAS else bounded_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if (
        out.get("type") == "string"
        and bounded
        and not any(k in out for k in ("pattern", "format", "enum", "const"))
        and _is_count(out.get("minLength", 0))
        and _is_count(out.get("maxLength", 0))
    ):
        low = out.pop("minLength", 0)
        high = out.pop("maxLength", "")
        out["pattern"] = f"^{_PLAIN_CHARS}{{{low},{high}}}$"
    return out


def json_schema_source(source: str) -> str:
    """A `json_schema` constraint's text with `bounded_strings` applied."""
    return json.dumps(bounded_strings(json.loads(source)))


def structural_tag_source(source: str, any_whitespace: bool) -> str:
    """A structural tag's text with its JSON contents rewritten (see the module docstring)."""
    return json.dumps(_rewrite_format(json.loads(source), any_whitespace))


def _rewrite_format(node: Any, any_whitespace: bool) -> Any:
    if isinstance(node, list):
        return [_rewrite_format(item, any_whitespace) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "json_schema" and "json_schema" in node:
        schema = bounded_strings(node["json_schema"])
        plain_json = node.get("style", "json") == "json" and _STRUCTURAL_JSON_KEYS.issuperset(node)
        if plain_json and not any_whitespace and isinstance(schema, dict):
            compact = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
            return {"type": "grammar", "grammar": str(compact)}
        return {**node, "json_schema": schema}
    return {k: _rewrite_format(v, any_whitespace) for k, v in node.items()}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
