"""Turning a validated prompt and its sampling parameters into the engine's requests (`Req`).

`RequestBuilder` owns the checks every entry point shares (unified adds, prefill adds and decode
reservations): sampling parameters against the vocabulary, prompt ids and length against the
context, the constraint's grammar (checked now, compiled on the pool), and one `Req` per sample
(sample i of a seeded request draws with seed + i). Bad input is a `ValueError` naming the field.
It does not know which request ids are in use: the engine checks that against its table.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from shared.constrained import GrammarCompiler, RequestGrammar
from shared.detokenizer import IncrementalDetokenizer, StopStringMatcher
from shared.errors import InvalidRequest
from shared.sampling import SamplingParams
from shared.scheduler.request import Req


class RequestBuilder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        max_context_len: int,
        eos_ids: frozenset[int],
        grammars: GrammarCompiler,
        grammar_compile_timeout_s: float,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context_len = max_context_len
        self.eos_ids = eos_ids
        self.grammars = grammars
        self.grammar_compile_timeout_s = grammar_compile_timeout_s
        self._arrivals = itertools.count()  # admission order, for FCFS and retraction

    def build(
        self,
        rids: list[str],
        input_ids: list[int],
        params: SamplingParams,
        return_logprob: bool,
        top_logprobs_num: int,
    ) -> list[Req]:
        """The `params.n` samples of one prompt, named by `rids`."""
        params.verify(self.vocab_size)  # before normalizing, which maps temperature < eps to 0
        params = params.normalized()
        if len(rids) != params.n:
            raise ValueError(f"{len(rids)} request ids for n={params.n}")
        self.check_prompt(input_ids)
        if not isinstance(top_logprobs_num, int) or not 0 <= top_logprobs_num <= 20:
            raise InvalidRequest(
                f"top_logprobs_num must be an integer in [0, 20], got {top_logprobs_num!r}",
                param="top_logprobs_num",
            )
        constraint = params.constraint
        if constraint is not None:
            self.grammars.check(*constraint)  # a bad schema/regex/grammar is refused now
            compiled = self.grammars.compile(*constraint)
            deadline = time.monotonic() + self.grammar_compile_timeout_s
        reqs: list[Req] = []
        stop_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else self.eos_ids
        )
        leader: Req | None = None
        for i, rid in enumerate(rids):
            # Sample i of a seeded request draws with seed + i: distinct samples, reproducible set.
            sample_params = (
                params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
            )
            req = Req(
                rid=rid,
                prompt_ids=list(input_ids),
                params=sample_params,
                stop_ids=stop_ids,
                arrival=next(self._arrivals),
                return_logprob=return_logprob,
                top_logprobs_num=top_logprobs_num,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                ),
                stop_matcher=StopStringMatcher(params.stop_strs) if params.stop_strs else None,
                leader=leader,
                grammar=RequestGrammar(constraint[0], compiled, deadline) if constraint else None,
            )
            leader = leader or req
            reqs.append(req)
        return reqs

    def check_prompt(self, input_ids: list[int]) -> None:
        if not input_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in input_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(input_ids) >= self.max_context_len:
            raise InvalidRequest(
                f"the prompt has {len(input_ids)} tokens; this engine's context is {self.max_context_len}"
                " tokens and at least one must be left to generate",
                param="prompt",
            )
