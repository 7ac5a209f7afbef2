"""The router's Embed: all inputs to one unified worker, retried on a fresh one when a worker is
unavailable, and refused (FAILED_PRECONDITION) by a deployment of prefill/decode pairs only."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from services.common.errors import ServiceError
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.router.orchestrator import Orchestrator
from services.router.policies import create_policy
from services.router.registry import Registry, Worker


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Answers Embed with [len(ids), first id] per input; the first call fails with `fail_first`."""

    def __init__(self, fail_first: grpc.StatusCode | None = None) -> None:
        self.fail_first = fail_first
        self.calls: list[worker_pb2.EmbedRequest] = []

    async def Embed(self, request: worker_pb2.EmbedRequest, context: Any) -> worker_pb2.EmbedResponse:
        self.calls.append(request)
        if self.fail_first is not None and len(self.calls) == 1:
            await context.abort(self.fail_first, "fake failure")
        return worker_pb2.EmbedResponse(
            embeddings=[
                common_pb2.Embedding(index=i, values=[len(t.ids), t.ids[0]], prompt_tokens=len(t.ids))
                for i, t in enumerate(request.inputs)
            ]
        )


async def _serve(servicer: FakeWorker) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _orchestrator(workers: list[Worker]) -> Orchestrator:
    registry = Registry("m")
    registry.workers = {w.address: w for w in workers}
    policy = create_policy("round_robin")
    return Orchestrator(registry, create_policy("round_robin"), create_policy("round_robin"), policy)


def test_embed_routing() -> None:
    # One event loop for every check: grpc.aio keeps its state with the first loop it ran on.
    async def main() -> None:
        await _pd_only_refuses()
        await _one_unified_worker_and_a_retry()

    asyncio.run(main())


async def _pd_only_refuses() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never dialled
    workers = [
        Worker("p:1", 0, role="prefill", channel=channel),
        Worker("d:1", 0, role="decode", channel=channel),
    ]
    with pytest.raises(ServiceError) as e:
        await _orchestrator(workers).embed(1, [[5, 6]], common_pb2.EmbedOptions())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "unified" in e.value.message
    await channel.close()


async def _one_unified_worker_and_a_retry() -> None:
    fake = FakeWorker(fail_first=grpc.StatusCode.RESOURCE_EXHAUSTED)
    server, address = await _serve(fake)
    channel = grpc.aio.insecure_channel(address)
    worker = Worker(address, 0, channel=channel)
    orchestrator = _orchestrator([worker])
    answer, chosen = await orchestrator.embed(7, [[5, 6, 7], [9]], common_pb2.EmbedOptions())
    assert chosen == address
    assert [list(e.values) for e in answer.embeddings] == [[3.0, 5.0], [1.0, 9.0]]
    assert len(fake.calls) == 2  # all inputs in one call; the refused attempt retried
    assert orchestrator.in_flight == 0 and worker.in_flight == 0
    await channel.close()
    await server.stop(None)
