"""The router's Prometheus series (docs/observability.md) and the record of one Generate call.

The orchestrator fills a `RequestRecord` as it routes (mode, workers, attempts, usage); the
server turns it into the `router.generate` span's attributes and the per-request counters.
Token latencies are per sample (`TokenClock`), measured from the router's receipt of the call.
Worker states are read from the worker registry when Prometheus scrapes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from opentelemetry.trace import Span
from prometheus_client import Counter, Gauge
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import TokenClock, TokenLatencies, new_registry
from services.protos.tandem.common.v1 import common_pb2

if TYPE_CHECKING:
    from services.router.registry import Registry

ROLES = ("prefill", "decode", "unified")
STATES = ("healthy", "draining", "unhealthy")


@dataclass
class RequestRecord:
    """What one Generate call did, filled in by the orchestrator (the last attempt's workers)."""

    request_id: int = 0
    n: int = 1
    start: float = field(default_factory=time.perf_counter)
    mode: str = "none"  # "pd" or "unified" once a sample was routed
    prefill_worker: str = ""
    decode_worker: str = ""  # the unified worker in unified mode
    attempts: int = 0  # the most attempts any sample needed
    prompt_tokens: int = 0  # the prompt, once
    cached_tokens: int = 0  # the best prefix-cache hit among the samples
    completion_tokens: int = 0  # all samples

    def add_usage(self, usage: common_pb2.Usage) -> None:
        self.prompt_tokens = max(self.prompt_tokens, usage.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, usage.cached_tokens)
        self.completion_tokens += usage.completion_tokens

    def annotate(self, span: Span, status: str) -> None:
        """Set the `router.generate` span's attributes (call only when it is recording)."""
        span.set_attributes(
            {
                "rpc.system": "grpc",
                "rpc.service": "tandem.router.v1.RouterService",
                "rpc.method": "Generate",
                "rpc.grpc.status_code": grpc.StatusCode[status].value[0],
                "tandem.request_id": str(self.request_id),
                "tandem.n": self.n,
                "tandem.mode": self.mode,
                "tandem.prefill_worker": self.prefill_worker,
                "tandem.decode_worker": self.decode_worker,
                "tandem.attempts": self.attempts,
                "tandem.prompt_tokens": self.prompt_tokens,
                "tandem.cached_tokens": self.cached_tokens,
                "tandem.completion_tokens": self.completion_tokens,
            }
        )


class RouterMetrics:
    """Every router series, in its own registry (`self.registry`, served on --metrics-port)."""

    def __init__(self, workers: Registry | None = None) -> None:
        r = self.registry = new_registry()
        self.requests = Counter(
            "tandem_router_requests_total",
            "Generate calls by routing mode (pd, unified; none if never routed) and gRPC status",
            ["mode", "status"],
            registry=r,
        )
        self.running = Gauge("tandem_router_requests_running", "Generate calls in progress", registry=r)
        self.latencies = TokenLatencies(r, "tandem_router", "the router receiving a call", "sample")
        self.prompt_tokens = Counter(
            "tandem_router_prompt_tokens_total", "Prompt tokens of finished samples", registry=r
        )
        self.generation_tokens = Counter(
            "tandem_router_generation_tokens_total", "Tokens generated and streamed back", registry=r
        )
        self.cached_tokens = Counter(
            "tandem_router_cached_tokens_total",
            "Prompt tokens served from a worker's prefix cache",
            registry=r,
        )
        self.decisions = Counter(
            "tandem_router_decisions_total",
            "Routing decisions per chosen worker",
            ["role", "worker"],
            registry=r,
        )
        self.worker_errors = Counter(
            "tandem_router_worker_errors_total",
            "Failed worker calls by gRPC status",
            ["role", "worker", "code"],
            registry=r,
        )
        self.retries = Counter(
            "tandem_router_retries_total", "Samples retried on fresh workers after a failure", registry=r
        )
        self.refused = Counter(
            "tandem_router_refused_total",
            "Requests refused at once because too many samples were in flight (HTTP 429)",
            registry=r,
        )
        self._error_labels: set[tuple[str, str, str]] = set()
        if workers is not None:
            r.register(_WorkerStates(workers))

    def clock(self, start: float) -> TokenClock:
        return self.latencies.clock(start)

    def add_usage(self, usage: common_pb2.Usage) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generation_tokens.inc(usage.completion_tokens)

    def forget_worker(self, address: str) -> None:
        """A worker left for good: drop its labelled series (addresses churn in Kubernetes)."""
        for role in ROLES:
            with contextlib.suppress(KeyError):
                self.decisions.remove(role, address)
        for labels in [labels for labels in self._error_labels if labels[1] == address]:
            self._error_labels.discard(labels)
            with contextlib.suppress(KeyError):
                self.worker_errors.remove(*labels)

    def worker_error(self, role: str, address: str, code: str) -> None:
        self._error_labels.add((role, address, code))
        self.worker_errors.labels(role, address, code).inc()


class _WorkerStates(Collector):
    """tandem_router_workers{role,state}: counted from the worker registry at scrape time."""

    def __init__(self, workers: Registry) -> None:
        self.workers = workers

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tandem_router_workers", "", labels=["role", "state"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "tandem_router_workers", "Workers known to the router by role and state", labels=["role", "state"]
        )
        # list() copies in one C call under the GIL: the event loop may change the dict meanwhile.
        counts = {(role, state): 0 for role in ROLES for state in STATES}
        for worker in list(self.workers.workers.values()):
            key = (worker.role, worker.state)
            counts[key] = counts.get(key, 0) + 1
        for (role, state), count in counts.items():
            family.add_metric([role, state], count)
        yield family
