"""The body of `POST /v1/responses` as pydantic models, and its checks.

What is taken (the subset the OpenAI Agents SDK uses):

    input               a string (one user message) or a list of items: `message` (role user,
                        system, developer or assistant; content a string or `input_text` /
                        `output_text` parts), `function_call`, `function_call_output`, `reasoning`
                        (accepted, not rendered: chat templates drop earlier turns' reasoning)
    tools, tool_choice  function tools in the Responses' flat shape; "none" | "auto" | "required" |
                        {"type": "function", "name"}
    text.format         text | json_object | json_schema (the chat path's `response_format`)
    reasoning.effort    the chat path's `reasoning_effort`
    and                 instructions, max_output_tokens, temperature, top_p, parallel_tool_calls,
                        stream, store, previous_response_id, metadata, user, the sampling extras
                        of `SamplingFields`, chat_template_kwargs

Every other field OpenAI defines is a 400 naming it unless it holds its default (`UNSUPPORTED_FIELDS`);
fields outside OpenAI's spec are ignored, as on the other endpoints. Items and tools are parsed by
hand (`input_items`, `function_tools`) so a 400 names where they sit (`input[2].call_id`,
`tools[0].type`) rather than pydantic's union branches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator

from services.gateway.errors import validation_error
from services.gateway.protocol import (
    UINT32_MAX,
    FunctionDefinition,
    JsonSchemaSpec,
    SamplingFields,
    _Strict,
    bad_request,
)
from services.gateway.reasoning import REASONING_EFFORTS

M = TypeVar("M", bound=BaseModel)
_TEXT_PARTS = ("input_text", "output_text")
# OpenAI's bounds on `metadata`: it is echoed and kept with a stored response.
_METADATA_KEYS, _METADATA_KEY_CHARS, _METADATA_VALUE_CHARS = 16, 64, 512


def parse(model: type[M], raw: Any, at: str) -> M:
    """`raw` validated as `model`; a 400 naming the field under `at` (e.g. `input[2]`) if it is not."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc.errors(), at) from None


def _text_content(value: Any) -> str | list[dict[str, Any]]:
    """A string, or text parts (`input_text` / `output_text`) as the chat path's text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(p, dict) for p in value):
        raise ValueError("must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(value):
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise ValueError(
                f"content part {j} has type {kind!r}; this server takes only text parts "
                "('input_text', 'output_text')"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {j} has no 'text' string")
        parts.append({"type": "text", "text": part["text"]})
    return parts


class _Item(_Strict):
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


# Text in the chat path's shape: a string or its text parts.
TextContent = Annotated[Any, AfterValidator(_text_content)]


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: TextContent


class FunctionCallItem(_Item):
    """A function call the model made earlier."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _check_arguments(cls, value: str) -> str:
        try:
            json.loads(value)
        except ValueError:
            raise ValueError("must be JSON text") from None
        return value


