"""A worker process: gRPC server (WorkerService + the role's service + health + reflection) over
one engine.

Life of a worker: parse flags -> start the engine process (it loads the model) -> serve gRPC
(and Prometheus /metrics with --metrics-port) -> register with the router (if --router) and
heartbeat -> on SIGTERM/SIGINT stop taking calls, give running calls a grace period, stop the
engine, flush traces. If the engine process dies, open calls fail UNAVAILABLE at once and the
worker shuts down the same way and exits 1, for `tandem up` or Kubernetes to restart it. With
`--node-rank N > 0` (multi-node tensor parallelism) it only runs that node's ranks instead
(`node.py`).

With a cluster token (--cluster-token, $TANDEM_CLUSTER_TOKEN or --cluster-token-file) every RPC
but grpc.health.v1 and reflection wants it (UNAUTHENTICATED otherwise), and the worker's own calls
(to the router's admin port; a prefill worker's to decode workers) carry it: only the router,
which holds the token, can make a worker run a request or, through `Prefill`, make it dial a
decode worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.auth import CLUSTER_TOKEN_ENV, dial, secret_interceptors, secrets_from_args
from services.common.convert import (
    embed_options_to_dict,
    embedding_to_proto,
    output_to_proto,
    prompt_from_proto,
)
from services.common.errors import ServiceError, grpc_errors
from services.common.health import Health
from services.common.listen import EXCLUSIVE_PORT, listen
from services.common.metrics import serve_metrics
from services.common.multiplex import GenerateServicer, Metadata, drain_sessions
from services.common.parent import die_with_launcher
from services.common.reflection import add_reflection
from services.common.tracing import server_span, setup_tracing
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.worker.args import engine_config, served_model_name
from services.worker.engine import MIN_ENGINE_SILENCE_S, AsyncEngine, Keepalive
from services.worker.metrics import EngineStats, WorkerMetrics, annotate_generation
from services.worker.node import host_ranks
from services.worker.ucx import keep_kv_transfers_on
from shared.errors import InvalidRequest
from shared.outputs import RequestOutput

logger = logging.getLogger(__name__)

ROLES = {
    "unified": common_pb2.WORKER_ROLE_UNIFIED,
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
}
SERVICE_MODULES = {"unified": "worker", "prefill": "prefill", "decode": "decode"}  # python -m services.X
TRANSPORTS = {"nixl": worker_pb2.KV_TRANSPORT_NIXL, "grpc": worker_pb2.KV_TRANSPORT_GRPC}


class WorkerServicer(GenerateServicer, worker_pb2_grpc.WorkerServiceServicer):
    batch_type = worker_pb2.GenerateManyResponse

    def __init__(self, engine: AsyncEngine, role: str, model: str, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.role = role
        self.model = model
        self.metrics = metrics

    @grpc_errors
    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> worker_pb2.GetInfoResponse:
        c = self.engine.client
        return worker_pb2.GetInfoResponse(
            role=ROLES[self.role],
            model=self.model,
            max_context_len=c.max_context_len,
            vocab_size=c.vocab_size,
            page_size=c.page_size,
            kv_layout=c.kv_layout,
            kv_transport=TRANSPORTS[c.kv_transport]
            if self.role != "unified"
            else worker_pb2.KV_TRANSPORT_UNSPECIFIED,
            tp_size=c.tp_size,
        )

    @grpc_errors
    async def GetLoad(self, request: Any, context: grpc.aio.ServicerContext) -> worker_pb2.GetLoadResponse:
        try:  # bounded: a frozen engine gives a clear error, not a call that never ends
            stats = await asyncio.wait_for(self.engine.stats(), _LOAD_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"the engine did not answer within {_LOAD_TIMEOUT_S:g} s"
            ) from None
        fields = {f: stats.pop(f) for f in _LOAD_FIELDS}
        return worker_pb2.GetLoadResponse(**fields, counters=stats)

    async def _serve(
        self, request: worker_pb2.GenerateRequest, metadata: Metadata
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One generation, a Generate call's or a GenerateMany stream's."""
        if self.role != "unified":
            raise InvalidRequest(f"a {self.role} worker does not serve WorkerService.Generate")
        clock = self.metrics.clock()
        last: RequestOutput | None = None
        with self.engine.admit(), server_span("generate", metadata) as span:
            try:
                stream = await self.engine.generate(
                    request.rid, prompt_from_proto(request), stall_s=request.stall_timeout_ms / 1000
                )
                async for out in stream.outputs(request.stall_timeout_ms / 1000, coalesce=True):
                    if isinstance(out, Keepalive):
                        yield keepalive(last)
                        continue
                    last = out
                    clock.add(len(out.new_ids))
                    yield worker_pb2.GenerateResponse(output=output_to_proto(out))
                clock.finish()
            finally:
                annotate_generation(span, request.rid, last, clock)

    @grpc_errors
    async def Embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        if self.role != "unified":
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"embeddings run on unified workers; this is a {self.role} worker",
            )
        pooling = embed_options_to_dict(request.options)
        with self.engine.admit(), server_span("embed", context.invocation_metadata()) as span:
            span.set_attribute("tandem.inputs", len(request.inputs))
            # Every input at once: the engine batches their prompts. The first failure cancels
            # the rest (each cancelled wait aborts its request in the engine).
            calls = [
                self.engine.embed(f"{request.rid}-{i}", list(inp.ids), pooling)
                for i, inp in enumerate(request.inputs)
            ]
            tasks = [asyncio.ensure_future(c) for c in calls]
            try:
                outs = await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        return worker_pb2.EmbedResponse(embeddings=[embedding_to_proto(i, o) for i, o in enumerate(outs)])


