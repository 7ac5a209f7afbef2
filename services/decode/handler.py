"""DecodeService: the decode half of the PD hand-off.

Generate   register the prompt (no pages yet) -> send the Reservation (our agent, layout,
           transport; at once, before the engine has answered; none for a prompt that
           generates nothing, max_new_tokens 0, which the engine finishes at once) -> the
           engine accepts or refuses it -> (prefill reserves, writes + commits) -> stream
           outputs, with a keepalive after each silent quarter of `stall_timeout_ms` (waiting
           for the prefill side, queued), UNAVAILABLE once the engine has not answered for all
           of it. A cancelled call aborts the request; the engine keeps the pages of a
           reservation whose KV may still be written until that write is over.
ReserveKv  the prefill worker asks for pages when the prompt starts computing (just in time);
           answered once there is room. A cancelled call aborts the request.
WriteKv    the gRPC transport: the prompt's pages as a byte stream, then the commit record.
GetTransferMetadata  the NIXL agent metadata prefill workers need once.
GenerateMany  Generate calls as streams of one call (the router holds one per decode worker;
           services/common/multiplex.py).

Each Generate is a `decode` span (continuing the router's trace) and feeds the worker's token
latency histograms; its time to first token includes the prefill and the KV transfer.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.convert import output_to_proto, prompt_from_proto
from services.common.errors import ServiceError, grpc_errors
from services.common.kv_stream import receive_kv, serve_write_kv
from services.common.multiplex import GenerateServicer, Metadata
from services.common.tracing import server_span
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.worker.engine import AsyncEngine, Keepalive
from services.worker.metrics import WorkerMetrics, annotate_generation
from services.worker.server import TRANSPORTS, keepalive
from shared.outputs import RequestOutput


class DecodeServicer(GenerateServicer, worker_pb2_grpc.DecodeServiceServicer):
    batch_type = worker_pb2.GenerateManyResponse

    def __init__(self, engine: AsyncEngine, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.agent_name = engine.client.agent_name
        self.metrics = metrics

    async def _serve(
        self, request: worker_pb2.GenerateRequest, metadata: Metadata
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One generation, a Generate call's or a GenerateMany stream's."""
        client = self.engine.client
        clock = self.metrics.clock()
        last: RequestOutput | None = None
        with self.engine.admit(), server_span("decode", metadata) as span:
            try:
                prompt = prompt_from_proto(request)
                expected = self.engine.expect_kv(
                    request.rid, prompt, request.kv_lease_ms / 1000 if request.kv_lease_ms else None
                )
                try:
                    # The router starts the prefill leg on this message: it does not wait for
                    # the engine's acceptance, which a busy engine gives only between steps (a
                    # refusal follows as this call's error, and the router drops the prefill leg).
                    # A prompt that generates nothing needs no KV: its finished output comes
                    # instead, and the router starts no prefill leg.
                    if prompt.params.get("max_new_tokens") != 0:
                        yield worker_pb2.GenerateResponse(
                            reservation=worker_pb2.Reservation(
                                rid=request.rid,
                                agent_name=self.agent_name,
                                page_size=client.page_size,
                                kv_layout=client.kv_layout,
                                kv_transport=TRANSPORTS[client.kv_transport],
                                tp_size=client.tp_size,
                            )
                        )
                    stream = await expected.accepted(request.stall_timeout_ms / 1000)
                    async for out in stream.outputs(request.stall_timeout_ms / 1000, coalesce=True):
                        if isinstance(out, Keepalive):  # waiting for the prefill worker, or queued
                            yield keepalive(last)
                            continue
                        last = out
                        if out.finished and out.finish_reason and out.finish_reason["type"] == "abort":
                            raise ServiceError(
                                grpc.StatusCode.UNAVAILABLE, out.finish_reason.get("message", "aborted")
                            )
                        clock.add(len(out.new_ids))
                        yield worker_pb2.GenerateResponse(output=output_to_proto(out))
                    clock.finish()
                finally:
                    expected.stream.close()
            finally:
                annotate_generation(span, request.rid, last, clock)

    @grpc_errors
    async def ReserveKv(
        self, request: worker_pb2.ReserveKvRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReserveKvResponse:
        with server_span("reserve_kv", context.invocation_metadata()) as span:
            pages = await self.engine.reserve_kv(request.rid)
            if span.is_recording():
                span.set_attributes({"tandem.rid": request.rid, "tandem.kv_pages": len(pages)})
            return worker_pb2.ReserveKvResponse(page_ids=pages)

    @grpc_errors
    async def GetTransferMetadata(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetTransferMetadataResponse:
        metadata = self.engine.client.agent_metadata
        if metadata is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, "this decode worker uses the gRPC KV transport"
            )
        return worker_pb2.GetTransferMetadataResponse(agent_name=self.agent_name, metadata=metadata)

    @grpc_errors
    async def WriteKv(
        self, request_iterator: AsyncIterable[bytes], context: grpc.aio.ServicerContext
    ) -> worker_pb2.WriteKvResponse:
        """Raw WriteKvRequest messages (`serve_write_kv`): the pages, then the commit record."""
        commit, payload = await receive_kv(request_iterator)
        self.engine.commit_kv(commit, payload)
        return worker_pb2.WriteKvResponse()


def add_servicers(
    server: grpc.aio.Server, engine: AsyncEngine, args: argparse.Namespace, metrics: WorkerMetrics
) -> list[ServiceDescriptor]:
    """Serve DecodeService on `server` (services.worker.server.AddRoleServicers)."""
    servicer = DecodeServicer(engine, metrics)
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    serve_write_kv(server, servicer.WriteKv)
    return [worker_pb2.DESCRIPTOR.services_by_name["DecodeService"]]
