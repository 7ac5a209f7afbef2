"""Prometheus pieces every service shares: latency buckets, a per-request token clock, the gRPC
status name of a failure, and the /metrics HTTP server of the gRPC services.

Each service family defines its series in one module (`services/gateway/metrics.py`,
`services/router/metrics.py`, `services/worker/metrics.py`); docs/observability.md lists them
all. Every service instance owns a `CollectorRegistry` (so several can share a process, as in
tests), holding the process and platform collectors as well.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server

from services.common.errors import status_of

# Latencies of LLM serving run from milliseconds (a cached one-token prompt) to minutes (a long
# generation queued behind others): buckets are dense where SLOs sit and reach 10-30 minutes.
TTFT_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
ITL_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05),
    *(0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
)
E2E_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0),
    *(45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0),
)
TRANSFER_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def new_registry() -> CollectorRegistry:
    """A registry for one service instance, with the process and platform collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> tuple[str, Callable[[], None]]:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0 takes a free
    port, None serves nothing. Returns the URL ("" when off) and the call that stops it."""
    if port is None:
        return "", lambda: None
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"http://{host}:{server.server_address[1]}/metrics", stop


def status_name(exc: BaseException | None) -> str:
    """The gRPC status name a call ends with when `exc` (None: success) leaves its handler."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return status_of(exc)[0].name


class TokenLatencies:
    """The three histograms a `TokenClock` observes: `{prefix}_time_to_first_token_seconds`,
    `{prefix}_inter_token_latency_seconds` and `{prefix}_e2e_request_latency_seconds`.
    `since` says where the clock starts ("the router receiving a call"), `unit` what it times."""

    def __init__(self, registry: CollectorRegistry, prefix: str, since: str, unit: str) -> None:
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            f"From {since} to a {unit}'s first token",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            f"Gap between a {unit}'s tokens (an increment of n tokens: its wait / n)",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{prefix}_e2e_request_latency_seconds",
            f"From {since} to a {unit}'s last token (finished {unit}s)",
            buckets=E2E_BUCKETS,
            registry=registry,
        )

    def clock(self, start: float | None = None) -> TokenClock:
        return TokenClock(self.ttft, self.itl, self.e2e, start)


class TokenClock:
    """The latencies of one streamed request: time to first token, the gap between tokens (an
    increment of n tokens is observed once, as its wait / n), and end to end."""

    __slots__ = ("e2e", "first", "itl", "last", "start", "tokens", "ttft")

    def __init__(self, ttft: Histogram, itl: Histogram, e2e: Histogram, start: float | None = None) -> None:
        self.ttft, self.itl, self.e2e = ttft, itl, e2e
        self.start = time.perf_counter() if start is None else start
        self.first = 0.0  # perf_counter() of the first token; 0 until it came
        self.last = 0.0
        self.tokens = 0

    def add(self, n: int) -> None:
        """`n` new tokens arrived now."""
        if n <= 0:
            return
        now = time.perf_counter()
        if self.tokens:
            self.itl.observe((now - self.last) / n)
        else:
            self.first = now
            self.ttft.observe(now - self.start)
        self.last = now
        self.tokens += n

    @property
    def time_to_first_token(self) -> float | None:
        return self.first - self.start if self.tokens else None

    def finish(self) -> float:
        """The request ended (call once): observe and return its end-to-end latency."""
        elapsed = time.perf_counter() - self.start
        self.e2e.observe(elapsed)
        return elapsed
