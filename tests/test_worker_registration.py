"""A worker the router refuses for good (another model, a wrong cluster token) asks again less
and less often and logs each reason once; it asked every second with a warning each time (a QA
pass). Against a fake admin service over loopback gRPC."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from services.protos.tandem.router.v1 import router_pb2_grpc
from services.worker.server import _register_and_heartbeat


class RefusingAdmin(router_pb2_grpc.RouterAdminServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def RegisterWorker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"worker {request.address} serves 'a'; this router serves 'b'",
        )


def test_a_refused_worker_backs_off_and_logs_the_reason_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> int:
        admin = RefusingAdmin()
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterAdminServiceServicer_to_server(admin, server)
        router = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        stop, serving = asyncio.Event(), asyncio.Event()
        serving.set()
        task = asyncio.ensure_future(_register_and_heartbeat(router, None, "127.0.0.1:5", stop, serving))
        await asyncio.sleep(3.4)  # asks at 0 s, then 2 s, then 6 s (once a second: 0, 1, 2, 3)
        stop.set()
        await asyncio.wait_for(task, 5)
        await server.stop(None)
        return admin.calls

    with caplog.at_level(logging.WARNING, logger="services.worker.server"):
        calls = asyncio.run(main())
    assert calls == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "this router serves 'b'" in warnings[0], warnings
