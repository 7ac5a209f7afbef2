"""Size limits of the router's public API, checked before tokenizing, routing or any worker call.

A `Generate` request's `text` feeds the tokenizer (text-only requests) and the cache-aware
policy's radix tree (all requests), both linear in its length and neither interruptible, so
it is capped like the gateway caps prompts: by default 16 characters per context token (no
tokenizer averages near that on real text), at least 64 Ki, and 4 Mi while the context is
unknown. `token_ids` may not exceed the context (1 Mi while unknown). Stop lists and
constraint text are held to the engine's own bounds (`shared.sampling.params`) here, where it
costs nothing, instead of after a worker was picked. Every violation is an `InvalidRequest`
(INVALID_ARGUMENT, a 400 at the gateway) naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.protos.tandem.common.v1 import common_pb2
from shared.errors import InvalidRequest
from shared.sampling.params import (
    CONSTRAINT_KINDS,
    MAX_CONSTRAINT_CHARS,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

CHARS_PER_CONTEXT_TOKEN = 16
MIN_AUTO_PROMPT_CHARS = 64 * 1024
UNKNOWN_CONTEXT_PROMPT_CHARS = 4 * 1024 * 1024
UNKNOWN_CONTEXT_PROMPT_TOKENS = 1024 * 1024


@dataclass(frozen=True)
class PromptLimits:
    """The router's bounds on one request; 0 means derived from the served context."""

    max_prompt_chars: int = 0
    max_prompt_tokens: int = 0

    def chars(self, context: int) -> int:
        if self.max_prompt_chars:
            return self.max_prompt_chars
        if not context:
            return UNKNOWN_CONTEXT_PROMPT_CHARS
        return max(MIN_AUTO_PROMPT_CHARS, CHARS_PER_CONTEXT_TOKEN * context)

    def tokens(self, context: int) -> int:
        return self.max_prompt_tokens or context or UNKNOWN_CONTEXT_PROMPT_TOKENS


def check_text(text: str, limits: PromptLimits, context: int) -> None:
    """`text` within the character cap, or an InvalidRequest naming it."""
    cap = limits.chars(context)
    if len(text) > cap:
        raise InvalidRequest(
            f"text has {len(text)} characters; this router accepts at most {cap}", param="text"
        )


def check_prompt(token_ids_len: int, text: str, limits: PromptLimits, context: int) -> None:
    """A Generate prompt (`token_ids` and/or `text`) within the caps."""
    check_text(text, limits, context)
    cap = limits.tokens(context)
    if token_ids_len > cap:
        raise InvalidRequest(
            f"token_ids holds {token_ids_len} tokens; this router accepts at most {cap}", param="token_ids"
        )


def check_sampling(params: common_pb2.SamplingParams) -> None:
    """Stop lists and constraint text within the engine's bounds."""
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(
            f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}", param="stop"
        )
    longest = max((len(s) for s in params.stop), default=0)
    if longest > MAX_STOP_STRING_LEN:
        raise InvalidRequest(
            f"stop strings must be at most {MAX_STOP_STRING_LEN} characters, got one of {longest}",
            param="stop",
        )
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(
            f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(params.stop_token_ids)}",
            param="stop_token_ids",
        )
    for kind in CONSTRAINT_KINDS:
        size = len(getattr(params, kind))
        if size > MAX_CONSTRAINT_CHARS:
            raise InvalidRequest(
                f"{kind} is too large: {size} characters, the limit is {MAX_CONSTRAINT_CHARS}", param=kind
            )
