"""OpenAI request bodies as pydantic models, and the error the gateway answers with.

Models are strict (a string is not a number, a bool is not an integer) like OpenAI's API, and keep
unknown fields (`extra="allow"`) so that `check()` can name an OpenAI feature we do not support
yet (`functions`, `logit_bias`, ...) while truly unknown fields are ignored like OpenAI does.
Every field accepts `null` as "not given": some clients send explicit nulls for defaults.
Ranges here are OpenAI's; the engine's own limits (stop-list sizes, vocabulary) are checked by
the router and come back as INVALID_ARGUMENT, which the server maps to 400 as well.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from services.common.convert import MAX_N, MAX_TOP_LOGPROBS

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
# OpenAI's rule for function (and json_schema) names.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

ErrorType = Literal[
    "invalid_request_error", "rate_limit_error", "service_unavailable_error", "timeout_error", "server_error"
]


class OpenAIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON error body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    """A 400 `invalid_request_error` naming the offending parameter."""
    return OpenAIError(400, message, param=param)


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)  # NaN is no JSON


class StreamOptions(_Strict):
    include_usage: bool | None = None
    # vLLM's: usage in every chunk, not only in a last one. Not honoured: refused when true.
    continuous_usage_stats: bool | None = None


class JsonSchemaSpec(_Strict):
    """`response_format.json_schema`: `schema` missing means any JSON object."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not FUNCTION_NAME.fullmatch(value):
            raise ValueError("must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'")
        return value


class ResponseFormat(_Strict):
    """`response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


_SCALARS = frozenset({int, float, bool, type(None)})  # JSON values that hold no string


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value a string (or key) holds a lone UTF-16 surrogate (JSON's
    `"\\ud800"` parses into one): a path like `messages[0].content`, "" for the value itself,
    None if there is none. Such a string is not Unicode: nothing downstream can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            shown = str(key).encode("utf-8", "backslashreplace").decode()  # a bad key, printable
            at = f"{path}.{shown}" if path else shown
            if lone_surrogate_at(key, at) is not None:
                return at
            found = lone_surrogate_at(item, at)
            if found is not None:
                return found
    if isinstance(value, list):
        if _SCALARS.issuperset(map(type, value)):  # in C: a 1k-token prompt's ids cost ~10 us
            return None
        for i, item in enumerate(value):
            found = lone_surrogate_at(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `grammar`, `json_object`.

    Unknown keys (vLLM's whitespace and fallback options) are a 400: Tandem does not honour them
    and a client must not believe it does."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    json_: Any = Field(None, alias="json")  # a schema object or its JSON text, checked below
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _check_json(cls, value: Any) -> dict[str, Any] | str | None:
        return _schema_or_text(value)


def _schema_or_text(value: Any) -> dict[str, Any] | str | None:
    """vLLM's JSON-schema fields take an object or its JSON text (parsed in `constraints.py`);
    checked by hand because a union's error would name pydantic's branch tags."""
    if value is None or isinstance(value, dict | str):
        return value
    raise ValueError("must be a JSON schema object or its JSON text")


class _TextRequest(_Strict):
    """A request whose strings must be valid Unicode (a lone surrogate is a 400 naming where)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        at = lone_surrogate_at(data)
        if at is not None:  # the offending parameter travels as data (ctx), for the error's `param`
            raise PydanticCustomError(
                "lone_surrogate",
                "contains a lone UTF-16 surrogate, which is not valid Unicode",
                {"param": at},
            )
        return data


