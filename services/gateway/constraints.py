"""Output constraints: the one a request asks for, as SamplingParams' `constraint` oneof.

A request carries at most one: `response_format` (json_object / json_schema), SGLang's `regex`,
`ebnf` or `json_schema`, vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` or
`structured_outputs.{json, regex, choice, grammar, json_object}`, or the structural tag its
`tools` imply (built in `tool_calls.formats`). A choice becomes a regex of its alternatives, each
matched literally. The engine compiles and enforces them with xgrammar and answers
INVALID_ARGUMENT (a 400 here, naming the request field) for a schema, regex or grammar it cannot
compile; the gateway only maps shapes and refuses conflicts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from services.common.errors import param_of
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request

ConstraintField = Literal["json_schema", "regex", "ebnf", "structural_tag"]  # the proto oneof's members
ANY_JSON_OBJECT = json.dumps({"type": "object"})
# Characters with a meaning in xgrammar's (ECMAScript-style) regex syntax, escaped in choices.
_REGEX_META = frozenset("\\^$.|?*+()[]{}/-")


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
    if req.json_schema is not None:
        out.append(Constraint("json_schema", _schema_text(req.json_schema, "json_schema"), "json_schema"))
    out += _vllm_constraints(req)
    return out


def _vllm_constraints(req: CompletionRequest | ChatCompletionRequest) -> list[Constraint]:
    """vLLM's `guided_*` fields and `structured_outputs`, as the same constraints."""
    out: list[Constraint] = []
    if req.guided_json is not None:
        out.append(Constraint("json_schema", _schema_text(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        out.append(Constraint("regex", req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        out.append(Constraint("regex", choice_regex(req.guided_choice, "guided_choice"), "guided_choice"))
    if req.guided_grammar is not None:
        out.append(Constraint("ebnf", req.guided_grammar, "guided_grammar"))
    so = req.structured_outputs
    if so is None:
        return out
    if so.json_ is not None:
        param = "structured_outputs.json"
        out.append(Constraint("json_schema", _schema_text(so.json_, param), param))
    if so.regex is not None:
        out.append(Constraint("regex", so.regex, "structured_outputs.regex"))
    if so.choice is not None:
        param = "structured_outputs.choice"
        out.append(Constraint("regex", choice_regex(so.choice, param), param))
    if so.grammar is not None:
        out.append(Constraint("ebnf", so.grammar, "structured_outputs.grammar"))
    if so.json_object:
        out.append(Constraint("json_schema", ANY_JSON_OBJECT, "structured_outputs.json_object"))
    return out


def _schema_text(schema: dict[str, object] | str, param: str) -> str:
    """A JSON schema given as an object or as its JSON text (vLLM takes both), as JSON text."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        parsed = json.loads(schema)
    except ValueError:
        raise bad_request(f"'{param}' is neither a JSON schema object nor its JSON text", param) from None
    if not isinstance(parsed, dict):
        raise bad_request(f"'{param}' must be a JSON schema object", param)
    return json.dumps(parsed)


def choice_regex(choices: Sequence[str], param: str) -> str:
    """A regex matching exactly one of `choices`, each literally (metacharacters and control
    characters escaped): vLLM's `guided_choice`."""
    if not choices:
        raise bad_request(f"'{param}' must hold at least one choice", param)
    if any(not c for c in choices):
        raise bad_request(f"'{param}' must not hold an empty choice", param)
    return "(" + "|".join(_literal(c) for c in choices) + ")"


def _literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in _REGEX_META:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def rejected_constraint(exc: grpc.aio.AioRpcError, constraint: Constraint | None) -> OpenAIError | None:
    """The engine's rejection of `constraint` (INVALID_ARGUMENT naming its proto field, e.g.
    `regex`) as a 400 naming the request field that asked for it (`guided_regex`,
    `structured_outputs.json`); None for any other error."""
    if constraint is None or exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return None
    if param_of(exc) != constraint.field:
        return None
    return OpenAIError(400, exc.details() or "invalid constraint", param=constraint.param)


def single_constraint(candidates: Sequence[Constraint]) -> Constraint | None:
    """The request's one constraint (None without any); a 400 naming the second when there are more."""
    if len(candidates) > 1:
        first, second = candidates[0], candidates[1]
        raise bad_request(
            f"'{second.param}' cannot be combined with '{first.param}': a request takes at most one "
            "output constraint (response_format json_object/json_schema, regex, ebnf, json_schema, tools, "
            "or vLLM's guided_* / structured_outputs)",
            second.param,
        )
    return candidates[0] if candidates else None
