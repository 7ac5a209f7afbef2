"""The router's worker registry: who serves, in which role, whether they are healthy, and how
loaded the router has made them.

Workers join by `RegisterWorker` (they heartbeat afterwards), through the admin HTTP endpoint,
or from `--worker` flags, all on the router's admin listener (the cluster token's holders only);
the router asks each its role and model (`GetInfo`, with the cluster token) before using it and
refuses one that serves another model or answers an unknown role. Every call to a worker
carries the cluster token when one is set.

States: HEALTHY (gets traffic) -> DRAINING (admin: finishes what it has, gets nothing new) or
UNHEALTHY (a failed call confirmed by a failed health probe, or heartbeats stopped; probed every
interval and HEALTHY again when a probe succeeds; removed after `remove_after_s`).

Liveness under load: a message on any of a worker's streams counts as a heartbeat (`seen`), so
a worker busy answering streams is not probed for a late heartbeat; probes go over a channel of
their own (not queued behind the worker's streams) with a bounded timeout, all workers at once.
`Worker.down` is set while a worker is UNHEALTHY or removed: calls waiting on it give up.

Asyncio-only (the router's event loop): no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import dial
from services.common.errors import ServiceError
from services.common.multiplex import Multiplexer
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.router.policies import WorkerView
from shared.errors import InvalidRequest, NotFound

logger = logging.getLogger(__name__)

# A health probe's bound: generous enough for a worker whose event loop is busy with many streams,
# short enough that a frozen one is out within heartbeat_timeout + interval + this.
PROBE_TIMEOUT_S = 2.0
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel that shares no connection
# A worker's answers: a GenerateMany batch or an output holding many tokens' top logprobs may
# pass gRPC's 4 MiB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]

ROLE_NAMES = {
    common_pb2.WORKER_ROLE_UNIFIED: "unified",
    common_pb2.WORKER_ROLE_PREFILL: "prefill",
    common_pb2.WORKER_ROLE_DECODE: "decode",
}
STATES = {
    "healthy": router_pb2.WORKER_STATE_HEALTHY,
    "draining": router_pb2.WORKER_STATE_DRAINING,
    "unhealthy": router_pb2.WORKER_STATE_UNHEALTHY,
}


@dataclass(eq=False)
class Worker(WorkerView):
    role: str = "unified"
    info: worker_pb2.GetInfoResponse = field(default_factory=worker_pb2.GetInfoResponse)
    channel: Any = None
    state: str = "healthy"
    requests_total: int = 0
    last_seen: float = 0.0
    unhealthy_since: float = 0.0
    health_channel: Any = None  # probes: a connection of their own (default: `channel`)
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set while unhealthy or removed
    # Drained by an operator: out of rotation for new requests from then on, whatever its health
    # does (state "draining" while it answers, "unhealthy" while it does not).
    draining: bool = False
    multiplexed: bool = True  # Generate calls as streams of one GenerateMany call per service

    def __post_init__(self) -> None:
        worker = worker_pb2_grpc.WorkerServiceStub(self.channel)
        decode = worker_pb2_grpc.DecodeServiceStub(self.channel)
        # Multiplexed: a gRPC message per engine step, not per token (services/common/multiplex.py).
        self.worker = Multiplexer(worker, worker_pb2) if self.multiplexed else worker
        self.prefill = worker_pb2_grpc.PrefillServiceStub(self.channel)
        self.decode = Multiplexer(decode, worker_pb2) if self.multiplexed else decode
        self.health = health_pb2_grpc.HealthStub(self.health_channel or self.channel)

    @property
    def kv_pairing(self) -> tuple[str, int, int]:
        """What a prefill and a decode worker must share to hand KV over: the KV pool layout,
        the tensor-parallel size (each rank writes its shard) and the transport."""
        return self.info.kv_layout, self.info.tp_size or 1, self.info.kv_transport

    def describe_pairing(self) -> str:
        layout, tp_size, transport = self.kv_pairing
        return f"layout {layout}, tp_size {tp_size}, {worker_pb2.KvTransport.Name(transport)}"

    def to_proto(self) -> router_pb2.WorkerInfo:
        return router_pb2.WorkerInfo(
            address=self.address,
            role=self.info.role,
            state=STATES[self.state],
            model=self.info.model,
            in_flight=self.in_flight,
            requests_total=self.requests_total,
        )


def check_address(address: str) -> None:
    """An INVALID_ARGUMENT unless `address` is host:port with a port gRPC can dial (1-65535)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidRequest(
            f"a worker address is host:port with a port of 1-65535, got {address!r}", param="address"
        )


