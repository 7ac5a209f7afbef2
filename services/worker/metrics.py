"""Every worker's Prometheus series (docs/observability.md), one set for all three roles.

Two sources:
  - the engine, asked when Prometheus scrapes (`EngineCore.stats()` through the engine client,
    with a short timeout, `EngineStats`): load, KV usage, token counters, KV-transfer bytes and
    failures, retractions. Nothing polls between scrapes. An engine busy past the timeout (it
    answers between steps) is shown by its last answer while that is recent, so its series do
    not drop out of the graphs exactly when it is busiest; past that they are left out.
  - this process, per request: time to first token, inter-token and end-to-end latency (decode
    and unified workers) and KV-transfer time (prefill workers), as histograms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from opentelemetry.trace import Span
from prometheus_client import Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import TRANSFER_BUCKETS, TokenClock, TokenLatencies, new_registry
from services.common.tracing import record_error
from shared.errors import RequestError
from shared.outputs import RequestOutput

logger = logging.getLogger(__name__)

StatsSource = Callable[[], dict[str, int] | None]  # the engine's stats(), None if it did not answer


class EngineStats:
    """A `StatsSource` over the engine client: the engine's answer within `timeout` seconds;
    else, while its last answer is at most `max_age` seconds old, that one; else None (logged)."""

    def __init__(
        self,
        ask: Callable[[], Future[dict[str, int]]],
        timeout: float,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ask, self.timeout, self.max_age, self._clock = ask, timeout, max_age, clock
        self._last: dict[str, int] | None = None
        self._last_at = 0.0

    def __call__(self) -> dict[str, int] | None:  # on the metrics server's thread
        try:
            stats = self._ask().result(timeout=self.timeout)
        except FutureTimeout:
            if self._last is not None and self._clock() - self._last_at <= self.max_age:
                return self._last  # a long step: the numbers from before it
            logger.warning("metrics: the engine did not report its stats within %g s", self.timeout)
            return None
        except RequestError as e:
            logger.warning("metrics: the engine did not report its stats: %s", e)
            return None
        self._last, self._last_at = stats, self._clock()
        return stats


class WorkerMetrics:
    """Every worker series, in its own registry (`self.registry`, served on --metrics-port)."""

    def __init__(self, role: str, model: str, stats: StatsSource) -> None:
        r = self.registry = new_registry()
        # Decode and unified workers stream tokens; a prefill worker's series stay empty.
        self.latencies = TokenLatencies(r, "tandem_worker", "the worker receiving a generation", "request")
        self.kv_transfer_seconds = Histogram(
            "tandem_worker_kv_transfer_seconds",
            "A prompt's KV transfer, first page write posted to the last write done (prefill)",
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.kv_transfer_failures = 0  # gRPC-transport writes that failed here (the engine counts NIXL's)
        r.register(_EngineCollector(role, model, stats, self))

    def clock(self) -> TokenClock:
        return self.latencies.clock()


def annotate_generation(span: Span, rid: str, last: RequestOutput | None, clock: TokenClock) -> None:
    """A decode or unified worker's span: the request's usage, TTFT, and an abort as an error."""
    if not span.is_recording():
        return
    span.set_attribute("tandem.rid", rid)
    if last is not None:
        span.set_attributes(
            {
                "tandem.prompt_tokens": last.prompt_tokens,
                "tandem.cached_tokens": last.cached_tokens,
                "tandem.completion_tokens": last.completion_tokens,
            }
        )
        reason = last.finish_reason or {}
        if reason.get("type"):
            span.set_attribute("tandem.finish_reason", str(reason["type"]))
        if reason.get("type") == "abort":
            record_error(span, message=str(reason.get("message", "aborted")))
    ttft = clock.time_to_first_token
    if ttft is not None:
        span.set_attribute("tandem.time_to_first_token_s", ttft)


class _EngineCollector(Collector):
    """The engine's numbers, asked for at scrape time (runs on the metrics server's thread)."""

    def __init__(self, role: str, model: str, stats: StatsSource, local: WorkerMetrics) -> None:
        self.role, self.model = role, model
        self.stats = stats
        self.local = local

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tandem_worker_info", "This worker's role and model (always 1)", labels=["role", "model"]
        )
        info.add_metric([self.role, self.model], 1)
        yield info
        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily(
            "tandem_worker_requests_running", "Requests in the running batch", value=s["running_requests"]
        )
        yield GaugeMetricFamily(
            "tandem_worker_requests_waiting", "Requests queued for admission", value=s["waiting_requests"]
        )
        yield GaugeMetricFamily(
            "tandem_worker_requests_parked",
            "Requests waiting on a KV transfer (decode: for the KV; prefill: for writes to finish)",
            value=s.get("parked_requests", 0),
        )
        yield GaugeMetricFamily(
            "tandem_worker_kv_prompts_expected",
            "Decode: prompts whose KV has not arrived (on the prefill side, or in transfer)",
            value=s.get("kv_prompts_expected", 0),
        )
        total = s["kv_total_tokens"]
        yield GaugeMetricFamily(
            "tandem_worker_kv_usage_ratio",
            "KV pool slots held by requests (not free, not evictable cache) / all slots",
            value=s["kv_used_tokens"] / total if total else 0.0,
        )
        kv = GaugeMetricFamily("tandem_worker_kv_tokens", "KV pool slots by state", labels=["state"])
        for state in ("free", "evictable", "used"):
            kv.add_metric([state], s[f"kv_{state}_tokens"])
        yield kv
        prompt, cached = s.get("prompt_tokens", 0), s.get("cached_tokens", 0)
        yield CounterMetricFamily(
            "tandem_worker_prompt_tokens", "Prompt tokens of admitted requests", value=prompt
        )
        yield CounterMetricFamily(
            "tandem_worker_prompt_tokens_computed",
            "Prompt tokens the model computed (not served from the prefix cache)",
            value=s.get("prompt_tokens_computed", 0),
        )
        yield CounterMetricFamily(
            "tandem_worker_generation_tokens", "Tokens sampled", value=s.get("generated_tokens", 0)
        )
        yield CounterMetricFamily(
            "tandem_worker_cached_tokens", "Prompt tokens served from the prefix cache", value=cached
        )
        yield GaugeMetricFamily(
            "tandem_worker_prefix_cache_hit_ratio",
            "Cached / prompt tokens since start",
            value=cached / prompt if prompt else 0.0,
        )
        moved = CounterMetricFamily(
            "tandem_worker_kv_transfer_bytes", "KV bytes moved between engines", labels=["direction"]
        )
        moved.add_metric(["sent"], s.get("kv_bytes_sent", 0))
        moved.add_metric(["received"], s.get("kv_bytes_received", 0))
        yield moved
        yield CounterMetricFamily(
            "tandem_worker_kv_transfer_failures",
            "KV transfers that failed or timed out (prefill side)",
            value=s.get("kv_transfer_failures", 0) + self.local.kv_transfer_failures,
        )
        yield GaugeMetricFamily(
            "tandem_worker_kv_peers",
            "Decode engines whose NIXL agent this prefill engine knows (forgotten when idle)",
            value=s.get("kv_peers", 0),
        )
        yield CounterMetricFamily(
            "tandem_worker_retractions",
            "Running requests retracted to free KV (they recompute later)",
            value=s.get("num_retractions", 0),
        )
        reservations = CounterMetricFamily(
            "tandem_worker_kv_reservations",
            "Decode: KV reservations for prefill's prompts, by what happened to them",
            labels=["outcome"],
        )
        reservations.add_metric(["granted"], s.get("kv_reservations", 0))
        reservations.add_metric(["queued"], s.get("kv_reservations_queued", 0))
        reservations.add_metric(["expired"], s.get("kv_reservations_expired", 0))
        yield reservations
        # Where the engine's steps go (shared/step_stats.py); bench/serving.py differences them
        # per load level.
        steps = CounterMetricFamily(
            "tandem_worker_engine_steps", "Engine steps that ran a forward, by their rows", labels=["kind"]
        )
        total, decode, mixed = (s.get(f"engine_{k}steps", 0) for k in ("", "decode_", "mixed_"))
        steps.add_metric(["decode"], decode)
        steps.add_metric(["mixed"], mixed)
        steps.add_metric(["prefill"], total - decode - mixed)
        yield steps
        yield CounterMetricFamily(
            "tandem_worker_engine_decode_rows",
            "Decode rows over all steps (divided by the steps: the decode batch)",
            value=s.get("engine_decode_rows", 0),
        )
        yield CounterMetricFamily(
            "tandem_worker_engine_prefill_tokens",
            "Prompt tokens computed in engine steps",
            value=s.get("engine_prefill_tokens", 0),
        )
        yield CounterMetricFamily(
            "tandem_worker_engine_step_host_seconds",
            "Host time inside engine steps (scheduling, launching, processing outputs)",
            value=s.get("engine_step_host_us", 0) / 1e6,
        )
        yield CounterMetricFamily(
            "tandem_worker_engine_step_wait_seconds",
            "Of the host time inside engine steps, blocked on the device for a launched step's results",
            value=s.get("engine_step_wait_us", 0) / 1e6,
        )
        yield CounterMetricFamily(
            "tandem_worker_engine_cpu_seconds",
            "CPU time of the engine process, all its threads (process_cpu_seconds is this one's)",
            value=s.get("engine_cpu_us", 0) / 1e6,
        )
        yield CounterMetricFamily(
            "tandem_worker_engine_step_gpu_seconds",
            "GPU time of the steps' forwards (with --step-gpu-timing; else 0)",
            value=s.get("engine_step_gpu_us", 0) / 1e6,
        )
