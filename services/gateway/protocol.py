"""OpenAI request bodies as pydantic models, and the error the gateway answers with.

Models are strict (a string is not a number, a bool is not an integer) like OpenAI's API, and keep
unknown fields (`extra="allow"`) so that `check()` can name an OpenAI feature we do not support
yet (`tools`, `response_format`, ...) while truly unknown fields are ignored like OpenAI does.
Every field accepts `null` as "not given": some clients send explicit nulls for defaults.
Ranges here are OpenAI's; the engine's own limits (stop-list sizes, vocabulary) are checked by
the router and come back as INVALID_ARGUMENT, which the server maps to 400 as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
MAX_TOP_LOGPROBS = 20  # the wire contract's bound on top_logprobs_num
MAX_N = 128

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
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then SGLang's extras)."""

    model: str
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None  # str | list[str], checked below (a union would name pydantic's branch tags)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None  # accepted and ignored
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

    @property
    def stop_list(self) -> list[str]:
        """Stop strings as a list (empty when none)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check(self) -> None:
        """Cross-field and unsupported-feature checks; raises a 400 `OpenAIError`."""
        for name, is_default in self.UNSUPPORTED_FIELDS.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and not is_default(value):
                raise bad_request(f"'{name}' is not supported by this server yet", name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
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


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked below
    max_tokens: int | None = Field(None, ge=0, le=UINT32_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None

    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "suffix": _is_empty,
        "logit_bias": _is_empty,
        "best_of": lambda v: v == 1,
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
        if all(_is_token_id(t) for t in value):
            return value
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
            return value
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids (0 <= id < 2**31) "
            "or a list of such lists"
        )

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a token-id list."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        super().check()
        best_of = (self.model_extra or {}).get("best_of")
        if best_of is not None and best_of != (self.n or 1):
            raise bad_request("'best_of' other than n is not supported by this server yet", "best_of")
        if self.echo and self.logprobs is not None:
            # Echo with logprobs asks for the prompt's logprobs, which the router does not return.
            raise bad_request("'echo' together with 'logprobs' is not supported by this server yet", "echo")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT32_MAX


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value in ("tool", "function"):
            raise ValueError(f"role '{value}' is not supported by this server yet")
        if value not in ("system", "user", "assistant", "developer"):
            raise ValueError(f"must be one of 'system', 'user', 'assistant', 'developer', got '{value}'")
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
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    UNSUPPORTED_FIELDS: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "tools": _is_empty,
        "tool_choice": lambda v: v in ("none", "auto"),
        "functions": _is_empty,
        "function_call": lambda v: v in ("none", "auto"),
        "response_format": lambda v: v == {"type": "text"},
        "logit_bias": _is_empty,
        "audio": lambda v: False,
        "modalities": lambda v: v == ["text"],
        "prediction": lambda v: False,
        "web_search_options": lambda v: False,
        "reasoning_effort": lambda v: False,
    }

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("must hold at least one message")
        for i, message in enumerate(value):
            if message.content is None:
                raise ValueError(f"message {i} has no content")
        return value

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them: string content, `developer` as `system`."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]