class Registry:
    def __init__(
        self,
        model: str,
        heartbeat_interval_s: float = 1.0,
        heartbeat_timeout_s: float = 5.0,
        remove_after_s: float = 60.0,
        cluster_token: str | None = None,
        multiplexed: bool = True,
    ) -> None:
        self.model = model
        self.multiplexed = multiplexed  # workers' Generate calls over GenerateMany
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.remove_after_s = remove_after_s
        self.cluster_token = cluster_token
        self.workers: dict[str, Worker] = {}
        self.on_removed: list[Callable[[str], None]] = []

    # ---- membership ----------------------------------------------------------------------------

    async def register(self, address: str) -> Worker:
        """Add a worker (or refresh a known one): it must answer GetInfo, in a known role, and
        serve our model."""
        check_address(address)
        known = self.workers.get(address)
        if known is not None:
            if known.state == "unhealthy":  # back only if it answers: AddWorker on a dead address
                if not await self._probe(known):
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, f"worker {address} does not answer its health check"
                    )
                self._set_state(known, "healthy")
            known.last_seen = time.monotonic()
            return known
        channel = dial(address, self.cluster_token, _CHANNEL_OPTIONS)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        try:
            info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            await channel.close()
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {address} refused the router's cluster token: {e.details()}",
                ) from None
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{address} answered, but is not a Tandem worker (no tandem.worker.v1.WorkerService:"
                    f" {e.details()})",
                ) from None
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"worker {address} did not answer: {e.details()}"
            ) from None
        refusal = None
        if info.model != self.model:
            refusal = f"worker {address} serves {info.model!r}; this router serves {self.model!r}"
        elif info.role not in ROLE_NAMES:
            refusal = f"worker {address} answers an unknown role ({info.role}): not prefill/decode/unified"
        if refusal is not None:
            await channel.close()
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        worker = Worker(
            address=address,
            in_flight=0,
            role=ROLE_NAMES[info.role],
            info=info,
            channel=channel,
            last_seen=time.monotonic(),
            health_channel=dial(address, self.cluster_token, options=_OWN_CONNECTION),
            multiplexed=self.multiplexed,
        )
        self.workers[address] = worker
        logger.info("worker %s joined (%s)", address, worker.role)
        return worker

    @staticmethod
    def seen(worker: Worker) -> None:
        """The worker answered on a stream: as good as a heartbeat."""
        worker.last_seen = time.monotonic()

    def heartbeat(self, address: str) -> bool:
        worker = self.workers.get(address)
        if worker is None:
            return False
        worker.last_seen = time.monotonic()
        if worker.state == "unhealthy":
            self._set_state(worker, "healthy")
        return True

    def drain(self, address: str) -> None:
        worker = self._get(address)
        worker.draining = True
        if worker.state == "healthy":
            worker.state = "draining"
        logger.info("worker %s draining", address)

    async def remove(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is None:
            raise NotFound(f"unknown worker {address!r}")
        worker.down.set()
        for callback in self.on_removed:
            callback(address)
        await worker.channel.close(grace=None)
        if worker.health_channel is not None:
            await worker.health_channel.close(grace=None)
        logger.info("worker %s removed", address)

    def _get(self, address: str) -> Worker:
        if address not in self.workers:
            raise NotFound(f"unknown worker {address!r}")
        return self.workers[address]

    # ---- selection and load --------------------------------------------------------------------

    def available(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role and w.state == "healthy"]

    @contextlib.contextmanager
    def track(self, worker: Worker, tokens: int) -> Iterator[None]:
        """Count a request against a worker's load while it is open."""
        worker.in_flight += 1
        worker.active_tokens += tokens
        worker.requests_total += 1
        try:
            yield
        finally:
            worker.in_flight -= 1
            worker.active_tokens -= tokens

    def max_context_len(self) -> int:
        lens = [w.info.max_context_len for w in self.workers.values() if w.state != "unhealthy"]
        return min(lens) if lens else 0

    # ---- health --------------------------------------------------------------------------------

    async def suspect(self, worker: Worker) -> bool:
        """A call to `worker` failed as if it were gone: probe it now; False (and UNHEALTHY) if so."""
        if await self._probe(worker):
            return True
        if worker.state != "unhealthy":
            self._set_state(worker, "unhealthy")
        return False

    def stalled(self, worker: Worker) -> asyncio.Future[None]:
        """A stream of `worker` made no progress for the stall bound: out of rotation now (a
        retry must not pick it again), HEALTHY again once a probe answers (the future)."""
        if worker.state == "healthy":
            self._set_state(worker, "unhealthy")
        return asyncio.ensure_future(self._recheck(worker))

    async def _recheck(self, worker: Worker) -> None:
        if await self._probe(worker) and worker.state == "unhealthy" and worker.address in self.workers:
            worker.last_seen = time.monotonic()
            self._set_state(worker, "healthy")

    async def monitor(self) -> None:
        """Forever: probe workers whose heartbeats stopped and unhealthy ones; drop long-dead ones."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            now = time.monotonic()
            silent = []
            for worker in list(self.workers.values()):
                if worker.state == "unhealthy" and now - worker.unhealthy_since > self.remove_after_s:
                    await self.remove(worker.address)
                elif worker.state == "unhealthy" or now - worker.last_seen > self.heartbeat_timeout_s:
                    silent.append(worker)
            # At once: one frozen worker's probe timing out does not delay the others'.
            for worker, ok in zip(silent, await asyncio.gather(*map(self._probe, silent))):
                if worker.address not in self.workers:
                    continue
                if ok:
                    worker.last_seen = time.monotonic()
                    if worker.state == "unhealthy":
                        self._set_state(worker, "healthy")
                elif worker.state != "unhealthy":
                    self._set_state(worker, "unhealthy")

    async def _probe(self, worker: Worker) -> bool:
        try:
            reply = await worker.health.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def _set_state(self, worker: Worker, state: str) -> None:
        if state == "healthy" and worker.draining:
            state = "draining"  # answering again, still drained
        logger.log(
            logging.WARNING if state == "unhealthy" else logging.INFO,
            "worker %s is %s",
            worker.address,
            state,
        )
        worker.state = state
        worker.unhealthy_since = time.monotonic() if state == "unhealthy" else 0.0
        if state == "unhealthy":
            worker.down.set()
        else:
            worker.down.clear()
