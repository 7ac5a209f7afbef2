"""The engine process seen from the worker's event loop.

`EngineClient` calls back on its receiver thread; `AsyncEngine` hops each output onto the loop
(`call_soon_threadsafe`) into a per-request `RequestStream`. Closing or cancelling a stream
before the request finished aborts it in the engine, so a cancelled RPC frees its KV.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.outputs import RequestOutput
from shared.transfer.records import KvTarget


class RequestStream:
    """Outputs of one request, in order; iteration ends after the finished output."""

    def __init__(self, engine: AsyncEngine, rid: str) -> None:
        self.engine = engine
        self.rid = rid
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def push(self, item: RequestOutput | BaseException) -> None:  # any thread
        self.engine.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Abort the request if it is still running (a cancelled or abandoned RPC)."""
        if not self.finished:
            self.finished = True
            self.engine.client.abort(self.rid)


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.client = EngineClient(config)  # blocks until the engine is ready (or failed)
        self.loop = asyncio.get_running_loop()

    async def generate(
        self,
        rid: str,
        input_ids: list[int],
        params: dict[str, Any],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        kv_target: KvTarget | None = None,
    ) -> RequestStream:
        """Queue a request; raises the engine's refusal (a RequestError: shared/errors.py)."""
        stream = RequestStream(self, rid)
        fut = self.client.submit(
            [rid], input_ids, params, stream.push, return_logprob, top_logprobs_num, kv_target
        )
        await self._admitted(rid, fut)
        return stream

    async def expect_kv(
        self,
        rid: str,
        input_ids: list[int],
        params: dict[str, Any],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        lease_s: float | None = None,
    ) -> RequestStream:
        """Decode engine: register a prompt whose KV a prefill engine will write."""
        stream = RequestStream(self, rid)
        fut = self.client.expect_kv(
            rid, input_ids, params, stream.push, return_logprob, top_logprobs_num, lease_s
        )
        await self._admitted(rid, fut)
        return stream

    async def reserve_kv(self, rid: str) -> list[int]:
        """Decode engine: pages for an expected prompt, once there is room. A caller that leaves
        before the answer aborts the request."""
        pages: list[int] = await self._admitted(rid, self.client.reserve_kv(rid))
        return pages

    def set_kv_target(self, rid: str, pages: list[int]) -> None:
        self.client.set_kv_target(rid, pages)

    async def add_peer(self, metadata: bytes) -> str:
        return await self._await(self.client.add_peer(metadata))

    async def stats(self) -> dict[str, int]:
        return await self._await(self.client.stats())

    def commit_kv(self, commit: bytes, payload: bytes | memoryview | None) -> None:
        self.client.commit_kv(commit, payload)

    def shutdown(self) -> None:
        self.client.shutdown()

    async def _admitted(self, rid: str, fut: Future[Any]) -> Any:
        """The engine's answer to an add or a reservation. The answer can come late (a grammar
        compiling, a reservation queued): a caller that leaves before it aborts the request."""
        try:
            return await self._await(fut)
        except asyncio.CancelledError:
            self.client.abort(rid)
            raise

    @staticmethod
    async def _await(fut: Future[Any]) -> Any:
        return await asyncio.wrap_future(fut)
