"""Where a request runs: pick workers, run the PD hand-off (or a unified worker), stream back.

One sample (n > 1 fans out into n samples, sample i seeded with seed + i):

    PD mode (prefill and decode workers available)
      1. P = prefill policy (cache-aware), D = decode policy (least load)
      2. D.Generate(request)        -> first message: the Reservation (pages for the prompt);
                                       for max_new_tokens 0 the finished output instead, and done
      3. P.Prefill(request, reservation, D's address), concurrently with reading D's stream
      4. D streams outputs; P's answer only matters if it fails (then D's call is cancelled)
    Unified mode: W = unified policy; W.Generate streams outputs.

Embeddings (`embed`): W = unified policy; one unary W.Embed for all the request's inputs,
retried on a fresh worker like a sample before its first output. Unified workers only: a
deployment of prefill/decode pairs answers FAILED_PRECONDITION.

Failure: either leg failing cancels the other (leaving the with-block cancels both calls; the
workers abort and free). A failure before the first output reached the caller is retried on a
fresh pair (a worker that looks gone is probed and taken out first); after it, the caller gets
the error. A client disconnect cancels the router's handler, which cancels both calls.

Liveness (`stall_timeout_s`, default 10 s): a worker stream that sends nothing, not even a
keepalive, for that long is given up (UNAVAILABLE, the call cancelled so the worker frees it
when it resumes, the worker out of rotation until a probe answers). Workers learn the bound
(`stall_timeout_ms`) and send a keepalive after a quarter of it without output, so a request
queued or prefilling on a busy worker is not given up; a worker whose engine has not answered
for the bound fails the request itself (UNAVAILABLE). The prefill leg is one unary call with
nothing to stream: its worker applies the same engine check, and the router gives it up as soon
as the registry marks the worker UNHEALTHY (heartbeats stopped and a probe failed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from services.common.errors import ServiceError
from services.common.silence import SilenceTimer
from services.common.streams import merge
from services.common.tracing import outgoing_metadata
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from services.protos.tandem.worker.v1 import worker_pb2
from services.router.metrics import RequestRecord, RouterMetrics
from services.router.policies import Policy
from services.router.registry import Registry, Worker

logger = logging.getLogger(__name__)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class NoWorkers(ServiceError):
    """No healthy worker can take the request (UNAVAILABLE): not retried, since a retry a moment
    later finds the same workers (it only wrote a warning a request while a role was down)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


def abandon(task: asyncio.Future[Any]) -> None:
    """Cancel a leg whose outcome no longer matters (no-op once it is done). A failure it ends
    with is taken and dropped: the request's own error is raised elsewhere, and asyncio would
    otherwise log "Task exception was never retrieved" at ERROR for a client's bad request (both
    PD legs rejecting the same constraint, one of them first)."""
    task.add_done_callback(_drop_outcome)
    task.cancel()


def _drop_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


# Failed calls that are not the worker's error: our own cancellation, and the worker refusing the
# client's input (an output schema that does not compile), which the router already counts as the
# request's status; an alert on worker errors must not fire on bad requests.
_NOT_THE_WORKERS = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT})


