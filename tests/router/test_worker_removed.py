"""Requests on a worker that goes away under them, against fake workers over loopback gRPC (a QA
pass found each of these): a prefill worker removed while its Prefill call is open (the request
hung, answered by no status at all), a decode worker removed mid-stream (CANCELLED, "the
GenerateMany stream was closed", which no client retries and the gateway made a 500), and a
worker whose engine died but whose health still answers SERVING for a moment (every retry went
back to it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from services.common.errors import ServiceError
from services.common.multiplex import GenerateServicer
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from services.router.orchestrator import Orchestrator, Sample
from services.router.registry import Registry, Worker

DONE = common_pb2.Finish(reason=common_pb2.FINISH_REASON_LENGTH)


class First:
    """A policy that always picks the first worker offered: the retry's choice is the router's."""

    name = "first"

    def select(self, workers: Sequence[Any], text: str, token_ids: list[int]) -> Any:
        return workers[0]

    def on_worker_removed(self, address: str) -> None:
        pass


class Prefill(worker_pb2_grpc.PrefillServiceServicer):
    """Prefill: returns at once and lets the decode side go on, or (`hang`) never returns."""

    def __init__(self, prefilled: dict[str, asyncio.Event], hang: bool = False) -> None:
        self.prefilled, self.hang, self.calls = prefilled, hang, 0
        self.called = asyncio.Event()

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: Any) -> worker_pb2.PrefillResponse:
        self.calls += 1
        self.called.set()
        if self.hang:
            await asyncio.Event().wait()
        self.prefilled.setdefault(request.request.rid, asyncio.Event()).set()
        return worker_pb2.PrefillResponse(prompt_tokens=len(request.request.token_ids))


class Decode(GenerateServicer, worker_pb2_grpc.DecodeServiceServicer):
    """Decode: a reservation, then (once prefilled) two tokens, the last one finishing."""

    batch_type = worker_pb2.GenerateManyResponse

    def __init__(self, prefilled: dict[str, asyncio.Event]) -> None:
        self.prefilled = prefilled

    async def _serve(self, request: Any, metadata: Any) -> AsyncIterator[worker_pb2.GenerateResponse]:
        yield worker_pb2.GenerateResponse(reservation=worker_pb2.Reservation(rid=request.rid))
        await self.prefilled.setdefault(request.rid, asyncio.Event()).wait()
        yield worker_pb2.GenerateResponse(output=common_pb2.Output(token_ids=[7], text="a"))
        yield worker_pb2.GenerateResponse(output=common_pb2.Output(token_ids=[8], text="b", finish=DONE))


class Unified(GenerateServicer, worker_pb2_grpc.WorkerServiceServicer):
    """A unified worker: two tokens; or one token then silence (`stall`); or (`dead`) refusing
    every call as a worker whose engine died does, its health still SERVING."""

    batch_type = worker_pb2.GenerateManyResponse

    def __init__(self, stall: bool = False, dead: bool = False) -> None:
        self.stall, self.dead, self.calls = stall, dead, 0

    async def _serve(self, request: Any, metadata: Any) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.calls += 1
        if self.dead:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the engine process died (exit code -9)")
        yield worker_pb2.GenerateResponse(output=common_pb2.Output(token_ids=[7], text="a"))
        if self.stall:
            await asyncio.Event().wait()
        yield worker_pb2.GenerateResponse(output=common_pb2.Output(token_ids=[8], text="b", finish=DONE))


async def _serve(*servicers: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, worker_pb2_grpc.PrefillServiceServicer):
            worker_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
        elif isinstance(servicer, worker_pb2_grpc.DecodeServiceServicer):
            worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        else:
            worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # SERVING
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _workers(*servicers_and_roles: tuple[Any, str]) -> tuple[Registry, list[grpc.aio.Server]]:
    registry, servers = Registry("m"), []
    for servicer, role in servicers_and_roles:
        server, address = await _serve(servicer)
        servers.append(server)
        registry.workers[address] = Worker(address, 0, role=role, channel=grpc.aio.insecure_channel(address))
    return registry, servers


async def _generate(orchestrator: Orchestrator, received: asyncio.Event | None = None) -> list[int]:
    """The request's token ids; `received` set once the first of them reached the caller."""
    sample = Sample(1, 0, [5, 6, 7], "", common_pb2.SamplingParams(max_new_tokens=2), False, 0)
    ids: list[int] = []
    async for response in orchestrator.generate([sample]):
        ids.extend(response.output.token_ids)
        if received is not None:
            received.set()
    return ids


def test_workers_going_away_under_a_request() -> None:
    async def main() -> None:  # one event loop: grpc.aio keeps its state with the first it ran on
        await _a_removed_prefill_worker_is_retried_on_another()
        await _a_removed_decode_worker_ends_its_streams_unavailable()
        await _a_retry_goes_to_another_worker_than_the_one_that_failed()

    asyncio.run(main())


async def _a_removed_prefill_worker_is_retried_on_another() -> None:
    prefilled: dict[str, asyncio.Event] = {}
    hanging, other = Prefill(prefilled, hang=True), Prefill(prefilled)
    registry, servers = await _workers(
        (hanging, "prefill"), (other, "prefill"), (Decode(prefilled), "decode")
    )
    orchestrator = Orchestrator(registry, First(), First(), First())
    request = asyncio.ensure_future(_generate(orchestrator))
    await asyncio.wait_for(hanging.called.wait(), 10)
    await registry.remove(next(iter(registry.workers)))  # the hanging one, the first
    assert await asyncio.wait_for(request, 10) == [7, 8]  # retried, not hanging without a status
    assert (hanging.calls, other.calls) == (1, 1)
    assert orchestrator.in_flight == 0
    for server in servers:
        await server.stop(None)


async def _a_removed_decode_worker_ends_its_streams_unavailable() -> None:
    registry, servers = await _workers((Unified(stall=True), "unified"))
    orchestrator = Orchestrator(registry, First(), First(), First())
    received = asyncio.Event()
    request = asyncio.ensure_future(_generate(orchestrator, received))
    await asyncio.wait_for(received.wait(), 10)
    address = next(iter(registry.workers))
    await registry.remove(address)
    with pytest.raises(ServiceError) as e:
        await asyncio.wait_for(request, 10)
    # A token went out: no retry, and a status a client may retry (the gateway's 503), not CANCELLED.
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert e.value.message.startswith(f"unified worker {address} was removed from the router"), (
        e.value.message
    )
    assert orchestrator.in_flight == 0
    for server in servers:
        await server.stop(None)


async def _a_retry_goes_to_another_worker_than_the_one_that_failed() -> None:
    dead, alive = Unified(dead=True), Unified()
    registry, servers = await _workers((dead, "unified"), (alive, "unified"))
    orchestrator = Orchestrator(registry, First(), First(), First())
    assert await asyncio.wait_for(_generate(orchestrator), 10) == [7, 8]
    # The dead one answers its health probe: it stays in rotation, but not for this request.
    assert (dead.calls, alive.calls) == (1, 1)
    assert all(w.state == "healthy" for w in registry.workers.values())
    for server in servers:
        await server.stop(None)
