"""A tensor-parallel worker (`python -m services.worker --tp-size 2`) whose follower rank is
SIGKILLed, mid-request or idle: the request fails UNAVAILABLE naming the rank, the engine process
exits, the worker stays up but reports NOT_SERVING, and nothing waits on the dead rank."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.startup import children
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.suite.cluster import Cluster, Service, running

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds ranks through /proc")

_BOUND_S = 10.0  # each failure is seen well within this


def test_a_killed_rank_fails_its_request_and_takes_the_worker_out_of_service(
    tiny_llama: Path, tmp_path: Path
) -> None:
    with Cluster(tiny_llama, tmp_path) as cluster:
        busy, idle = cluster.start_workers([("unified", "--tp-size", "2")] * 2, register=False)
        for worker in (busy, idle):
            cluster.wait(
                lambda w=worker: _health(w.address) == health_pb2.HealthCheckResponse.SERVING, worker.name
            )
        engines = {w.name: w.engine_pid() for w in (busy, idle)}

        request = worker_pb2.GenerateRequest(
            rid="doomed",
            token_ids=list(range(10, 40)),
            sampling_params={"max_new_tokens": 900, "temperature": 0.0, "ignore_eos": True},
        )
        with grpc.insecure_channel(busy.address) as channel:
            stream = worker_pb2_grpc.WorkerServiceStub(channel).Generate(request, timeout=60)
            next(stream)
            os.kill(_follower(busy), signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
        assert time.monotonic() - start < _BOUND_S
        # UNAVAILABLE, not INTERNAL: a router retries it elsewhere when no token went out yet.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "tensor-parallel rank failed" in err.value.details()

        os.kill(_follower(idle), signal.SIGKILL)  # noticed by the idle engine's once-a-second look
        start = time.monotonic()
        for worker in (busy, idle):
            # The worker shuts down and exits 1, for its supervisor to start a fresh one.
            code = worker.process.wait(max(0.0, start + _BOUND_S - time.monotonic()))
            assert code == 1, f"{worker.name} exited {code}\n{cluster.logs()}"
            assert not running(engines[worker.name]), worker.name  # the engine process exited
            assert _health(worker.address) is None  # nothing answers at its address any more


def _follower(worker: Service) -> int:
    (rank1,) = children(worker.engine_pid())
    return rank1


def _health(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError:
        return None  # not listening yet
    return int(reply.status)
