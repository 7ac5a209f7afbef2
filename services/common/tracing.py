"""OpenTelemetry tracing for every service: one switch, W3C trace context on every hop, span helpers.

    tracing = setup_tracing("tandem-router")   at start (OTLP export when configured)
    with server_span("router.generate", context.invocation_metadata()) as span:
        if span.is_recording():                 attributes only when someone will read them
            span.set_attribute(...)
        stub.Call(request, metadata=outgoing_metadata())   the next hop continues the trace
    tracing.shutdown()                          on graceful exit: flush what is buffered

Tracing is on when an OTLP endpoint is configured by the standard variables
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), unless
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The service name is
`OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`), else the caller's default.
The exporter speaks OTLP over gRPC (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`, the default) or over HTTP
(`http/protobuf`); `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` wins over it. Where spans go:

    protocol        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   OTEL_EXPORTER_OTLP_ENDPOINT   collector's port
    grpc            as given                             as given                      4317
    http/protobuf   as given (the full URL)              + "/v1/traces"                4318

`http/json` (which the Python exporter does not have) or another protocol leaves tracing off,
with a warning. The exporter reads its own `OTEL_EXPORTER_OTLP_*` options (headers, TLS,
timeout, compression); the batch processor reads its `OTEL_BSP_*` ones.

Off, the API's no-op tracer answers: its spans do not record and callers build no attributes, so
tracing off costs a few function calls per hop. Trace context still passes through (a no-op span
carries its parent's context), so a service with tracing off keeps its neighbours' traces whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common.errors import ServiceError, status_of

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]
Protocol = Literal["grpc", "http/protobuf"]  # what the exporters installed here speak
TRACES_PATH = "/v1/traces"  # OTLP/HTTP: appended to OTEL_EXPORTER_OTLP_ENDPOINT
_tracer = trace.get_tracer("tandem")  # a proxy: it follows the provider `setup_tracing` installs
_provider: Any = None  # the SDK TracerProvider this process installed, if any


@dataclass(frozen=True)
class TracingConfig:
    """What the `OTEL_*` environment asks for (read in one place)."""

    enabled: bool
    endpoint: str | None  # where spans go (for http/protobuf the whole URL, path included)
    reason: str  # why tracing is off ("" when on)
    protocol: Protocol = "grpc"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        env = os.environ if environ is None else environ
        traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        endpoint = traces_endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        exporter = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        protocol_var = next(
            (v for v in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if env.get(v)),
            None,
        )
        protocol = env[protocol_var].strip().lower() if protocol_var else "grpc"
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(False, endpoint, "OTEL_SDK_DISABLED=true")
        if exporter == "none":
            return cls(False, endpoint, "OTEL_TRACES_EXPORTER=none")
        if exporter != "otlp":
            return cls(False, endpoint, f"OTEL_TRACES_EXPORTER={exporter} (only otlp is supported)")
        if not endpoint:
            return cls(False, None, "no OTLP endpoint configured")
        if protocol not in get_args(Protocol):
            why = " (the Python OTLP exporter has no JSON encoding)" if protocol == "http/json" else ""
            return cls(False, endpoint, f"{protocol_var}={protocol}{why}; supported: grpc, http/protobuf")
        if protocol == "http/protobuf" and not traces_endpoint:
            endpoint = endpoint.rstrip("/") + TRACES_PATH  # the base URL's signal path
        return cls(True, endpoint, "", cast(Protocol, protocol))  # checked above


class Tracing:
    """The handle `setup_tracing` returns: whether spans are exported, and the shutdown."""

    def __init__(self, config: TracingConfig, provider: Any = None) -> None:
        self.config = config
        self.provider = provider  # the SDK TracerProvider, or None when tracing is off

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter (graceful exit). Idempotent."""
        global _provider
        if self.provider is None:
            return
        with contextlib.suppress(Exception):  # a collector that is gone must not block the exit
            self.provider.force_flush(timeout_millis=5000)
        self.provider.shutdown()
        if _provider is self.provider:
            _provider = None
        self.provider = None


