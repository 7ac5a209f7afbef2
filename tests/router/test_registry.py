"""The worker registry's membership rules (a QA pass found each of these): a drain outlasts an
unhealthy spell, a worker address names a dialable port, a gRPC server that is no Tandem worker
is told so, and an unhealthy worker added again comes back only if it answers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from services.common.errors import ServiceError
from services.router.registry import Registry, Worker, check_address
from shared.errors import InvalidRequest


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "[::1]:80", "worker-0.tandem:65535", "h:1"])
def test_a_worker_address_is_host_and_port(address: str) -> None:
    check_address(address)


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "h:0", "::::", "host:", ":80", "host", "", "h:8o"])
def test_a_bad_worker_address_is_refused_before_dialling(address: str) -> None:
    # 99999 was dialled as 34463 (99999 mod 65536) and refused as UNAVAILABLE.
    with pytest.raises(InvalidRequest, match="host:port with a port of 1-65535") as e:
        check_address(address)
    assert e.value.param == "address"


def test_registry_membership() -> None:
    async def main() -> None:  # one event loop: grpc.aio keeps its state with the first it ran on
        await _a_drain_outlasts_an_unhealthy_spell()
        await _a_grpc_server_that_is_no_worker_is_told_so()
        await _an_unhealthy_worker_added_again_must_answer()

    asyncio.run(main())


async def _a_drain_outlasts_an_unhealthy_spell() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")  # nothing there: probes fail
    registry = Registry("m")
    worker = registry.workers["w:1"] = Worker("w:1", 0, role="unified", channel=channel)
    registry.drain("w:1")
    assert worker.state == "draining" and registry.available("unified") == []
    assert not await registry.suspect(worker)  # a late heartbeat: probed, no answer
    assert worker.state == "unhealthy"
    assert registry.heartbeat("w:1")  # back: still drained, not in rotation again
    assert worker.state == "draining" and registry.available("unified") == []
    await channel.close()


async def _a_grpc_server_that_is_no_worker_is_told_so() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    with pytest.raises(ServiceError) as e:
        await Registry("m").register(address)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION  # not UNAVAILABLE: a retry won't help
    assert e.value.message.startswith(f"{address} answered, but is not a Tandem worker"), e.value.message
    await server.stop(None)


async def _an_unhealthy_worker_added_again_must_answer() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    registry = Registry("m")
    worker = registry.workers["127.0.0.1:1"] = Worker("127.0.0.1:1", 0, channel=channel)
    assert not await registry.suspect(worker)
    with pytest.raises(ServiceError) as e:  # it was marked healthy unprobed, and requests failed
        await registry.register("127.0.0.1:1")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert e.value.message == "worker 127.0.0.1:1 does not answer its health check"
    assert worker.state == "unhealthy"
    await channel.close()
