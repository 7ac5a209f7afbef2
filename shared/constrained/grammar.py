"""Compiling constraints into xgrammar grammars: parsed at once, compiled off the loop, cached.

    check(kind, source)      parse now; a bad schema/regex/grammar is a ValueError with the
                             parser's message (the service answers 400), nothing is queued
    compile(kind, source)    a Future[CompiledGrammar] from a small thread pool; the same
                             (kind, source) shares one future (an LRU of `cache_size` entries)

Compiling walks the whole vocabulary (tens of ms for a large schema over a 128k vocabulary), so it
never runs on the scheduler's thread: the engine admits a constrained request once its future is
done, and refuses it if that takes longer than the configured time limit. The cache key is the
constraint's text; one `GrammarCompiler` serves one tokenizer, so the key is per tokenizer too.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from shared.constrained.schema import json_schema_source, structural_tag_source
from shared.errors import InvalidRequest

# xgrammar's C++ errors start with a log prefix ("[14:20:34] /project/cpp/x.cc:83: Check failed:
# (error.empty()) is false: "): the caller wants the parser's sentence, not our build paths.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def parser_message(exc: BaseException) -> str:
    """xgrammar's error text without its C++ log prefix, on one line."""
    text = str(exc).strip()
    text = _LOG_PREFIX.sub("", text)
    return " ".join(text.split())


# xgrammar's serialized grammar: expressions `[type, length, *data]`; the types read below.
_BYTES, _CLASS, _CLASS_STAR, _EMPTY, _RULE_REF, _SEQUENCE, _CHOICES, _TAG_DISPATCH, _REPEAT = range(9)
_KNOWN_SERIALIZATION = ("v18",)


def can_finish(grammar: xgr.Grammar) -> bool:
    """Whether some finite output derives from the root (rules that only ever recurse cannot
    finish: the textbook "productive symbols" fixed point). True when the grammar's serialized
    form is of a version this was not written for: the check only ever refuses what it reads."""
    data = json.loads(grammar.serialize_json())
    if data.get("__VERSION__") not in _KNOWN_SERIALIZATION:
        return True
    exprs = data["grammar_expr_data"]
    indptr = [*data["grammar_expr_indptr"], len(exprs)]  # expression i: exprs[indptr[i]:indptr[i + 1]]
    bodies = [rule[1] for rule in data["rules"]]
    finishes = [False] * len(bodies)

    def ends(expr_id: int) -> bool:
        kind, length, *rest = exprs[indptr[expr_id] : indptr[expr_id + 1]]
        args = rest[:length]
        if kind == _RULE_REF:
            return finishes[args[0]]
        if kind == _SEQUENCE:
            return all(ends(e) for e in args)
        if kind == _CHOICES:
            return any(ends(e) for e in args)
        if kind == _REPEAT:  # (rule, min, max)
            return args[1] == 0 or finishes[args[0]]
        return True  # terminals, the empty string, anything newer: assume it can end

    changed = True
    while changed:
        changed = False
        for rule_id, body in enumerate(bodies):
            if not finishes[rule_id] and ends(body):
                finishes[rule_id] = changed = True
    return finishes[data["root_rule_id"]]


class GrammarCompiler:
    """Compiles constraints for one tokenizer. Thread-safe; `close` stops the compile threads."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_ids: Iterable[int],
        *,
        threads: int = 2,
        cache_size: int = 256,
        json_any_whitespace: bool = False,
    ) -> None:
        # vocab_size is the model's logits width, which may exceed the tokenizer's vocabulary
        # (padded embeddings): the masks must cover every logit.
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self.vocab_size = vocab_size
        # xgrammar's own cache is off: ours deduplicates in-flight compiles and bounds entries.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._any_whitespace = json_any_whitespace
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def check(self, kind: str, source: str) -> None:
        """Parse without compiling; `ValueError("<kind> is invalid: <parser message>")` if bad."""
        with self._lock:
            if (kind, source) in self._cache:
                return  # parsed before (a failed compile is never cached)
        self._parse(kind, source)

    def compile(self, kind: str, source: str) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar, from the cache or a compile thread. Call `check` first."""
        key = (kind, source)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, kind, source)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        fut.add_done_callback(lambda f: self._forget_failure(key, f))
        return fut

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- helpers -------------------------------------------------------------------------------

    def _forget_failure(self, key: tuple[str, str], fut: Future[Any]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]

    def _compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        grammar = self._parse(kind, source)
        if not can_finish(grammar):
            # e.g. `root ::= "a" root`: every token is allowed, but no output ever completes
            raise InvalidRequest(
                f"{kind} admits no finite output: no derivation of its root ever ends", param=kind
            )
        compiled = self._compiler.compile_grammar(grammar)
        if not self._admits_a_first_token(compiled):
            # e.g. `root ::= root "a"`: it parses, but every output would be infinite
            raise InvalidRequest(
                f"{kind} admits no output: no token (not even the end) can come first", param=kind
            )
        return compiled

    def _admits_a_first_token(self, compiled: xgr.CompiledGrammar) -> bool:
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)  # [1, ceil(V / 32)] int32
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return bool(bits.any())

    def _parse(self, kind: str, source: str) -> xgr.Grammar:
        try:
            if kind == "json_schema":
                # Invalid JSON raises JSONDecodeError here: a clearer message than xgrammar's.
                source = json_schema_source(source)
                return xgr.Grammar.from_json_schema(source, any_whitespace=self._any_whitespace)
            if kind == "regex":
                return xgr.Grammar.from_regex(source)
            if kind == "ebnf":
                return xgr.Grammar.from_ebnf(source)
            if kind == "structural_tag":
                return xgr.Grammar.from_structural_tag(structural_tag_source(source, self._any_whitespace))
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"{kind} is not valid JSON: {e}", param=kind) from None
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequest(f"{kind} is invalid: {parser_message(e)}", param=kind) from None
        raise ValueError(f"unknown constraint kind {kind!r}")