def setup_tracing(default_service_name: str, environ: Mapping[str, str] | None = None) -> Tracing:
    """Install an SDK TracerProvider exporting OTLP (gRPC or HTTP) when the environment
    configures an endpoint (see the module docstring); otherwise leave the API's no-op tracer in
    place.

    Once per process: a second call returns the provider the first installed.
    """
    global _provider
    config = TracingConfig.from_env(environ)
    if not config.enabled:
        # Asked for something we cannot do (another exporter or protocol): say so.
        unsupported = "supported" in config.reason
        logger.log(logging.WARNING if unsupported else logging.DEBUG, "tracing off: %s", config.reason)
        return Tracing(config)
    if _provider is not None:
        return Tracing(config, _provider)
    # Imported here: a process with tracing off never loads the SDK or the exporter.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info(
        "tracing on: service %s -> OTLP/%s %s",
        resource.attributes.get(SERVICE_NAME),
        "gRPC" if config.protocol == "grpc" else "HTTP",
        config.endpoint,
    )
    return Tracing(config, provider)


def _exporter(config: TracingConfig) -> Any:
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=config.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=config.endpoint)


def fastapi_options() -> dict[str, Any]:
    """`FastAPI(**fastapi_options())`: recent FastAPI versions trace every request themselves once
    a tracer provider exists; the services make their own spans (one per hop), so turn it off
    where FastAPI has it."""
    import inspect

    from fastapi import FastAPI

    has_telemetry = "telemetry" in inspect.signature(FastAPI.__init__).parameters
    return {"telemetry": {"tracing": False}} if has_telemetry else {}


def tracer() -> trace.Tracer:
    """The services' tracer (no-op until `setup_tracing` installs a provider)."""
    return _tracer


# ---- W3C trace context in and out ----------------------------------------------------------------


def extract(carrier: Mapping[str, str] | Sequence[tuple[str, Any]] | None) -> otel_context.Context | None:
    """The trace context in HTTP headers or gRPC metadata (None when there is none)."""
    if not carrier:
        return None
    fields = propagate.get_global_textmap().fields
    items = carrier.items() if isinstance(carrier, Mapping) else carrier
    found = {k: v for k, v in items if k in fields and isinstance(v, str)}
    return propagate.extract(found) if found else None


def outgoing_metadata() -> Metadata | None:
    """The current trace context as gRPC metadata for the next hop (None when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


# ---- spans ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def server_span(name: str, metadata: Sequence[tuple[str, Any]] | None) -> Iterator[Span]:
    """A SERVER span continuing the caller's trace, current for the block; an exception leaving
    the block marks it as an error (and propagates)."""
    parent = extract(metadata)
    span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
    if parent is None and not span.is_recording():  # tracing off, no trace to pass on: nothing to do
        yield span
        return
    request_id = next((v for k, v in metadata or () if k == "x-request-id"), None)
    if request_id is not None and span.is_recording():  # the gateway's X-Request-Id
        span.set_attribute("tandem.x_request_id", str(request_id))
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        record_error(span, exc)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def record_error(span: Span, exc: BaseException | None = None, message: str | None = None) -> None:
    """Mark `span` failed: status ERROR with the message (and the exception as an event)."""
    if not span.is_recording():
        return
    span.set_status(Status(StatusCode.ERROR, message or describe(exc)))
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        span.record_exception(exc)


def describe(exc: BaseException | None) -> str:
    """A failure in a span's status message: the gRPC status when it has one."""
    if exc is None:
        return "error"
    if isinstance(exc, ServiceError | grpc.aio.AioRpcError):
        code, message, _ = status_of(exc)
        return f"{code.name}: {message}"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def record_span(
    name: str, start_s: float, end_s: float, attributes: dict[str, Any], error: str | None = None
) -> None:
    """A finished child of the current span, timed by wall-clock seconds measured elsewhere
    (e.g. in the engine process). Nothing is built when the current span is not recording."""
    if not trace.get_current_span().is_recording():
        return
    span = _tracer.start_span(name, start_time=int(start_s * 1e9), attributes=attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=int(end_s * 1e9))
