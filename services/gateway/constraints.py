"""Output constraints: the one a request asks for, as SamplingParams' `constraint` oneof.

A request carries at most one: `response_format` (json_object / json_schema), SGLang's `regex` or
`ebnf`, or the structural tag its `tools` imply (built in `tool_calls.formats`). The engine compiles
and enforces them with xgrammar and answers INVALID_ARGUMENT (a 400 here) for a schema, regex or
grammar it cannot compile; the gateway only maps shapes and refuses conflicts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, bad_request

ConstraintField = Literal["json_schema", "regex", "ebnf", "structural_tag"]  # the proto oneof's members
ANY_JSON_OBJECT = json.dumps({"type": "object"})


@dataclass(frozen=True)
class Constraint:
    """One output constraint: the SamplingParams field it fills, its text, and where it came from."""

    field: ConstraintField
    value: str
    param: str  # the request field that asked for it, named in errors


def requested_constraints(req: CompletionRequest | ChatCompletionRequest) -> list[Constraint]:
    """The constraints from `response_format`, `regex` and `ebnf` (tools are added by the caller)."""
    out: list[Constraint] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
        value = ANY_JSON_OBJECT if schema is None else json.dumps(schema)
        out.append(Constraint("json_schema", value, "response_format"))
    if req.regex is not None:
        out.append(Constraint("regex", req.regex, "regex"))
    if req.ebnf is not None:
        out.append(Constraint("ebnf", req.ebnf, "ebnf"))
    return out


def single_constraint(candidates: Sequence[Constraint]) -> Constraint | None:
    """The request's one constraint (None without any); a 400 naming the second when there are more."""
    if len(candidates) > 1:
        first, second = candidates[0], candidates[1]
        raise bad_request(
            f"'{second.param}' cannot be combined with '{first.param}': a request takes at most one "
            "output constraint (response_format json_object/json_schema, regex, ebnf, or tools)",
            second.param,
        )
    return candidates[0] if candidates else None
