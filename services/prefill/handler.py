"""PrefillService: the prefill half of the PD hand-off.

Prefill(request, reservation, decode_address)
    When the engine starts computing the prompt it asks for the decode worker's pages; we get
    them from the decode worker (ReserveKv: just in time, it may wait there for room) and hand
    them to the engine (a reservation with pages already in it is used as it is). Then
    NIXL: (the decode engine's agent learnt once, GetTransferMetadata) the engine writes the
          pages straight into the reservation, committing them with the first token; we
          answer once the writes are done.
    gRPC: the engine hands back the pages as bytes and the commit record; we stream them
          to the decode worker's WriteKv.
A reservation from a decode worker of another `--tp-size` or KV layout is refused
(FAILED_PRECONDITION). A cancelled call aborts the request; the engine frees its pages once no
write reads them. An engine that has not answered for the request's `stall_timeout_ms` fails
the call (UNAVAILABLE): the router cannot see that itself, as this call streams nothing.

`decode_address` is the one worker address this service takes from a request, and it dials it
(ReserveKv, WriteKv, GetTransferMetadata, with the cluster token). Only the router sets it, from
its registry: with a cluster token configured, `Prefill` itself answers only callers holding the
token (services/worker/server.py), so no client can point a prefill worker at a host of its
choosing. Without a token the worker must not be reachable by untrusted clients (docs/security.md).

Decode workers come and go (scaled down, restarted at a new address): one sent no prompt for
`--forget-decode-after` seconds (600) is forgotten, its channel closed and its NIXL agent removed
from the engine (once no write goes there); a decode worker that comes back under another agent
name at the same address has its old agent removed at once. Either is learnt again when next
chosen.

Each call is a `prefill` span (continuing the router's trace) with a `kv_transfer` child timed
from the first page write posted to the last write done: the engine stamps both (NIXL writes
run there); with gRPC the engine stamps the read of the pages and we end it when WriteKv
returns.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import time

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace

from services.common.auth import CLUSTER_TOKEN_ENV, dial, secrets_from_args
from services.common.convert import prompt_from_proto
from services.common.errors import ServiceError, call, grpc_errors
from services.common.kv_stream import send_kv
from services.common.tracing import describe, outgoing_metadata, record_span, server_span
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.worker.engine import AsyncEngine, Keepalive
from services.worker.metrics import WorkerMetrics
from shared.outputs import RequestOutput
from shared.transfer.records import KvTarget

logger = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: WorkerMetrics,
        cluster_token: str | None = None,
        forget_after_s: float = 600.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.cluster_token = cluster_token
        self.forget_after_s = forget_after_s
        self._peers: dict[str, asyncio.Task[str]] = {}  # decode agent name -> its registration
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Per decode address: the agent name last learnt there, calls open to it, when one last
        # began or ended (time.monotonic()).
        self._agents: dict[str, str] = {}
        self._open: collections.Counter[str] = collections.Counter()
        self._used: dict[str, float] = {}
        self._sweeper = asyncio.get_running_loop().create_task(self._forget_idle())

    @grpc_errors
    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        with self.engine.admit(), server_span("prefill", context.invocation_metadata()) as span:
            if span.is_recording():
                span.set_attributes(
                    {"tandem.rid": request.request.rid, "tandem.decode_worker": request.decode_address}
                )
            address = request.decode_address
            self._open[address] += 1
            self._used[address] = time.monotonic()
            try:
                response = await self._prefill(request, context.time_remaining())
            finally:
                self._open[address] -= 1
                self._used[address] = time.monotonic()
            if span.is_recording():
                span.set_attributes(
                    {
                        "tandem.prompt_tokens": response.prompt_tokens,
                        "tandem.cached_tokens": response.cached_tokens,
                        "tandem.kv_bytes": response.kv_bytes,
                    }
                )
            return response

    async def _prefill(
        self, request: worker_pb2.PrefillRequest, timeout: float | None
    ) -> worker_pb2.PrefillResponse:
        client = self.engine.client
        res, req = request.reservation, request.request
        if (res.tp_size or 1) != client.tp_size:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tensor-parallel size mismatch: decode worker {request.decode_address} runs"
                f" tp_size={res.tp_size or 1}, this prefill worker tp_size={client.tp_size}; a"
                " prefill/decode pair must use the same --tp-size (heterogeneous TP is not"
                " supported yet)",
            )
        if res.kv_layout != client.kv_layout:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layout mismatch: decode {res.kv_layout}, prefill {client.kv_layout}"
                " (same model, dtype and page size on both sides?)",
            )
        if res.kv_transport == worker_pb2.KV_TRANSPORT_NIXL:
            if client.kv_transport != "nixl":
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "the decode worker uses NIXL and this prefill worker has no NIXL",
                )
            await self._ensure_peer(res.agent_name, request.decode_address)
            target = KvTarget("nixl", list(res.page_ids), res.agent_name)
        else:
            target = KvTarget("grpc", list(res.page_ids))
        stream = await self.engine.generate(
            req.rid, prompt_from_proto(req), kv_target=target, stall_s=req.stall_timeout_ms / 1000
        )
        final: RequestOutput | None = None
        async for out in stream.outputs(req.stall_timeout_ms / 1000):  # fails if the engine froze
            if isinstance(out, Keepalive):
                continue
            if out.kv_pages_wanted:
                pages = await self._reserve_for(request.decode_address, req.rid, timeout)
                self.engine.set_kv_target(req.rid, pages)
                target = KvTarget(target.transport, pages, target.peer)  # for the transfer's span
                continue
            final = out
        assert final is not None and final.finish_reason is not None
        if final.finish_reason["type"] != "transferred":
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, final.finish_reason.get("message", "prefill failed")
            )
        start, end, error = final.kv_transfer_start, final.kv_transfer_end, None
        try:
            if final.kv_commit is not None:  # the gRPC transport: the pages go out from here
                assert final.kv_payload is not None
                await self._write_kv(request.decode_address, req.rid, final.kv_payload, final.kv_commit)
                end = time.time()
        except BaseException as e:
            error, end = describe(e), time.time()
            if isinstance(e, Exception):  # a cancelled call is not a failed transfer
                self.metrics.kv_transfer_failures += 1
            raise
        finally:
            if start:  # 0: the engine did not time it
                self._transfer_done(start, end, error, target, final.kv_bytes, request.decode_address)
        return worker_pb2.PrefillResponse(
            prompt_tokens=final.prompt_tokens,
            cached_tokens=final.cached_tokens,
            first_token_id=final.new_ids[0],
            kv_bytes=final.kv_bytes,
        )

    def _transfer_done(
        self, start: float, end: float, error: str | None, target: KvTarget, kv_bytes: int, peer: str
    ) -> None:
        if error is None:
            self.metrics.kv_transfer_seconds.observe(max(end - start, 0.0))
        if trace.get_current_span().is_recording():
            attributes = {
                "tandem.kv_transport": target.transport,
                "tandem.kv_bytes": kv_bytes,
                "tandem.kv_pages": len(target.pages),
                "tandem.kv_peer": peer,
            }
            record_span("kv_transfer", start, end, attributes, error)

    async def _ensure_peer(self, agent_name: str, decode_address: str) -> None:
        """Learn a decode engine's NIXL agent the first time it is a target (once per pair)."""
        known = self._agents.get(decode_address)
        if known != agent_name:
            if known is not None:  # the decode worker there started again, a new engine
                self._forget_agent(known)
            self._agents[decode_address] = agent_name
        task = self._peers.get(agent_name)
        if task is None:
            task = asyncio.ensure_future(self._add_peer(decode_address))
            self._peers[agent_name] = task
        try:
            await asyncio.shield(task)
        except Exception:
            self._peers.pop(agent_name, None)  # try again next time
            raise

    async def _add_peer(self, decode_address: str) -> str:
        stub = worker_pb2_grpc.DecodeServiceStub(self._channel(decode_address))
        reply = await call(stub.GetTransferMetadata(worker_pb2.GetTransferMetadataRequest(), timeout=10))
        return await self.engine.add_peer(reply.metadata)

    async def _reserve_for(self, decode_address: str, rid: str, timeout: float | None) -> list[int]:
        """`_reserve`, not cancelled with this call: pages the decode engine granted as the call
        was cancelled still reach our engine, which has aborted the request and tells the decode
        engine at once that nothing will be written there. Lost, they stayed held there for two
        leases (60 s by default) in case a NIXL write of ours could still land."""
        reserve = asyncio.ensure_future(self._reserve(decode_address, rid, timeout))
        try:
            return await asyncio.shield(reserve)
        except asyncio.CancelledError:
            reserve.add_done_callback(lambda done: self._late_pages(rid, done))
            raise

    def _late_pages(self, rid: str, reserve: asyncio.Future[list[int]]) -> None:
        if not reserve.cancelled() and reserve.exception() is None:
            self.engine.set_kv_target(rid, reserve.result())

    async def _reserve(self, decode_address: str, rid: str, timeout: float | None) -> list[int]:
        stub = worker_pb2_grpc.DecodeServiceStub(self._channel(decode_address))
        request = worker_pb2.ReserveKvRequest(rid=rid)
        reply = await call(stub.ReserveKv(request, timeout=timeout, metadata=outgoing_metadata()))
        return list(reply.page_ids)

    async def _write_kv(self, decode_address: str, rid: str, payload: memoryview, commit: bytes) -> None:
        await call(send_kv(self._channel(decode_address), rid, payload, commit))

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = dial(address, self.cluster_token)
        return self._channels[address]

    # ---- forgetting decode workers -------------------------------------------------------------

    async def _forget_idle(self) -> None:
        """Every quarter of `forget_after_s` (at most 30 s): forget the decode workers sent no
        prompt for `forget_after_s`, with no call open to them."""
        while True:
            await asyncio.sleep(min(self.forget_after_s / 4, 30.0))
            now = time.monotonic()
            for address, used in list(self._used.items()):
                if not self._open[address] and now - used >= self.forget_after_s:
                    logger.info("forgetting decode worker %s: sent no prompt for %.0f s", address, now - used)
                    await self._forget_address(address)

    async def _forget_address(self, address: str) -> None:
        del self._used[address], self._open[address]
        agent = self._agents.pop(address, None)
        if agent is not None:
            self._forget_agent(agent)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    def _forget_agent(self, agent: str) -> None:
        self._peers.pop(agent, None)
        self.engine.remove_peer(agent)  # the engine waits for writes still going there


def add_servicers(
    server: grpc.aio.Server, engine: AsyncEngine, args: argparse.Namespace, metrics: WorkerMetrics
) -> list[ServiceDescriptor]:
    """Serve PrefillService on `server` (services.worker.server.AddRoleServicers)."""
    token = secrets_from_args(args, "cluster-token", CLUSTER_TOKEN_ENV).first
    servicer = PrefillServicer(engine, metrics, token, args.forget_decode_after)
    worker_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
    return [worker_pb2.DESCRIPTOR.services_by_name["PrefillService"]]