class FunctionCallOutputItem(_Item):
    """The result of a function call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str
    output: TextContent


class ReasoningItem(_Item):
    """Reasoning from an earlier turn: accepted (clients send their history back) and not rendered."""

    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


def parse_item(raw: Any, at: str) -> InputItem:
    """One input item (a message may leave out its `type`); a 400 naming `at...` if it is not one."""
    if not isinstance(raw, dict):
        raise bad_request(f"'{at}' must be an object", at)
    kind = raw.get("type", "message")
    model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise bad_request(
            f"input items of type {kind!r} are not supported by this server; it takes "
            f"{', '.join(repr(t) for t in _ITEM_TYPES)}",
            f"{at}.type",
        )
    return parse(model, raw, at)


class FunctionToolSpec(FunctionDefinition):
    """A function tool in the Responses' flat shape (`name`, `parameters`, ... beside `type`)."""

    type: Literal["function"]

    def chat_tool(self) -> dict[str, Any]:
        """The chat path's shape, `{"type": "function", "function": {...}}`."""
        fields = ("name", "description", "parameters", "strict")
        function = {k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        return {"type": "function", "function": function}

    def echo(self) -> dict[str, Any]:
        """The tool as the response lists it."""
        return {"type": "function", **self.chat_tool()["function"]}


class TextFormat(_Strict):
    """`text.format`; a json_schema's `name`, `schema`, `strict`, `description` sit beside `type`."""

    type: Literal["text", "json_object", "json_schema"]


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: str | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # OpenAI's older name

    @field_validator("effort")
    @classmethod
    def _check_effort(cls, value: str | None) -> str | None:
        if value is not None and value not in REASONING_EFFORTS:
            raise ValueError(f"must be one of {', '.join(repr(e) for e in REASONING_EFFORTS)}")
        return value


class ResponsesRequest(SamplingFields):
    """POST /v1/responses."""

    model: str
    input: Any = None  # str | list of input items, parsed by `input_items`
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    tools: list[Any] | None = None  # parsed by `function_tools`
    tool_choice: Any = None  # parsed by `chat_tool_choice`
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None  # accepted and ignored
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's, as on chat completions

    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "background": lambda v: v is False,
        "conversation": lambda v: False,
        "include": lambda v: v == [],
        "max_tool_calls": lambda v: False,
        "prompt": lambda v: False,
        "prompt_cache_retention": lambda v: v == "in_memory",
        "prompt_cache_options": lambda v: False,
        "service_tier": lambda v: v in ("auto", "default"),
        "top_logprobs": lambda v: v == 0,
        "truncation": lambda v: v == "disabled",  # a prompt too long is a 400, never cut
        "context_management": lambda v: v == [],
        "moderation": lambda v: False,
        "background_options": lambda v: False,
        "access_programs": lambda v: False,
        "image": lambda v: False,
    }

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> str | list[Any] | None:
        if value is None or isinstance(value, str | list):
            return value
        raise ValueError("must be a string or a list of input items")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > _METADATA_KEYS:
            raise ValueError(f"may hold at most {_METADATA_KEYS} keys")
        if any(len(k) > _METADATA_KEY_CHARS or len(v) > _METADATA_VALUE_CHARS for k, v in value.items()):
            raise ValueError(
                f"keys may have at most {_METADATA_KEY_CHARS} characters, values {_METADATA_VALUE_CHARS}"
            )
        return value

    def check(self) -> None:
        """Unsupported fields and values; raises a 400 naming the field."""
        self.check_unsupported()
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise bad_request("'text.verbosity' other than 'medium' is not supported", "text.verbosity")
        reasoning = self.reasoning
        for name in ("summary", "generate_summary"):
            if reasoning is not None and getattr(reasoning, name) not in (None, "auto"):
                raise bad_request(
                    f"'reasoning.{name}' is not supported: reasoning is returned as it was written "
                    "(a reasoning item's content), never summarized",
                    f"reasoning.{name}",
                )

    def input_items(self) -> list[InputItem]:
        """`input` as items: a string is one user message."""
        if self.input is None:
            return []
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return [parse_item(raw, f"input[{i}]") for i, raw in enumerate(self.input)]

    def function_tools(self) -> list[FunctionToolSpec]:
        """`tools`, each a function tool; other kinds (web_search, file_search, ...) are 400s."""
        out = []
        for i, raw in enumerate(self.tools or []):
            kind = raw.get("type") if isinstance(raw, dict) else None
            if kind != "function":
                raise bad_request(
                    f"tools of type {kind!r} are not supported by this server; only 'function' tools",
                    f"tools[{i}].type",
                )
            out.append(parse(FunctionToolSpec, raw, f"tools[{i}]"))
        return out

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        """`tool_choice` in the chat path's shape (a named function nests under `function`)."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto", "required"):
            return choice
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind == "function":
            name = choice.get("name")
            if not isinstance(name, str):
                raise bad_request("'tool_choice.name' must be a string", "tool_choice.name")
            return {"type": "function", "function": {"name": name}}
        if isinstance(kind, str):
            raise bad_request(f"'tool_choice' of type {kind!r} is not supported", "tool_choice.type")
        raise bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
            "tool_choice",
        )

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` as the chat path's `response_format` (None for text)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "json_object"}
        spec = parse(JsonSchemaSpec, fmt.model_extra or {}, "text.format")
        return {"type": "json_schema", "json_schema": spec.model_dump(by_alias=True, exclude_none=True)}