class SamplingFields(_TextRequest):
    """The sampling fields every generation endpoint takes (OpenAI's, then SGLang's extras), and the
    check of OpenAI fields the endpoint does not support."""

    stop: Any = None  # str | list[str], checked below (a union would name pydantic's branch tags)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Any int64, as vLLM takes it; a negative one is folded into the engine's [0, 2**63) below.
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # SGLang-style extras.
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    # vLLM's name for SGLang's `no_stop_trim`: `check()` folds it into that.
    include_stop_str_in_output: bool | None = None

    # Unsupported OpenAI fields -> predicate "this value means the default", which we accept.
    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value or None
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            if any(not s for s in value):
                raise ValueError("stop strings must be non-empty")
            return value
        raise ValueError("must be a string or a list of strings")

    @field_validator("seed")
    @classmethod
    def _fold_seed(cls, value: int | None) -> int | None:
        return None if value is None else value % 2**63

    @property
    def stop_list(self) -> list[str]:
        """Stop strings as a list (empty when none)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_unsupported(self) -> None:
        """A 400 naming the first field of `UNSUPPORTED_FIELDS` given with a value we do not honour."""
        for name, is_default in self.UNSUPPORTED_FIELDS.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and not is_default(value):
                raise bad_request(f"'{name}' is not supported by this server yet", name)


class _SamplingRequest(SamplingFields):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # Output constraints (at most one; see `constraints.py`). `regex`, `ebnf` and `json_schema`
    # (a schema object or its JSON text) are SGLang's.
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: Any = None
    # vLLM's spellings of the same constraints (`constraints.py` maps them).
    guided_json: Any = None  # a JSON schema, or its JSON text
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("guided_json", "json_schema")
    @classmethod
    def _check_guided_json(cls, value: Any) -> dict[str, Any] | str | None:
        return _schema_or_text(value)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Cross-field and unsupported-feature checks; raises a 400 `OpenAIError`."""
        self.check_unsupported()
        keep = self.include_stop_str_in_output
        if keep is not None:
            if self.no_stop_trim is not None and self.no_stop_trim != keep:
                raise bad_request(
                    "'include_stop_str_in_output' and 'no_stop_trim' are one option and disagree here",
                    "include_stop_str_in_output",
                )
            self.no_stop_trim = keep
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise bad_request(
                "'response_format' of type 'json_schema' needs 'json_schema': {name, schema}",
                "response_format.json_schema",
            )
        for name in ("regex", "ebnf", "guided_regex", "guided_grammar"):
            if getattr(self, name) == "":
                raise bad_request(f"'{name}' must not be empty", name)
        so = self.structured_outputs
        for name in ("regex", "grammar"):
            if so is not None and getattr(so, name) == "":
                param = f"structured_outputs.{name}"
                raise bad_request(f"'{param}' must not be empty", param)
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            param = "stream_options.continuous_usage_stats"
            message = f"'{param}' is not supported by this server yet (usage comes in the last chunk)"
            raise bad_request(message, param)
        max_tokens = self.max_new_tokens()
        if self.min_tokens is not None and max_tokens is not None and self.min_tokens > max_tokens:
            raise bad_request(
                f"'min_tokens' ({self.min_tokens}) must not exceed the maximum tokens ({max_tokens})",
                "min_tokens",
            )

    def max_new_tokens(self) -> int | None:
        """The user's token limit, None when not given."""
        raise NotImplementedError


def _is_empty(value: Any) -> bool:
    return value in ([], {}, "")


def _never(value: Any) -> bool:
    return False


# vLLM's and SGLang's request options (of their OpenAI-compatible endpoints) that Tandem does not
# honour, each with the predicate "this value is the peer's default", which changes nothing and is
# accepted: any other value is a 400 naming the field, never silently ignored. (Those it does
# honour are fields above: top_k, min_p, min_tokens, repetition_penalty, ignore_eos,
# stop_token_ids, skip_special_tokens, spaces_between_special_tokens, no_stop_trim /
# include_stop_str_in_output, regex / ebnf / json_schema, guided_*, structured_outputs,
# chat_template_kwargs, add_special_tokens on completions.)
_PEER_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "guided_decoding_backend": lambda v: v in ("xgrammar", "auto"),  # xgrammar is what runs
    "guided_whitespace_pattern": _never,
    "use_beam_search": lambda v: v is False,
    "length_penalty": lambda v: v == 1,
    "bad_words": _is_empty,
    "allowed_token_ids": _never,
    "prompt_logprobs": _never,
    "truncate_prompt_tokens": _never,
    "logits_processors": _is_empty,
    "custom_logit_processor": _never,
    "return_tokens_as_token_ids": lambda v: v is False,
    "return_hidden_states": lambda v: v is False,
    "priority": lambda v: v == 0,
    "lora_path": _never,
    "mm_processor_kwargs": _is_empty,
    "vllm_xargs": _is_empty,
    "kv_transfer_params": _is_empty,
    "cache_salt": _never,
    "request_id": _never,  # send X-Request-Id instead
    "rid": _never,
    "session_params": _never,
    "return_token_ids": lambda v: v is False,
    "prompt_embeds": _never,
    # SGLang's PD hand-off fields: Tandem's router runs its own (bootstrap servers are SGLang's).
    "bootstrap_host": _never,
    "bootstrap_port": _never,
    "bootstrap_room": _never,
}


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked below
    max_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    add_special_tokens: bool | None = None  # vLLM's; for text prompts, default true
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # only n (the default) is honoured: `check`

    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "suffix": _is_empty,
        "logit_bias": _is_empty,
        **_PEER_UNSUPPORTED,
    }

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(
                "must be a string, a list of strings, a list of token ids or a list of those lists"
            )
        if all(isinstance(p, str) for p in value):
            return value
        if are_token_prompts(value):
            return value
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids (0 <= id < 2**31) "
            "or a list of such lists"
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a token-id list."""
        return prompt_list(self.prompt)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("'best_of' other than n is not supported by this server yet", "best_of")
        if self.echo and self.logprobs is not None:
            # Echo with logprobs asks for the prompt's logprobs, which the router does not return.
            raise bad_request("'echo' together with 'logprobs' is not supported by this server yet", "echo")


def _are_token_ids(values: list[Any]) -> bool:
    """A non-empty list of ints (not bools) in [0, 2**31), checked by C builtins (a 1k-token
    prompt is validated on every request)."""
    if not values or set(map(type, values)) != {int}:
        return False
    return min(values) >= 0 and max(values) <= INT32_MAX


def are_token_prompts(value: list[Any]) -> bool:
    """A non-empty list of token ids, or a list of such lists (one prompt each)."""
    if _are_token_ids(value):
        return True
    return all(isinstance(p, list) and _are_token_ids(p) for p in value)


def prompt_list(value: str | list[Any]) -> list[str | list[int]]:
    """A checked prompt field (a string, strings, token ids or token-id lists) as one entry per
    prompt: a string or a token-id list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):  # checked: all ids, or all strings or lists
        return [list(value)]
    return list(value)


