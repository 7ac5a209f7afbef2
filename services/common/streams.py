"""Merging async streams: one consumer reads several producers in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


async def merge(streams: Sequence[AsyncIterable[T]]) -> AsyncIterator[tuple[int, T]]:
    """(stream index, item) from every stream as items arrive; the first error ends the merge
    (and is raised), and leaving the merge early cancels the streams still running."""
    if len(streams) == 1:  # the common case, without a task and a queue hop per item
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(idx: int, stream: AsyncIterable[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((idx, item))
            queue.put_nowait(None)
        except BaseException as exc:  # CancelledError too: the consumer must not wait forever
            queue.put_nowait(exc)

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            got = await queue.get()
            if got is None:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
