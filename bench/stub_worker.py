"""A stand-in unified worker for measuring the services alone: it answers GetInfo, health,
Generate and GenerateMany without an engine (by default one token, at once; `--tokens N
--interval-ms I` streams N one-token messages I ms apart, as an engine stepping a batch every
I ms would: every running request's token comes at the same step, on one clock), so the router
and the gateway are the only things being timed.

    python bench/stub_worker.py --port P --model NAME [--tokens N --interval-ms I]
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.multiplex import GenerateServicer
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc


class StubWorker(GenerateServicer, worker_pb2_grpc.WorkerServiceServicer):
    batch_type = worker_pb2.GenerateManyResponse  # GenerateMany: the workers' own multiplexing

    def __init__(self, model: str, tokens: int = 1, interval_s: float = 0.0) -> None:
        self.model = model
        self.tokens = tokens
        self.interval_s = interval_s

    async def GetInfo(self, request: Any, context: Any) -> worker_pb2.GetInfoResponse:
        return worker_pb2.GetInfoResponse(
            role=common_pb2.WORKER_ROLE_UNIFIED, model=self.model, max_context_len=4096, vocab_size=512
        )

    async def _serve(self, request: Any, metadata: Any) -> AsyncIterator[worker_pb2.GenerateResponse]:
        n = len(request.token_ids)
        loop = asyncio.get_running_loop()
        for i in range(1, self.tokens + 1):
            if self.interval_s and i > 1:  # the next step of the one clock all requests share
                now = loop.time()
                await asyncio.sleep((now // self.interval_s + 1) * self.interval_s - now)
            last = i == self.tokens
            yield worker_pb2.GenerateResponse(
                output=common_pb2.Output(
                    token_ids=[7],
                    text="x",
                    finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_LENGTH) if last else None,
                    usage=common_pb2.Usage(prompt_tokens=n, completion_tokens=i),
                )
            )


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=1, help="one-token messages per request")
    p.add_argument("--interval-ms", type=float, default=0.0, help="between a request's messages")
    args = p.parse_args()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(
        StubWorker(args.model, args.tokens, args.interval_ms / 1000), server
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