class TextPart(_Strict):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    """One entry of an assistant message's `tool_calls`: a call the model made earlier."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages only: the call this answers

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value == "function":
            raise ValueError("role 'function' is deprecated and not supported; use 'tool'")
        if value not in ("system", "user", "assistant", "developer", "tool"):
            raise ValueError(
                f"must be one of 'system', 'user', 'assistant', 'developer', 'tool', got '{value}'"
            )
        return value

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for part in value if isinstance(value, list) else []:
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"content parts of type '{part.type}' are not supported; only 'text' parts are"
                )
        return value

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, "" for none)."""
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content)
        return self.content or ""

    def check(self, i: int) -> None:
        """Role-dependent rules; raises a 400 naming `messages[i]...`."""
        if self.tool_calls is not None and self.role != "assistant":
            raise bad_request(
                f"message {i} has 'tool_calls', which only assistant messages carry",
                f"messages[{i}].tool_calls",
            )
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise bad_request(f"message {i} has no content", f"messages[{i}].content")
        if self.role == "tool" and not self.tool_call_id:
            raise bad_request(
                f"message {i} has role 'tool' but no 'tool_call_id'", f"messages[{i}].tool_call_id"
            )
        for j, call in enumerate(self.tool_calls or []):
            try:
                json.loads(call.function.arguments)
            except ValueError:
                raise bad_request(
                    f"the arguments of tool call {j} in message {i} are not valid JSON",
                    f"messages[{i}].tool_calls[{j}].function.arguments",
                ) from None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (HF conventions: arguments as a parsed object)."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json.loads(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                out["name"] = self.name
        return out


class FunctionDefinition(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not FUNCTION_NAME.fullmatch(value):
            raise ValueError(f"'{value}' must be 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'")
        return value

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Tool calls are parsed as `{"name": ..., "arguments": {...}}`: the arguments must be an object.
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(f"must be a JSON schema of type 'object', got type {value.get('type')!r}")
        return value


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}, checked
    # together with `tools` in `tool_calls.request` (a union would name pydantic's branch tags).
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Extra variables of the chat template (vLLM's; e.g. Qwen3's `enable_thinking`).
    chat_template_kwargs: dict[str, Any] | None = None
    # What it changes depends on the template (`reasoning.template_kwargs`).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "functions": _is_empty,
        "function_call": lambda v: v in ("none", "auto"),
        "logit_bias": _is_empty,
        "audio": lambda v: False,
        "modalities": lambda v: v == ["text"],
        "prediction": lambda v: False,
        "web_search_options": lambda v: False,
        # As /v1/responses answers them: one tier and one verbosity here.
        "service_tier": lambda v: v in ("auto", "default"),
        "verbosity": lambda v: v == "medium",
        # Nothing is stored: a stored chat completion could not be read back (no GET of them).
        "store": lambda v: v is False,
        **_PEER_UNSUPPORTED,
        # vLLM's and SGLang's chat options, likewise.
        "best_of": lambda v: v == 1,
        "include_reasoning": lambda v: v is True,
        "echo": lambda v: v is False,
        "add_generation_prompt": lambda v: v is True,
        "continue_final_message": lambda v: v is False,
        "add_special_tokens": lambda v: v is False,
        "chat_template": _never,
        "documents": _is_empty,
        "separate_reasoning": lambda v: v is True,
        "stream_reasoning": lambda v: v is True,
    }

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must hold at least one message")
        return value

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        for i, message in enumerate(self.messages):
            message.check(i)

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them: string content, `developer` as `system`."""
        return [m.template_dict() for m in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools` as chat templates expect them (OpenAI's shape, unset fields left out), None without."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class TokenizeRequest(_TextRequest):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` rendered by the template."""

    model: str | None = None  # when given, it must be the served model
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool | None = None  # chat only; default true
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    tools: list[Tool] | None = None  # chat only
    chat_template_kwargs: dict[str, Any] | None = None  # chat only
    return_token_strs: bool | None = None

    def check(self) -> None:
        """Exactly one of `prompt` and `messages`; raises a 400 `OpenAIError`."""
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of 'prompt' and 'messages'", "prompt")
        if self.messages is not None:
            if not self.messages:
                raise bad_request("'messages' must hold at least one message", "messages")
            for i, message in enumerate(self.messages):
                message.check(i)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


class DetokenizeRequest(_TextRequest):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: str | None = None
    tokens: list[TokenId]
