"""Per-request grammar state and the per-step token masks.

A constrained request carries a `RequestGrammar`: first the compile future (shared by the `n`
samples of a request and by every request with the same constraint), then its own xgrammar
matcher, which follows the tokens the request accepts. Each step the engine asks `TokenMasks`
for the batch's bitmask while the forward pass runs on the GPU (the fill is host work), copies
it behind the forward and applies it to the logits before sampling:

    bitmask [B, ceil(V / 32)] int32: bit j of word w set  <=>  token 32 * w + j is allowed

Rows of unconstrained requests are all ones.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch
import xgrammar as xgr
from torch import Tensor

from shared.constrained.grammar import parser_message

# xgrammar's threads fill the masks only for many rows over a large vocabulary: one fill takes
# ~1-100 us over 128k tokens but ~1 us over a few thousand, and the hand-off costs ~100 us a call.
_PARALLEL_MIN_ROWS = 8
_PARALLEL_MIN_VOCAB = 32768


class RequestGrammar:
    """One request's constraint: compiling (`matcher is None`), then matching its tokens."""

    def __init__(self, kind: str, future: Future[xgr.CompiledGrammar], deadline: float) -> None:
        self.kind = kind
        self.future = future
        self.deadline = deadline  # time.monotonic() by which it must have compiled
        self.matcher: xgr.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self.matcher is not None

    def poll(self, now: float) -> str | None:
        """None while compiling; "" once the matcher is built; else why the request is refused."""
        if self.matcher is not None:
            return ""
        if not self.future.done():
            if now > self.deadline:
                return f"compiling the {self.kind} took too long; simplify it"
            return None
        error = self.future.exception()
        if error is not None:
            return f"{self.kind} could not be compiled: {parser_message(error)}"
        self.matcher = xgr.GrammarMatcher(self.future.result())
        return ""

    def accept(self, token: int) -> bool:
        """Advance past `token`; False if the grammar does not allow it."""
        assert self.matcher is not None
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: the output is over."""
        return self.matcher is not None and self.matcher.is_terminated()


class TokenMasks:
    """Builds each step's bitmask on the host (pinned on CUDA) and ships it to the device."""

    def __init__(self, vocab_size: int, device: torch.device, threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._host = self._alloc(64)
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def build(self, grammars: list[RequestGrammar | None]) -> Tensor | None:
        """The batch's bitmask on the device ([B, W] int32), or None when no row is constrained.
        Row i follows grammars[i]; None rows allow every token."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return None
        if len(grammars) > self._host.shape[0]:
            self._host = self._alloc(max(len(grammars), 2 * self._host.shape[0]))
        host = self._host[: len(grammars)]
        host.fill_(-1)
        matchers = []
        for i in rows:
            grammar = grammars[i]
            assert grammar is not None and grammar.matcher is not None
            matchers.append(grammar.matcher)
        if len(rows) < _PARALLEL_MIN_ROWS or self.vocab_size < _PARALLEL_MIN_VOCAB:
            for i, matcher in zip(rows, matchers):
                matcher.fill_next_token_bitmask(host, i)
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, host, indices=rows)
        if self.device.type != "cuda":
            return host.clone()
        # The previous step's copy finished before its tokens were read back (`.tolist()`), so
        # reusing the pinned buffer here is safe; this copy queues behind the running forward.
        return host.to(self.device, non_blocking=True)

    def _alloc(self, rows: int) -> Tensor:
        t = xgr.allocate_token_bitmask(rows, self.vocab_size)
        return t.pin_memory() if self.device.type == "cuda" else t


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place.

    logits: [B, V] float; bitmask: [B, W] int32 with W * 32 >= V. On CUDA xgrammar's kernel does
    it; elsewhere (and as the reference) an unpacking in torch.
    """
    if logits.is_cuda:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
        return
    apply_token_bitmask_reference(logits, bitmask)


def apply_token_bitmask_reference(logits: Tensor, bitmask: Tensor) -> None:
    batch, vocab = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(batch, -1)[:, :vocab]  # [B, W * 32]
    logits.masked_fill_(allowed == 0, float("-inf"))
