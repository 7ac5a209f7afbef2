"""Per-request sampling parameters.

Field names and defaults follow SGLang's `SamplingParams`, so a JSON body written for SGLang's
`/generate` works here unchanged. The life of a params object:

    SamplingParams.from_dict(body["sampling_params"])   # keys and types checked
        .normalized()                                   # canonical forms (stop list, top_k, greedy)
        .verify(vocab_size)                             # ranges checked against the model

Construction (directly or via `from_dict`) checks types only; ranges depend on the model
(`vocab_size`) and are checked by `verify`. Every failure is a `ValueError` whose message starts
with the offending field's name, so the service can map it to a 400 as-is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import InvalidRequest

# Limits on request-controlled list sizes: stop strings are matched on the host after every
# token, so their number and length bound per-token host work.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 64
# SGLang's bound: penalties are additive logit offsets, beyond +-2 they swamp the model.
MAX_ABS_ADDITIVE_PENALTY = 2.0
# Below this a temperature is treated as greedy; dividing logits by it would overflow anyway.
GREEDY_TEMPERATURE_EPS = 1e-5
# Seeds travel as int64 tensors with -1 meaning "unseeded".
MAX_SEED = 2**63 - 1
# Constraint sources (a JSON schema, regex, grammar or structural tag) are compiled against the
# whole vocabulary; beyond this size compilation time and memory are the caller's denial of service.
MAX_CONSTRAINT_CHARS = 256 * 1024
CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop, for one request.

    Frozen: the scheduler derives per-step tensors from it, and a params object may be shared by
    the `n` sequences of one request. Use `dataclasses.replace` to derive a modified copy.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    # Constrained decoding (at most one; see shared/constrained): the output must match it.
    json_schema: str | None = None  # a JSON schema as JSON text
    regex: str | None = None
    ebnf: str | None = None  # GBNF-style, with a `root` rule
    structural_tag: str | None = None  # xgrammar structural tag as JSON text

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_type(field.name, getattr(self, field.name))
        # JSON `1` for a float field arrives as int; store floats so tensors get the right dtype.
        for name in _FLOAT_FIELDS:
            try:
                object.__setattr__(self, name, float(getattr(self, name)))
            except OverflowError:
                raise InvalidRequest(f"{name} is too large", param=name) from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Build from a JSON-like mapping; `None` gives the defaults.

        Raises `ValueError` for an unknown key (listing the valid ones) or a value of the wrong
        type. `bool` is not accepted where an int or float is expected; an int is accepted
        for a float. `null` is only accepted for the optional fields (stop, stop_token_ids, seed).
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InvalidRequest(f"sampling params must be an object, got {type(d).__name__}")
        unknown = sorted(k for k in d if k not in _FIELD_NAMES)
        if unknown:
            raise InvalidRequest(
                f"unknown sampling parameter {unknown[0]!r}; valid: {', '.join(_FIELD_NAMES)}",
                param=unknown[0],
            )
        return cls(**d)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: temperature ~0 or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def stop_strs(self) -> list[str]:
        """Stop strings as a list (empty when none)."""
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop]
        return list(self.stop)

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, source) of the output constraint, or None; kind is one of CONSTRAINT_KINDS."""
        for kind in CONSTRAINT_KINDS:
            source = getattr(self, kind)
            if source is not None:
                return kind, source
        return None

    def normalized(self) -> SamplingParams:
        """Canonical copy: stop is a list, top_k 0 becomes -1, near-zero temperature becomes 0.

        Idempotent. Does not check ranges; call `verify` for that.
        """
        return dataclasses.replace(
            self,
            stop=self.stop_strs,
            stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids is not None else None,
            top_k=-1 if self.top_k == 0 else self.top_k,
            temperature=0.0 if self.temperature < GREEDY_TEMPERATURE_EPS else self.temperature,
        )

    def verify(self, vocab_size: int) -> None:
        """Check every range; raise `ValueError` naming the first bad field.

        Accepts both raw and normalized params (top_k 0 counts as disabled).
        """
        # Written as `not (ok)` so that NaN fails every check.
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidRequest(f"{name} must be finite, got {value}", param=name)
        if not self.max_new_tokens >= 0:
            raise InvalidRequest(
                f"max_new_tokens must be >= 0, got {self.max_new_tokens}", param="max_new_tokens"
            )
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}",
                param="min_new_tokens",
            )
        if not self.temperature >= 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise InvalidRequest(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}", param="top_k")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_ADDITIVE_PENALTY <= value <= MAX_ABS_ADDITIVE_PENALTY:
                raise InvalidRequest(
                    f"{name} must be in [-{MAX_ABS_ADDITIVE_PENALTY}, "
                    f"{MAX_ABS_ADDITIVE_PENALTY}], got {value}",
                    param=name,
                )
        if not self.repetition_penalty > 0:
            raise InvalidRequest(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty"
            )
        if not self.n >= 1:
            raise InvalidRequest(f"n must be >= 1, got {self.n}", param="n")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be in [0, 2**63 - 1], got {self.seed}", param="seed")
        self._verify_stops(vocab_size)
        kinds = [k for k in CONSTRAINT_KINDS if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise InvalidRequest(
                f"{kinds[1]}: at most one constraint per request, got {' and '.join(kinds)}", param=kinds[1]
            )
        for kind in kinds:
            size = len(getattr(self, kind))
            if size > MAX_CONSTRAINT_CHARS:
                raise InvalidRequest(
                    f"{kind} is too large: {size} characters, the limit is {MAX_CONSTRAINT_CHARS}", param=kind
                )

    def _verify_stops(self, vocab_size: int) -> None:
        stops = self.stop_strs
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop"
            )
        for s in stops:
            if not s:
                raise InvalidRequest("stop strings must be non-empty", param="stop")
            if len(s) > MAX_STOP_STRING_LEN:
                raise InvalidRequest(
                    f"stop strings must be at most {MAX_STOP_STRING_LEN} characters, got one of {len(s)}",
                    param="stop",
                )
        ids = self.stop_token_ids or []
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
                param="stop_token_ids",
            )
        for token_id in ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest(
                    f"stop_token_ids entry {token_id} is outside the vocabulary [0, {vocab_size})",
                    param="stop_token_ids",
                )


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SamplingParams))
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def _is_int(value: object) -> bool:
    # bool subclasses int, but `"max_new_tokens": true` is a client bug, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(name: str, value: object) -> None:
    if name in _FLOAT_FIELDS:
        ok = isinstance(value, float) or _is_int(value)
        expected = "a number"
    elif name in _INT_FIELDS:
        ok = _is_int(value)
        expected = "an integer"
    elif name in _BOOL_FIELDS:
        ok = isinstance(value, bool)
        expected = "a boolean"
    elif name == "seed":
        ok = value is None or _is_int(value)
        expected = "an integer or null"
    elif name == "stop":
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value))
        )
        expected = "a string, a list of strings or null"
    elif name in CONSTRAINT_KINDS:
        ok = value is None or isinstance(value, str)
        expected = "a string or null"
    elif name == "stop_token_ids":
        ok = value is None or (isinstance(value, (list, tuple)) and all(_is_int(t) for t in value))
        expected = "a list of integers or null"
    else:
        raise AssertionError(f"no type rule for field {name}")
    if not ok:
        raise InvalidRequest(f"{name} must be {expected}, got {value!r} ({type(value).__name__})", param=name)
