"""Spacing a decode engine's steps while it shares its GPU with a backlogged prefill engine.

Two engines on one GPU time-slice it. A decode step costs about the same whatever its batch (it
reads every weight once), so a decode engine that steps as fast as it can while few requests run
spends most of the GPU on small, inefficient batches, and the prefill engine, starved, lets
prompts pile up: fewer requests reach decode, batches stay small. When more prompts wait on the
prefill side (expected, not yet arrived) than `backlog` times the requests running here (1 by
default), `DecodePacer` spaces the steps at least `interval_s` apart, leaving the GPU to prefill
in between; batches grow until the two sides balance. With prefill idle, or the engines on
separate GPUs (interval 0, the default), decode steps run back to back.
"""

from __future__ import annotations


class DecodePacer:
    def __init__(self, interval_s: float, backlog: float = 1.0) -> None:
        self.interval_s = interval_s
        self.backlog = backlog
        self._last_step = float("-inf")

    def delay(self, pending: int, running: int, now: float) -> float:
        """Seconds to wait before the next step (0: step now). `pending`: prompts still on the
        prefill side; `running`: requests decoding here."""
        if self.interval_s <= 0 or pending <= self.backlog * running:
            return 0.0
        return max(0.0, self._last_step + self.interval_s - now)

    def stepped(self, now: float) -> None:
        self._last_step = now