@dataclass
class Sample:
    request_id: int
    index: int
    token_ids: list[int]
    text: str
    params: common_pb2.SamplingParams
    return_logprob: bool
    top_logprobs_num: int

    def worker_request(
        self, attempt: int, serial: int, kv_lease_ms: int = 0, stall_timeout_ms: int = 0
    ) -> worker_pb2.GenerateRequest:
        """`serial` (the router's own count) keeps worker request ids unique even when clients
        reuse a request_id."""
        return worker_pb2.GenerateRequest(
            rid=f"{self.request_id}-{self.index}-{attempt}-{serial}",
            token_ids=self.token_ids,
            sampling_params=self.params,
            return_logprob=self.return_logprob,
            top_logprobs_num=self.top_logprobs_num,
            kv_lease_ms=kv_lease_ms,
            stall_timeout_ms=stall_timeout_ms,
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
        metrics: RouterMetrics | None = None,
        max_in_flight: int = 0,
        stall_timeout_s: float = 10.0,
    ) -> None:
        self.registry = registry
        self.policies = {"prefill": prefill_policy, "decode": decode_policy, "unified": unified_policy}
        self.max_attempts = max_attempts
        self.kv_lease_ms = kv_lease_ms
        # Bounded admission: past this many samples in flight (0: no bound) a request is refused
        # at once with RESOURCE_EXHAUSTED (HTTP 429 + Retry-After at the gateway) instead of
        # queueing without end in the workers. Under the bound, requests wait for their turn in
        # the workers' queues (the decode side reserves KV just in time, so waiting costs no
        # decode memory and no lease runs out).
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.stall_timeout_s = stall_timeout_s
        self._stall_ms = max(int(stall_timeout_s * 1000), 400)
        self._probes: set[asyncio.Future[None]] = set()  # probes of stalled workers, running
        self._serials = itertools.count()
        self.metrics = metrics or RouterMetrics()
        registry.on_removed.extend(p.on_worker_removed for p in self.policies.values())
        registry.on_removed.append(self.metrics.forget_worker)

    async def generate(
        self, samples: Sequence[Sample], record: RequestRecord | None = None
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Responses of all samples, interleaved as they come; the first error ends the stream.
        `record` (if given) learns the mode, workers, attempts and usage."""
        record = record or RequestRecord()
        self._admit(len(samples))
        try:
            async for _, resp in merge([self._run(s, record) for s in samples]):
                yield resp
        finally:
            self.in_flight -= len(samples)

    async def _run(self, sample: Sample, record: RequestRecord) -> AsyncIterator[router_pb2.GenerateResponse]:
        clock = self.metrics.clock(record.start)
        usage: common_pb2.Usage | None = None  # the latest usage; set once a response went out
        failed: set[str] = set()  # workers of this sample's failed attempts: a retry goes elsewhere
        try:
            for attempt in range(self.max_attempts):
                record.attempts = max(record.attempts, attempt + 1)
                try:
                    prefills, decodes = self.registry.available("prefill"), self.registry.available("decode")
                    if prefills and decodes:
                        record.mode = "pd"
                        stream = self._pd(sample, attempt, record, failed)
                    elif self.registry.available("unified"):
                        record.mode = "unified"
                        stream = self._unified(sample, attempt, record, failed)
                    elif prefills or decodes:
                        record.mode = "pd"  # half a pair: say which half is missing
                        missing = "decode" if prefills else "prefill"
                        raise NoWorkers(f"no healthy {missing} workers (nor unified ones)")
                    else:
                        raise NoWorkers(self._none_healthy())
                    async for resp in stream:
                        usage = resp.output.usage
                        clock.add(len(resp.output.token_ids))
                        yield resp
                    clock.finish()
                    return
                except ServiceError as e:
                    final = isinstance(e, NoWorkers) or attempt + 1 == self.max_attempts
                    if usage is not None or e.code not in _RETRYABLE or final:
                        raise
                    # A worker whose engine just died still answers its health probe for a moment
                    # (it refuses each call at once): the retry must not land there again.
                    failed.update(a for a in (record.prefill_worker, record.decode_worker) if a)
                    self.metrics.retries.inc()
                    logger.warning(
                        "request %d attempt %d failed (%s); retrying", sample.request_id, attempt, e.message
                    )
        finally:
            if usage is not None:
                record.add_usage(usage)
                self.metrics.add_usage(usage)

    async def embed(
        self, request_id: int, inputs: list[list[int]], options: common_pb2.EmbedOptions
    ) -> tuple[worker_pb2.EmbedResponse, str]:
        """One vector per input from a unified worker: (the worker's answer, its address)."""
        if not self.registry.available("unified") and (
            self.registry.available("prefill") or self.registry.available("decode")
        ):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "embeddings run on unified workers, and this deployment has only prefill/decode"
                " workers (start a unified one: tandem up --prefill 0 --decode 0)",
            )
        self._admit(len(inputs))
        tokens = sum(len(ids) for ids in inputs)
        try:
            for attempt in range(self.max_attempts):
                worker = self._pick_for("unified", "", inputs[0])
                request = worker_pb2.EmbedRequest(
                    rid=f"{request_id}-e-{attempt}-{next(self._serials)}",
                    inputs=[common_pb2.TokenIds(ids=ids) for ids in inputs],
                    options=options,
                )
                with self.registry.track(worker, tokens):
                    try:
                        call = worker.worker.Embed(request, metadata=outgoing_metadata())
                        return await self._unary(worker, call), worker.address
                    except ServiceError as e:
                        if e.code not in _RETRYABLE or attempt + 1 == self.max_attempts:
                            raise
                        self.metrics.retries.inc()
                        logger.warning(
                            "embed %d attempt %d failed (%s); retrying", request_id, attempt, e.message
                        )
            raise AssertionError("unreachable")
        finally:
            self.in_flight -= len(inputs)

    def _admit(self, count: int) -> None:
        """Count `count` more samples in flight (the caller takes them off when they end), or
        refuse them with RESOURCE_EXHAUSTED past `max_in_flight`."""
        if self.max_in_flight and self.in_flight + count > self.max_in_flight:
            self.metrics.refused.inc()
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is at capacity ({self.in_flight} samples in flight, at most"
                f" {self.max_in_flight}); retry later",
            )
        self.in_flight += count

    def _pick(self, role: str, sample: Sample, failed: Collection[str] = ()) -> Worker:
        return self._pick_for(
            role, sample.text, sample.token_ids, _fresh(self.registry.available(role), failed)
        )

    def _pick_pair(self, sample: Sample, failed: Collection[str] = ()) -> tuple[Worker, Worker]:
        """A prefill worker (its policy) among those with a decode worker that can take its KV
        (the same KV layout, tensor-parallel size and transport), then a decode worker (its
        policy) among those; workers not in `failed` where they can make a pair."""
        decodes = self.registry.available("decode")
        prefills = self.registry.available("prefill")
        fresh_decodes, fresh_prefills = _fresh(decodes, failed), _fresh(prefills, failed)
        if {w.kv_pairing for w in fresh_decodes} & {w.kv_pairing for w in fresh_prefills}:
            decodes, prefills = fresh_decodes, fresh_prefills
        keys = {w.kv_pairing for w in decodes}
        if prefills and decodes and not any(w.kv_pairing in keys for w in prefills):
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no prefill worker can hand its KV to a decode worker: the KV layout, tensor-parallel"
                " size and transport must match (prefill "
                f"{sorted({w.describe_pairing() for w in prefills})}, decode"
                f" {sorted({w.describe_pairing() for w in decodes})})",
            )
        prefill = self._pick_for(
            "prefill", sample.text, sample.token_ids, [w for w in prefills if w.kv_pairing in keys]
        )
        matching = [w for w in decodes if w.kv_pairing == prefill.kv_pairing]
        return prefill, self._pick_for("decode", sample.text, sample.token_ids, matching)

    def _none_healthy(self) -> str:
        """Why no worker of any role can take a request: the roles registered, if any (a PD
        deployment whose workers are all down is not missing "unified" workers)."""
        roles = sorted({w.role for w in self.registry.workers.values()})
        if not roles:
            return "no workers registered"
        return f"no healthy workers ({', '.join(roles)} registered, none healthy now)"

    def _pick_for(
        self, role: str, text: str, token_ids: list[int], workers: list[Worker] | None = None
    ) -> Worker:
        """A worker of `role` (among `workers`, default: every healthy one) by the role's policy."""
        workers = self.registry.available(role) if workers is None else workers
        if not workers:
            raise NoWorkers(f"no healthy {role} workers")
        policy = self.policies[role]
        chosen = policy.select(workers, text, token_ids)
        assert isinstance(chosen, Worker)
        self.metrics.decisions.labels(role, chosen.address).inc()
        span = trace.get_current_span()
        if span.is_recording():
            event: dict[str, str | int] = {"role": role, "policy": policy.name, "worker": chosen.address}
            decision = getattr(policy, "last_decision", None)  # cache_aware says why
            if decision is not None and decision.address == chosen.address:
                event.update(reason=decision.reason, prefix_match=decision.match_len)
            span.add_event("route", event)
        return chosen

    async def _unified(
        self, sample: Sample, attempt: int, record: RequestRecord, failed: Collection[str] = ()
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        worker = self._pick("unified", sample, failed)
        record.prefill_worker, record.decode_worker = "", worker.address
        route: router_pb2.Route | None = router_pb2.Route(decode_worker=worker.address)
        with self.registry.track(worker, sample.tokens):
            request = sample.worker_request(attempt, next(self._serials), stall_timeout_ms=self._stall_ms)
            stream = worker.worker.Generate(request, metadata=outgoing_metadata())
            try:
                async for msg in self._guard(worker, stream):
                    yield self._response(sample, msg.output, route)
                    route = None
            finally:
                stream.cancel()

    async def _pd(
        self, sample: Sample, attempt: int, record: RequestRecord, failed: Collection[str] = ()
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        prefill, decode = self._pick_pair(sample, failed)
        record.prefill_worker, record.decode_worker = prefill.address, decode.address
        route: router_pb2.Route | None = router_pb2.Route(
            prefill_worker=prefill.address, decode_worker=decode.address
        )
        request = sample.worker_request(attempt, next(self._serials), self.kv_lease_ms, self._stall_ms)
        metadata = outgoing_metadata()
        with self.registry.track(prefill, len(sample.token_ids)), self.registry.track(decode, sample.tokens):
            stream = decode.decode.Generate(request, metadata=metadata)
            prefill_call: asyncio.Task[worker_pb2.PrefillResponse] | None = None
            read: asyncio.Future[worker_pb2.GenerateResponse | None] | None = None
            try:
                messages = self._guard(decode, stream).__aiter__()
                first = await anext(messages, None)
                if first is not None and first.HasField("output") and first.output.HasField("finish"):
                    # A sample that generates nothing (max_new_tokens 0): decode answered it at
                    # once, as a unified worker would, and there is no prompt to prefill.
                    record.prefill_worker = ""
                    yield self._response(sample, first.output, router_pb2.Route(decode_worker=decode.address))
                    return
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
                        metadata,
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
                    if task is not None:
                        abandon(task)

    async def _prefill(
        self, worker: Worker, request: worker_pb2.PrefillRequest, metadata: tuple[tuple[str, str], ...] | None
    ) -> worker_pb2.PrefillResponse:
        """The prefill leg; given up (and cancelled) once the registry marks its worker down."""
        response: worker_pb2.PrefillResponse = await self._unary(
            worker, worker.prefill.Prefill(request, metadata=metadata)
        )
        return response

    async def _unary(self, worker: Worker, call: Any) -> Any:
        """A unary call's answer; given up (and cancelled) once the registry marks its worker
        down; gRPC errors become ServiceErrors (probing the worker)."""
        answer: asyncio.Future[Any] = asyncio.ensure_future(call)
        down = asyncio.ensure_future(worker.down.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [answer, down]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() or answer.cancelled():
                # Down, or removed: closing its channel cancels the call under us, which is no
                # cancellation of our caller's (that would end the request with no status).
                raise self._down(worker)
            return answer.result()
        except grpc.aio.AioRpcError as e:
            raise await self._failure(worker, e) from None
        finally:
            down.cancel()
            if not answer.done():
                call.cancel()
            abandon(answer)

    async def _guard(
        self, worker: Worker, stream: grpc.aio.UnaryStreamCall
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """A worker's stream with its gRPC errors turned into ServiceErrors (probing the worker),
        its keepalives dropped, and a stall (nothing for `stall_timeout_s`) an UNAVAILABLE."""
        watch = SilenceTimer(self.stall_timeout_s, stream.cancel)
        try:
            async for msg in stream:
                self.registry.seen(worker)
                if not msg.HasField("keepalive"):
                    watch.pause()  # our caller's time is not the worker's silence
                    yield msg
                watch.touch()
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
            if watch.fired:  # the watch cancelled the call
                raise self._stalled(worker, stream) from None
            if isinstance(e, grpc.aio.AioRpcError):
                raise await self._failure(worker, e) from None
            if worker.down.is_set() and not _cancelling():  # its channel closed under the stream
                raise self._down(worker) from None
            raise
        finally:
            watch.stop()

    def _stalled(self, worker: Worker, stream: grpc.aio.UnaryStreamCall) -> ServiceError:
        stream.cancel()  # the worker aborts the request (and frees its KV) when it resumes
        self.metrics.worker_error(worker.role, worker.address, "STALLED")
        logger.warning(
            "worker %s sent nothing for %.1f s; giving up its stream", worker.address, self.stall_timeout_s
        )
        # Out of rotation at once (the retry must not land there), back when a probe, run in
        # the background, answers: a frozen worker stays out.
        probe = self.registry.stalled(worker)
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"worker {worker.address} made no progress for {self.stall_timeout_s:g} s"
            " (no output, no keepalive)",
        )

    def _down(self, worker: Worker) -> ServiceError:
        """The UNAVAILABLE of a call given up because its worker went down or was removed."""
        if self._removed(worker):
            return ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"{worker.role} worker {worker.address} was removed from the router",
            )
        self.metrics.worker_error(worker.role, worker.address, "STALLED")
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"{worker.role} worker {worker.address} stopped answering (no heartbeat, failed probe)",
        )

    def _removed(self, worker: Worker) -> bool:
        return self.registry.workers.get(worker.address) is not worker

    async def _failure(self, worker: Worker, e: grpc.aio.AioRpcError) -> ServiceError:
        code, message = e.code(), e.details() or str(e.code())
        if code == grpc.StatusCode.UNAVAILABLE and self._removed(worker):  # no probe: its channel is closed
            return ServiceError.from_rpc(
                e, f"{worker.role} worker {worker.address} was removed from the router: {message}"
            )
        if code not in _NOT_THE_WORKERS:
            self.metrics.worker_error(worker.role, worker.address, code.name)
        if code == grpc.StatusCode.UNAVAILABLE and not await self.registry.suspect(worker):
            message = f"worker {worker.address} is gone: {message}"
        return ServiceError.from_rpc(e, message)

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


def _fresh(workers: list[Worker], failed: Collection[str]) -> list[Worker]:
    """`workers` but those in `failed`, unless that leaves none."""
    return [w for w in workers if w.address not in failed] or workers


def _cancelling() -> bool:
    """Whether the running task is being cancelled (a CancelledError that is ours to pass on)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return task is None or cancelling is None or cancelling() > 0
