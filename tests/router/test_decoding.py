"""`add_servicer`: a request the server cannot parse is INVALID_ARGUMENT (grpc.aio says UNKNOWN)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.decoding import add_servicer
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc


class _Servicer(router_pb2_grpc.RouterServiceServicer):
    async def Generate(self, request: Any, context: Any) -> AsyncIterator[router_pb2.GenerateResponse]:
        yield router_pb2.GenerateResponse()

    async def ListModels(self, request: Any, context: Any) -> router_pb2.ListModelsResponse:
        return router_pb2.ListModelsResponse(models=[router_pb2.Model(id="m")])


async def _calls(lenient: bool) -> list[tuple[grpc.StatusCode, str]]:
    server = grpc.aio.server()
    if lenient:
        add_servicer(server, router_pb2_grpc.add_RouterServiceServicer_to_server, _Servicer())
    else:
        router_pb2_grpc.add_RouterServiceServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    bad_utf8 = router_pb2.GenerateRequest(text="abc").SerializeToString().replace(b"abc", b"ab\xff")
    out = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            generate = channel.unary_stream("/tandem.router.v1.RouterService/Generate")
            list_models = channel.unary_unary("/tandem.router.v1.RouterService/ListModels")
            for body in (b"\x0f\x01\x02", bad_utf8):
                try:
                    async for _ in generate(body, timeout=5):
                        pass
                except grpc.aio.AioRpcError as exc:
                    out.append((exc.code(), exc.details() or ""))
            try:
                await list_models(b"\x0f", timeout=5)
            except grpc.aio.AioRpcError as exc:
                out.append((exc.code(), exc.details() or ""))
            # A valid request still works.
            assert len([r async for r in generate(router_pb2.GenerateRequest().SerializeToString())]) == 1
            assert await list_models(b"", timeout=5)
    finally:
        await server.stop(None)
    return out


@pytest.mark.parametrize("lenient", [True, False])
def test_undecodable_requests_are_invalid_argument(lenient: bool) -> None:
    statuses = asyncio.run(_calls(lenient))
    assert len(statuses) == 3
    if not lenient:  # what grpc.aio does on its own: why add_servicer exists
        assert {code for code, _ in statuses} == {grpc.StatusCode.UNKNOWN}
        return
    assert {code for code, _ in statuses} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert all("could not be parsed" in message for _, message in statuses)
    assert "bad UTF-8" in statuses[1][1]
