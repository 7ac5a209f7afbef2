"""A deployment left with half a prefill/decode pair (and no unified worker) answers UNAVAILABLE
naming the half that is missing, not "no healthy unified workers" (the fallback it cannot take)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.errors import ServiceError
from services.protos.tandem.common.v1 import common_pb2
from services.router.orchestrator import Orchestrator, Sample
from services.router.policies import create_policy
from services.router.registry import Registry, Worker


@pytest.mark.parametrize(("present", "missing"), [("prefill", "decode"), ("decode", "prefill")])
def test_half_a_pair_names_the_missing_role(present: str, missing: str) -> None:
    async def main() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never dialled
        registry = Registry("m")
        registry.workers = {"w:1": Worker("w:1", 0, role=present, channel=channel)}
        policies = [create_policy("round_robin") for _ in range(3)]
        orchestrator = Orchestrator(registry, *policies)
        sample = Sample(1, 0, [5, 6, 7], "", common_pb2.SamplingParams(max_new_tokens=2), False, 0)
        with pytest.raises(ServiceError) as e:
            async for _ in orchestrator.generate([sample]):
                pass
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert e.value.message == f"no healthy {missing} workers (nor unified ones)"
        assert orchestrator.in_flight == 0
        await channel.close()

    asyncio.run(main())
