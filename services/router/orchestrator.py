"""Where a request runs: pick workers, run the PD hand-off (or a unified worker), stream back.

One sample (n > 1 fans out into n samples, sample i seeded with seed + i):

    PD mode (prefill and decode workers available)
      1. P = prefill policy (cache-aware), D = decode policy (least load)
      2. D.Generate(request)        -> first message: the Reservation (pages for the prompt)
      3. P.Prefill(request, reservation, D's address), concurrently with reading D's stream
      4. D streams outputs; P's answer only matters if it fails (then D's call is cancelled)
    Unified mode: W = unified policy; W.Generate streams outputs.

Failure: either leg failing cancels the other (leaving the with-block cancels both calls; the
workers abort and free). A failure before the first output reached the caller is retried on a
fresh pair (a worker that looks gone is probed and taken out first); after it, the caller gets
the error. A client disconnect cancels the router's handler, which cancels both calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from services.common.errors import ServiceError
from services.common.streams import merge
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from services.protos.tandem.worker.v1 import worker_pb2
from services.router.policies import Policy
from services.router.registry import Registry, Worker

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Sample:
    request_id: int
    index: int
    token_ids: list[int]
    text: str
    params: common_pb2.SamplingParams
    return_logprob: bool
    top_logprobs_num: int

    def worker_request(self, attempt: int, kv_lease_ms: int = 0) -> worker_pb2.GenerateRequest:
        return worker_pb2.GenerateRequest(
            rid=f"{self.request_id}-{self.index}-{attempt}",
            token_ids=self.token_ids,
            sampling_params=self.params,
            return_logprob=self.return_logprob,
            top_logprobs_num=self.top_logprobs_num,
            kv_lease_ms=kv_lease_ms,
        )

    @property
    def tokens(self) -> int:
        """The load this sample puts on a worker: prompt + the most it may generate."""
        return len(self.token_ids) + (
            self.params.max_new_tokens if self.params.HasField("max_new_tokens") else 128
        )


class Orchestrator:
    def __init__(
        self,
        registry: Registry,
        prefill_policy: Policy,
        decode_policy: Policy,
        unified_policy: Policy,
        max_attempts: int = 3,
        kv_lease_ms: int = 0,
    ) -> None:
        self.registry = registry
        self.policies = {"prefill": prefill_policy, "decode": decode_policy, "unified": unified_policy}
        self.max_attempts = max_attempts
        self.kv_lease_ms = kv_lease_ms
        self.decisions: dict[str, int] = {}  # worker address -> requests routed there
        registry.on_removed.extend(p.on_worker_removed for p in self.policies.values())

    async def generate(self, samples: Sequence[Sample]) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Responses of all samples, interleaved as they come; the first error ends the stream."""
        async for _, resp in merge([self._run(s) for s in samples]):
            yield resp

    async def _run(self, sample: Sample) -> AsyncIterator[router_pb2.GenerateResponse]:
        emitted = False
        for attempt in range(self.max_attempts):
            try:
                if self.registry.available("prefill") and self.registry.available("decode"):
                    stream = self._pd(sample, attempt)
                else:
                    stream = self._unified(sample, attempt)
                async for resp in stream:
                    emitted = True
                    yield resp
                return
            except ServiceError as e:
                if emitted or e.code not in _RETRYABLE or attempt + 1 == self.max_attempts:
                    raise
                logger.warning(
                    "request %d attempt %d failed (%s); retrying", sample.request_id, attempt, e.message
                )

    def _pick(self, role: str, sample: Sample) -> Worker:
        workers = self.registry.available(role)
        if not workers:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"no healthy {role} workers")
        chosen = self.policies[role].select(workers, sample.text, sample.token_ids)
        assert isinstance(chosen, Worker)
        self.decisions[chosen.address] = self.decisions.get(chosen.address, 0) + 1
        return chosen

    async def _unified(self, sample: Sample, attempt: int) -> AsyncIterator[router_pb2.GenerateResponse]:
        worker = self._pick("unified", sample)
        route: router_pb2.Route | None = router_pb2.Route(decode_worker=worker.address)
        with self.registry.track(worker, sample.tokens):
            stream = worker.worker.Generate(sample.worker_request(attempt))
            try:
                async for msg in self._guard(worker, stream):
                    yield self._response(sample, msg.output, route)
                    route = None
            finally:
                stream.cancel()

    async def _pd(self, sample: Sample, attempt: int) -> AsyncIterator[router_pb2.GenerateResponse]:
        prefill, decode = self._pick("prefill", sample), self._pick("decode", sample)
        route: router_pb2.Route | None = router_pb2.Route(
            prefill_worker=prefill.address, decode_worker=decode.address
        )
        request = sample.worker_request(attempt, self.kv_lease_ms)
        with self.registry.track(prefill, len(sample.token_ids)), self.registry.track(decode, sample.tokens):
            stream = decode.decode.Generate(request)
            prefill_call: asyncio.Task[worker_pb2.PrefillResponse] | None = None
            read: asyncio.Future[worker_pb2.GenerateResponse | None] | None = None
            try:
                messages = self._guard(decode, stream).__aiter__()
                first = await anext(messages, None)
                if first is None or not first.HasField("reservation"):
                    raise ServiceError(
                        grpc.StatusCode.INTERNAL, f"decode worker {decode.address} sent no reservation"
                    )
                prefill_call = asyncio.create_task(
                    self._prefill(
                        prefill,
                        worker_pb2.PrefillRequest(
                            request=request, reservation=first.reservation, decode_address=decode.address
                        ),
                    )
                )
                while True:
                    if prefill_call.done():
                        prefill_call.result()  # raises the prefill leg's failure
                        msg = await anext(messages, None)
                    else:  # wait for the next output or a prefill failure, whichever comes first
                        read = asyncio.ensure_future(anext(messages, None))
                        await asyncio.wait({read, prefill_call}, return_when=asyncio.FIRST_COMPLETED)
                        if prefill_call.done() and prefill_call.exception() is not None:
                            raise prefill_call.exception()  # type: ignore[misc]
                        msg, read = await read, None
                    if msg is None:
                        break
                    yield self._response(sample, msg.output, route)
                    route = None
            finally:
                stream.cancel()
                for task in (read, prefill_call):
                    if task is not None and not task.done():
                        task.cancel()

    async def _prefill(
        self, worker: Worker, request: worker_pb2.PrefillRequest
    ) -> worker_pb2.PrefillResponse:
        try:
            return await worker.prefill.Prefill(request)
        except grpc.aio.AioRpcError as e:
            raise await self._failure(worker, e) from None

    async def _guard(
        self, worker: Worker, stream: AsyncIterator[worker_pb2.GenerateResponse]
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """A worker's stream with its gRPC errors turned into ServiceErrors (probing the worker)."""
        try:
            async for msg in stream:
                yield msg
        except grpc.aio.AioRpcError as e:
            raise await self._failure(worker, e) from None

    async def _failure(self, worker: Worker, e: grpc.aio.AioRpcError) -> ServiceError:
        code, message = e.code(), e.details() or str(e.code())
        if code == grpc.StatusCode.UNAVAILABLE and not await self.registry.suspect(worker):
            message = f"worker {worker.address} is gone: {message}"
        return ServiceError(code, message)

    @staticmethod
    def _response(
        sample: Sample, output: common_pb2.Output, route: router_pb2.Route | None
    ) -> router_pb2.GenerateResponse:
        output.index = sample.index
        if output.HasField("finish") and output.finish.reason == common_pb2.FINISH_REASON_ABORT:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, output.finish.message or "the request was aborted"
            )
        return router_pb2.GenerateResponse(request_id=sample.request_id, output=output, route=route)