def keepalive(last: RequestOutput | None) -> worker_pb2.GenerateResponse:
    """A stream's sign of life: nothing to send yet, but this worker and its engine are alive."""
    return worker_pb2.GenerateResponse(
        keepalive=worker_pb2.Keepalive(phase="waiting" if last is None else "running")
    )


_LOAD_FIELDS = [
    "running_requests",
    "waiting_requests",
    "kv_free_tokens",
    "kv_evictable_tokens",
    "kv_used_tokens",
    "kv_total_tokens",
]

# Adds a role's servicers to the server; returns the services it added (listed by reflection).
AddRoleServicers = Callable[
    [grpc.aio.Server, AsyncEngine, argparse.Namespace, WorkerMetrics], Sequence[ServiceDescriptor]
]
_STATS_TIMEOUT_S = 1.0  # a scrape waits this long for the engine (it answers between steps)
_STATS_MAX_AGE_S = 15.0  # then takes its last answer if that is this recent
_LOAD_TIMEOUT_S = 5.0  # GetLoad waits this long
_ENGINE_WATCH_S = 0.5  # how often the worker looks whether its engine process still lives


async def serve(
    args: argparse.Namespace, role: str, add_role_servicers: AddRoleServicers | None = None
) -> None:
    cluster_token = secrets_from_args(args, "cluster-token", CLUSTER_TOKEN_ENV)
    die_with_launcher()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    tracing = setup_tracing("tandem-worker" if role == "unified" else f"tandem-{role}")
    config = engine_config(args, role)
    if config.node_rank > 0:  # multi-node tensor parallelism: node 0's worker serves
        raise SystemExit(await host_ranks(config, args.host, args.port, args.metrics_port))
    if role != "unified":
        keep_kv_transfers_on(args.host)  # before the engine process starts: it inherits it
    # The model loads in the engine process; nothing to serve before.
    engine = AsyncEngine(config, args.max_open_requests)
    model = served_model_name(args)

    engine_stats = EngineStats(engine.client.stats, _STATS_TIMEOUT_S, _STATS_MAX_AGE_S)
    metrics = WorkerMetrics(role, model, engine_stats)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), EXCLUSIVE_PORT],
        interceptors=secret_interceptors(cluster_token, "cluster token"),
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(engine, role, model, metrics), server)
    services = [worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]]
    if add_role_servicers is not None:
        services += add_role_servicers(server, engine, args, metrics)
    health_status = Health(services)
    health_status.add_to(server)
    add_reflection(server, services)
    port = listen(server, f"{args.host}:{args.port}", f"python -m services.{SERVICE_MODULES[role]}")
    await server.start()
    address = args.advertise_address or f"{args.host}:{port}"
    await health_status.set(True)
    metrics_url, stop_metrics = serve_metrics(metrics.registry, args.host, args.metrics_port)
    if metrics_url:
        print(f"tandem {role} worker metrics on {metrics_url}", flush=True)
    print(f"tandem {role} worker serving on {address}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.Event()
    serving.set()
    watcher = asyncio.create_task(_watch_engine(engine, health_status, serving, stop))
    heartbeat = (
        asyncio.create_task(_register_and_heartbeat(args.router, cluster_token.first, address, stop, serving))
        if args.router
        else None
    )
    await stop.wait()
    engine_gone = engine.client.error is not None
    if engine_gone and args.router:  # routed to no more now, not after its heartbeat timeout
        await _leave_router(args.router, cluster_token.first, address)
    engine.closing = True  # no new generations, on open GenerateMany calls either
    # The router's calls end once their streams have.
    drain_sessions("the worker's engine is gone" if engine_gone else "the worker is shutting down")
    watcher.cancel()
    await health_status.enter_graceful_shutdown()
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
    await server.stop(grace=5)
    stop_metrics()
    engine.shutdown()
    tracing.shutdown()
    if engine_gone:  # for the supervisor (tandem up, Kubernetes) to start this worker afresh
        raise SystemExit(1)


async def _watch_engine(
    engine: AsyncEngine,
    health_status: Health,
    serving: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    """Keep the worker's health true to its engine, pinging it every `_ENGINE_WATCH_S` (its
    answers are also what the streams' keepalives vouch for):

    - an engine silent for `MIN_ENGINE_SILENCE_S` (frozen, or stuck in a step) takes the worker
      to NOT_SERVING and pauses its heartbeats (`serving` cleared), so the router's probe takes
      it out of rotation; it serves again once the engine answers;
    - an engine process that died does so for good: open calls already failed with
      UNAVAILABLE; the worker goes NOT_SERVING, stops its heartbeats, leaves the router's list
      and shuts down (`stop`), exiting 1, so that its supervisor starts a fresh one (crash-only:
      a worker without an engine only holds its address and, under `tandem up` or a
      Deployment, its GPU)."""
    while engine.client.error is None:
        engine.ping()
        frozen = engine.silent_for() >= MIN_ENGINE_SILENCE_S
        if frozen == serving.is_set():  # the engine froze, or answers again
            if frozen:
                logger.warning("the engine has not answered for %.1f s: not serving", engine.silent_for())
                serving.clear()
                await health_status.set(False)
            else:
                logger.info("the engine answers again: serving")
                serving.set()
                await health_status.set(True)
        await asyncio.sleep(_ENGINE_WATCH_S)
    logger.error("the engine is gone (%s): this worker stops, exit status 1", engine.client.error)
    serving.clear()
    await health_status.set(False)
    stop.set()


async def _leave_router(router: str, token: str | None, address: str) -> None:
    """Take this worker off the router's list (its engine is gone); a router that does not
    answer finds out from the missed heartbeats instead."""
    try:
        async with dial(router, token) as channel:
            admin = router_pb2_grpc.RouterAdminServiceStub(channel)
            await admin.RemoveWorker(router_pb2.RemoveWorkerRequest(address=address), timeout=2)
    except grpc.aio.AioRpcError as e:
        logger.warning("router %s: could not leave: %s", router, e.details() or e.code())


# The router's answers that another try will not change (an operator must act): backed off.
_REFUSALS = {
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
}
_REFUSED_WAIT_MAX_S = 30.0


async def _register_and_heartbeat(
    router: str,
    token: str | None,
    address: str,
    stop: asyncio.Event,
    serving: asyncio.Event,
) -> None:
    """Register with the router's admin port, then heartbeat while the engine answers
    (`serving`) until the worker stops; re-register whenever the router forgot us. A router
    that refuses us (another model, a wrong cluster token: an operator must act) is asked again
    less and less often, up to every `_REFUSED_WAIT_MAX_S`, and each new reason logged once."""
    interval = 1.0
    refusals = 0  # in a row
    logged = ""  # the last failure logged
    async with dial(router, token) as channel:
        admin = router_pb2_grpc.RouterAdminServiceStub(channel)
        registered = False
        while not stop.is_set():
            wait = interval
            try:
                if not serving.is_set():
                    pass  # a frozen engine: silence, so the router probes us and finds NOT_SERVING
                elif not registered:  # waits for a router still starting, quietly (wait_for_ready)
                    reply = await admin.RegisterWorker(
                        router_pb2.RegisterWorkerRequest(address=address), timeout=10, wait_for_ready=True
                    )
                    interval = max(reply.heartbeat_interval_ms, 100) / 1000
                    registered = True
                    logger.info("registered with the router at %s", router)
                else:
                    beat = await admin.Heartbeat(router_pb2.HeartbeatRequest(address=address), timeout=5)
                    registered = beat.known
                refusals, logged = 0, ""
            except grpc.aio.AioRpcError as e:
                message = f"router {router}: {e.details() or e.code()}"
                if message != logged:
                    logger.warning("%s", message)
                    logged = message
                registered = False
                refusals = refusals + 1 if e.code() in _REFUSALS else 0
                wait = min(interval * 2**refusals, _REFUSED_WAIT_MAX_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
