"""A timer for "nothing happened for a while" on a stream, cheap enough to touch per message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class SilenceTimer:
    """Calls `on_silence` once `timeout_s` passed without a `touch()` (and again after each
    further `timeout_s` of silence if `repeat`). `pause()` stops the clock until the next
    `touch()` (e.g. while a consumer holds a message: its time is not the producer's silence).

    One timer per stream, re-armed lazily when it fires early: a `touch` costs a clock read and
    two stores, where an `asyncio.wait_for` per message costs a task on Python < 3.12.
    Event-loop only."""

    def __init__(self, timeout_s: float, on_silence: Callable[[], object], repeat: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._on_silence = on_silence
        self._repeat = repeat
        self._deadline = self._loop.time() + timeout_s
        self._paused = False
        self.fired = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._deadline, self._check)

    def touch(self) -> None:
        self._deadline = self._loop.time() + self._timeout_s
        self._paused = False

    def pause(self) -> None:
        self._paused = True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        if self._paused or now < self._deadline:  # not silent yet: look again later
            when = now + self._timeout_s if self._paused else self._deadline
            self._timer = self._loop.call_at(when, self._check)
            return
        self.fired = True
        if self._repeat:
            self._deadline = now + self._timeout_s
            self._timer = self._loop.call_at(self._deadline, self._check)
        else:
            self._timer = None
        self._on_silence()
