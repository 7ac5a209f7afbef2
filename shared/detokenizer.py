"""Output text for one sequence: incremental detokenization and stop strings.

Per generated token the engine needs the new text to stream, and must not stream text that
may turn out to be (part of) a stop string:

- `IncrementalDetokenizer` turns token ids into text deltas, decoding only a short window of
  recent ids per step and holding back a tail that ends in an incomplete UTF-8 sequence.
- `StopStringMatcher` finds complete stop strings (`find`) and how much of the decoded text
  is safe to stream (`safe_len`). The engine streams `text[:safe_len(text)]` each step; when
  `find` reports a match it cuts the text at `match.start` (or `match.end` with
  `no_stop_trim`) and finishes. Because `safe_len` holds back every suffix that could still
  grow into a stop string, nothing past `match.start` has been streamed by then.

Window decoding (vLLM's prefix_offset / read_offset scheme):

    ids:   ... | prefix_offset ...... | read_offset ...... | len(ids)
                 context (already       new ids (not yet
                 emitted)               emitted)

    prefix_text = decode(ids[prefix_offset:read_offset])
    new_text    = decode(ids[prefix_offset:])
    delta       = new_text[len(prefix_text):]   # emitted unless it ends in U+FFFD

Decoding the context together with the new ids keeps tokenizer-specific joins (a leading
space, a multi-byte character split over tokens) identical to decoding the whole history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from shared.errors import InvalidRequest

_REPLACEMENT_CHAR = "\ufffd"
# Prompt ids decoded as context before the first output token (matters for tokenizers whose
# decoders treat the first token of a string specially, such as SentencePiece's leading space).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Streams the text of a growing token sequence, one delta per `add`.

    Not thread-safe; one instance per output sequence. `spaces_between_special_tokens` is
    passed through to `decode` (slow tokenizers honour it; fast ones ignore it). `prompt_ids`,
    if given, supply decoding context for the first output tokens and are never emitted.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._decode_ids = decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)
        self._emitted: list[str] = []
        self._pending = ""  # decoded but held back (ends in an incomplete character)

    @property
    def output_ids(self) -> list[int]:
        """Output token ids added so far (without prompt context)."""
        return self._ids[self._num_context :]

    @property
    def output_text(self) -> str:
        """Text emitted so far (the concatenation of all returned deltas)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def text(self) -> str:
        """Emitted text plus the held-back tail (which may end in U+FFFD)."""
        return self.output_text + self._pending

    def add(self, token_ids: Sequence[int]) -> str:
        """Append token ids; return the newly completed text (possibly empty)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Equal lengths: the new ids decoded to nothing (e.g. skipped special tokens).
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            self._pending = new_text[len(prefix_text) :]
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pending = ""
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """Emit the held-back tail as is (at the end of generation); return it."""
        delta = self._pending
        if delta:
            self._emitted.append(delta)
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pending = ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids) if ids else ""


def decoder(
    tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> Callable[[list[int]], str]:
    """`tokenizer.decode` with these options, as a function of the ids.

    A fast tokenizer's `decode` is its Rust backend's plus Python bookkeeping (argument
    conversion, dispatch, an optional clean-up pass) that costs several times the decode of a
    few ids; the engine decodes two short windows per token of every request. Where that wrapper
    adds nothing to the backend's result (the stock `decode`, no clean-up pass that applies), the
    backend's decode is called directly: the same text, without the bookkeeping.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    stock = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
    )
    if stock and isinstance(backend, tokenizers.Tokenizer) and not _cleans_up(tokenizer, backend):
        return partial(backend.decode, skip_special_tokens=skip_special_tokens)

    def decode(ids: list[int]) -> str:
        text = tokenizer.decode(
            ids,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
        )
        assert isinstance(text, str)
        return text

    return decode


def _cleans_up(tokenizer: PreTrainedTokenizerBase, backend: tokenizers.Tokenizer) -> bool:
    """Whether `tokenizer.decode` runs its clean-up pass over the backend's text. Transformers
    5 skips it for BPE models unless forced; earlier versions (without that flag) run it."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
    if hasattr(tokenizer, force) and type(backend.model).__name__ == "BPE":
        return bool(getattr(tokenizer, force))
    return True


class StopMatch(NamedTuple):
    """A complete stop string found in the output text: text[start:end] == stop."""

    start: int
    stop: str

    @property
    def end(self) -> int:
        return self.start + len(self.stop)


class StopStringMatcher:
    """Finds stop strings in a growing text, scanning only what could have changed."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise InvalidRequest("stop strings must be non-empty", param="stop")
        self.stops = tuple(stops)
        self._max_len = max((len(s) for s in self.stops), default=0)
        # Every proper prefix of every stop string: a text ending in one of them may be
        # about to complete a stop string.
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}

    def find(self, text: str, checked_len: int = 0) -> StopMatch | None:
        """The stop string that begins earliest in `text`, among matches ending after
        `checked_len`: `text[:checked_len]` was scanned before (or may not stop the text, a
        request short of its `min_new_tokens`), so each stop is searched from `len(stop) - 1`
        characters before it on, and a match wholly inside it is never reported.

        On a tie (several stops begin at the same index) the shortest wins: it completed first.
        """
        best: StopMatch | None = None
        for stop in self.stops:
            start = text.find(stop, max(0, checked_len - len(stop) + 1))
            if start == -1:
                continue
            match = StopMatch(start, stop)
            if best is None or (match.start, match.end) < (best.start, best.end):
                best = match
        return best

    def safe_len(self, text: str) -> int:
        """Length of the prefix of `text` that cannot be part of a future stop string: all of
        it, minus the longest suffix that is a proper prefix of some stop string."""
        for size in range(min(self._max_len - 1, len(text)), 0, -1):
            if text[-size:] in self._prefixes:
                return len(text) - size
        return len(text)
