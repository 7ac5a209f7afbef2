"""A deployment left with half a prefill/decode pair (and no unified worker) answers UNAVAILABLE
naming the half that is missing, not "no healthy unified workers" (the fallback it cannot take);
one with no healthy worker at all names the roles registered."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.errors import ServiceError
from services.protos.tandem.common.v1 import common_pb2
from services.router.metrics import RequestRecord
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


@pytest.mark.parametrize(
    ("roles", "message"),
    [
        ((), "no workers registered"),
        (("prefill", "decode"), "no healthy workers (decode, prefill registered, none healthy now)"),
        (("unified",), "no healthy workers (unified registered, none healthy now)"),
    ],
)
def test_no_healthy_worker_says_which_are_registered(roles: tuple[str, ...], message: str) -> None:
    """A PD deployment whose workers are all down said "no healthy unified workers" (a QA pass)."""

    async def main() -> None:
        channel = grpc.aio.insecure_channel("127.0.0.1:1")  # never dialled
        registry = Registry("m")
        for i, role in enumerate(roles):
            registry.workers[f"w:{i}"] = Worker(f"w:{i}", 0, role=role, channel=channel)
            registry.workers[f"w:{i}"].state = "unhealthy"
        orchestrator = Orchestrator(registry, *[create_policy("round_robin") for _ in range(3)])
        sample = Sample(1, 0, [5, 6, 7], "", common_pb2.SamplingParams(max_new_tokens=2), False, 0)
        record = RequestRecord()
        with pytest.raises(ServiceError) as e:
            async for _ in orchestrator.generate([sample], record):
                pass
        assert (e.value.code, e.value.message) == (grpc.StatusCode.UNAVAILABLE, message)
        # Not retried: a retry a moment later finds the same workers (it only logged a warning).
        assert record.attempts == 1 and orchestrator.metrics.retries._value.get() == 0
        assert orchestrator.in_flight == 0
        await channel.close()

    asyncio.run(main())
