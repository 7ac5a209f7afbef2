"""The gateway's telemetry: its Prometheus series (docs/observability.md) and, per HTTP request,
one SERVER span continuing the caller's `traceparent`.

    TelemetryMiddleware   ASGI: the span, request counts, duration, TTFT of streams, in-flight;
                          a stream counts until its last byte
    UsageStub             the router stub, counting each request's tokens for its span (only
                          while the span records: with tracing off it hands back the plain call)

The route functions in server.py add what only they know (model, request id, n, stream).
Health probes are counted but not traced (a probe every few seconds would bury the traces).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import E2E_BUCKETS, TTFT_BUCKETS, new_registry
from services.common.tracing import extract, record_error, tracer
from services.gateway.request_id import SPAN_ATTRIBUTE as REQUEST_ID_ATTRIBUTE
from services.gateway.request_id import request_id_of
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc

_UNMATCHED = "other"  # the endpoint label of paths no route serves (keeps the label set bounded)


class GatewayMetrics:
    """Every gateway series, in its own registry (`self.registry`, served at GET /metrics)."""

    def __init__(self) -> None:
        r = self.registry = new_registry()
        self.requests = Counter(
            "tandem_gateway_requests_total",
            "HTTP requests by route and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "tandem_gateway_request_duration_seconds",
            "HTTP request duration, to the last byte of a stream",
            ["endpoint"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "tandem_gateway_time_to_first_token_seconds",
            "Streaming requests: from the request to the first event sent",
            ["endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("tandem_gateway_requests_in_flight", "HTTP requests in progress", registry=r)


@dataclass
class RequestUsage:
    """Tokens of one HTTP request's router calls (each prompt counted once, all samples)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _prompts: dict[int, int] = field(default_factory=dict)  # per call: its prompt's tokens

    def add(self, call_id: int, output: Any, previous: int) -> None:
        usage = output.usage
        self.completion_tokens += usage.completion_tokens - previous
        if usage.prompt_tokens > self._prompts.get(call_id, 0):
            self.prompt_tokens += usage.prompt_tokens - self._prompts.get(call_id, 0)
            self._prompts[call_id] = usage.prompt_tokens
        self.cached_tokens = max(self.cached_tokens, usage.cached_tokens)


_usage: contextvars.ContextVar[RequestUsage | None] = contextvars.ContextVar("tandem_usage", default=None)


class TelemetryMiddleware:
    """ASGI middleware around the whole app: span and metrics per request (`skip` paths get
    neither, `untraced` paths only metrics)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: GatewayMetrics,
        skip: tuple[str, ...] = ("/metrics",),
        untraced: tuple[str, ...] = ("/health",),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.skip = skip
        self.untraced = untraced
        self._trace_headers = {f.encode("latin-1") for f in propagate.get_global_textmap().fields}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        metrics = self.metrics
        method = scope["method"]
        span: Span = trace.INVALID_SPAN
        parent = None
        if scope["path"] not in self.untraced:
            headers = [
                (k.decode("latin-1"), v.decode("latin-1"))
                for k, v in scope["headers"]
                if k in self._trace_headers
            ]
            parent = extract(headers)
            span = tracer().start_span(method, context=parent, kind=SpanKind.SERVER)
        recording = span.is_recording()
        # Tracing off and no caller's trace: no context to pass on, so none to attach.
        token = otel_context.attach(trace.set_span_in_context(span, parent)) if recording or parent else None
        usage_token = _usage.set(RequestUsage()) if recording else None
        status, streaming, first_sent = 500, False, False

        async def watch(message: Message) -> None:
            nonlocal status, streaming, first_sent
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = any(
                    k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"]
                )
            elif streaming and not first_sent and message.get("body"):
                first_sent = True
                metrics.ttft.labels(_endpoint(scope)).observe(time.perf_counter() - start)
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:
            record_error(span, exc)
            raise
        finally:
            metrics.in_flight.dec()
            endpoint = _endpoint(scope)
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.duration.labels(endpoint).observe(time.perf_counter() - start)
            if recording:
                span.update_name(f"{method} {endpoint}")
                request_id = request_id_of(scope)
                if request_id is not None:
                    span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
                span.set_attributes(
                    {
                        "http.request.method": method,
                        "http.route": endpoint,
                        "url.path": scope["path"],
                        "http.response.status_code": status,
                    }
                )
                usage = _usage.get()
                if usage is not None and usage.prompt_tokens:
                    span.set_attributes(
                        {
                            "tandem.prompt_tokens": usage.prompt_tokens,
                            "tandem.completion_tokens": usage.completion_tokens,
                            "tandem.cached_tokens": usage.cached_tokens,
                        }
                    )
                current = getattr(span, "status", None)  # the SDK span's; the handlers may have set it
                if status >= 500 and (current is None or current.status_code is StatusCode.UNSET):
                    record_error(span, message=f"HTTP {status}")
            if usage_token is not None:
                _usage.reset(usage_token)
            if token is not None:
                otel_context.detach(token)
            span.end()


def _endpoint(scope: Scope) -> str:
    route = scope.get("route")
    return str(getattr(route, "path", _UNMATCHED)) if route is not None else _UNMATCHED


class UsageStub:
    """The router stub for the handler: Generate calls report their tokens to the current
    request's `RequestUsage` (only when there is one, i.e. the request's span records)."""

    def __init__(self, stub: router_pb2_grpc.RouterServiceStub) -> None:
        self._stub = stub
        self.ListModels = stub.ListModels
        self.Tokenize = stub.Tokenize
        self.Embed = stub.Embed

    def Generate(self, request: router_pb2.GenerateRequest, **kwargs: Any) -> Any:
        call = self._stub.Generate(request, **kwargs)
        usage = _usage.get()
        return call if usage is None else _CountedCall(call, usage)


class _CountedCall:
    """A router Generate call that adds its usage to a `RequestUsage` as increments arrive."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, usage: RequestUsage) -> None:
        self._call = call
        self._usage = usage

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    async def __aiter__(self) -> AsyncIterator[router_pb2.GenerateResponse]:
        completion: dict[int, int] = {}  # per sample: completion tokens reported so far
        async for response in self._call:
            output = response.output
            if output.HasField("usage"):
                self._usage.add(id(self), output, completion.get(output.index, 0))
                completion[output.index] = output.usage.completion_tokens
            yield response
