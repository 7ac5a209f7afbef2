"""The stall / keepalive timer of worker streams (services/common/silence.py)."""

from __future__ import annotations

import asyncio

from services.common.silence import SilenceTimer


def test_fires_after_silence_not_while_touched_or_paused() -> None:
    async def run() -> tuple[int, int, int, bool]:
        calls: list[float] = []
        timer = SilenceTimer(0.25, lambda: calls.append(0.0))
        for _ in range(15):  # touched every 20 ms: never silent for 250 ms
            await asyncio.sleep(0.02)
            timer.touch()
        touched = len(calls)
        timer.pause()  # a consumer holds a message: its time does not count
        await asyncio.sleep(0.5)
        paused = len(calls)
        timer.touch()
        await asyncio.sleep(0.4)
        timer.stop()
        return touched, paused, len(calls), timer.fired

    assert asyncio.run(run()) == (0, 0, 1, True)  # once, without `repeat`


def test_repeats_every_period_of_silence_until_stopped() -> None:
    async def run() -> tuple[int, int]:
        calls: list[int] = []
        timer = SilenceTimer(0.05, lambda: calls.append(1), repeat=True)
        await asyncio.sleep(0.4)
        timer.stop()
        fired = len(calls)
        await asyncio.sleep(0.1)
        return fired, len(calls)

    fired, after_stop = asyncio.run(run())
    assert 2 <= fired <= 8 and after_stop == fired  # ~every 50 ms of 400 ms, none after stop
