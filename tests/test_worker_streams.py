"""The worker's view of its engine process (services/worker/engine.py): outputs hop onto the
loop with one wake-up per burst (`LoopInbox`), and a token stream whose reader fell behind gets
everything queued as one output (the same tokens and text, HF's greedy tokens), with a failure
still delivered after the tokens that came before it. Over a real engine process, tiny model."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from services.worker.engine import AsyncEngine, LoopInbox, RequestStream
from shared.config import EngineConfig
from shared.errors import Unavailable
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from tests.engine.hf_reference import hf_greedy

PROMPT = list(range(20, 36))
GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def queued(stream: RequestStream) -> list[object]:
    return list(stream._queue._queue)  # type: ignore[attr-defined]


async def settle(stream: RequestStream, timeout: float = 60.0) -> None:
    """Wait, without reading the stream, until the engine has sent the request's last output."""
    deadline = time.monotonic() + timeout
    while not any(isinstance(i, RequestOutput) and i.finished for i in queued(stream)):
        assert time.monotonic() < deadline, "the request did not finish"
        await asyncio.sleep(0.05)


async def read(stream: RequestStream, coalesce: bool) -> list[RequestOutput]:
    outs = []
    async for out in stream.outputs(0.0, coalesce=coalesce):
        assert isinstance(out, RequestOutput)
        outs.append(out)
    return outs


def test_a_reader_behind_gets_one_output_then_a_failure_after_its_tokens(tiny_llama: Path) -> None:
    expected = hf_greedy(tiny_llama, PROMPT, GREEDY["max_new_tokens"])

    async def main() -> None:
        engine = AsyncEngine(EngineConfig.from_options(str(tiny_llama), page_size=4, dtype="float32"))
        try:
            behind = await engine.generate("behind", Prompt(PROMPT, GREEDY))
            await settle(behind)
            assert len(queued(behind)) == len(expected)  # one output a step, all unread
            (out,) = await read(behind, coalesce=True)
            assert out.new_ids == expected and out.finished and out.completion_tokens == len(expected)
            # Read as it goes: one output a token, the same tokens and text.
            outs = await read(await engine.generate("along", Prompt(PROMPT, GREEDY)), coalesce=False)
            assert len(outs) == len(expected) and [t for o in outs for t in o.new_ids] == expected
            assert "".join(o.new_text for o in outs) == out.new_text
            # Without coalescing, a reader behind still gets every output on its own.
            separate = await engine.generate("separate", Prompt(PROMPT, GREEDY))
            await settle(separate)
            assert len(await read(separate, coalesce=False)) == len(expected)

            # A failure queued behind tokens (the engine client's Unavailable when the engine
            # dies) comes after them: the tokens merged first, then the error.
            failing = await engine.generate("fails", Prompt(PROMPT, {**GREEDY, "max_new_tokens": 200}))
            while len(queued(failing)) < 3:
                await asyncio.sleep(0.01)
            failing.push(Unavailable("the engine went away"))
            got: list[RequestOutput] = []
            with pytest.raises(Unavailable, match="went away"):
                async for item in failing.outputs(0.0, coalesce=True):
                    assert isinstance(item, RequestOutput)
                    got.append(item)
            assert len(got) == 1 and len(got[0].new_ids) >= 3
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_posts_from_another_thread_wake_the_loop_once_per_burst() -> None:
    async def main() -> None:
        inbox = LoopInbox(asyncio.get_running_loop())
        drains = 0
        real = inbox.drain

        def counting() -> None:
            nonlocal drains
            drains += 1
            real()

        inbox.drain = counting  # type: ignore[method-assign]
        queue: asyncio.Queue[int] = asyncio.Queue()
        poster = threading.Thread(target=lambda: [inbox.post(queue, i) for i in range(100)])
        poster.start()
        poster.join()  # the loop did not run meanwhile: one wake-up pending for all 100
        assert queue.empty()
        assert await asyncio.wait_for(queue.get(), 5) == 0
        assert [queue.get_nowait() for _ in range(99)] == list(range(1, 100)) and drains == 1
        threading.Thread(target=inbox.post, args=(queue, 100)).start()  # drained: wakes again
        assert await asyncio.wait_for(queue.get(), 5) == 100 and drains == 2

    asyncio.run(main())
