"""Holding requests until their grammar compiled (the engine core's admission gate).

    gate.hold(reqs, on_ready, on_fail)   False: no grammar, or compiled: go on now (a grammar
                                          that already failed raises InvalidRequest); True: held,
                                          and a later `poll` calls on_ready() or on_fail(error)
    gate.poll()                           once a step: release whatever compiled, failed or timed out
    gate.cancel(req, why)                 the caller left: its whole group fails (Unavailable)

A group is an add's `n` samples (they share one compiled grammar, each gets its own matcher) or
one decode reservation resuming after its KV arrived. Single-threaded like the core it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import InvalidRequest, RequestError, Unavailable
from shared.sampling.params import CONSTRAINT_KINDS
from shared.scheduler.request import Req


@dataclass(eq=False)
class _Held:
    reqs: list[Req]
    on_ready: Callable[[], None]
    on_fail: Callable[[RequestError], None]


class GrammarGate:
    def __init__(self) -> None:
        self._held: list[_Held] = []

    def __bool__(self) -> bool:
        return bool(self._held)

    @property
    def groups(self) -> list[list[Req]]:
        return [held.reqs for held in self._held]

    def hold(
        self, reqs: list[Req], on_ready: Callable[[], None], on_fail: Callable[[RequestError], None]
    ) -> bool:
        grammar = reqs[0].grammar
        if grammar is None:
            return False
        now = time.monotonic()
        status = grammar.poll(now)
        if status is None:
            self._held.append(_Held(reqs, on_ready, on_fail))
            return True
        if status:
            raise _compile_error(reqs[0], status)
        for req in reqs[1:]:
            assert req.grammar is not None
            req.grammar.poll(now)  # builds its own matcher over the compiled grammar
        return False

    def poll(self) -> None:
        now = time.monotonic()
        for held in list(self._held):
            status = [req.grammar.poll(now) for req in held.reqs if req.grammar is not None]
            if None in status:
                continue
            self._held.remove(held)
            error = next((s for s in status if s), "")
            if error:
                held.on_fail(_compile_error(held.reqs[0], error))
            else:
                held.on_ready()

    def cancel(self, req: Req, message: str) -> bool:
        """Fail the group holding `req` (True), or False if `req` is not held here."""
        held = next((h for h in self._held if req in h.reqs), None)
        if held is None:
            return False
        self._held.remove(held)
        held.on_fail(Unavailable(message))
        return True

    def clear(self) -> None:
        self._held.clear()


def _compile_error(req: Req, message: str) -> InvalidRequest:
    """A grammar that failed to compile (or timed out): the request's constraint field is at fault."""
    kind = next((k for k in CONSTRAINT_KINDS if getattr(req.params, k) is not None), None)
    return InvalidRequest(message, param=kind)
