"""In-test OTLP trace receivers: the spans every service exports, over gRPC or HTTP.

with grpc_receiver() as receiver:           # OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint
    ...
    spans = receiver.trace_of(lambda s: s.attributes.get("tandem.request_id") == rid, 6)
with http_receiver() as receiver:           # the same, plus OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for spans
PROTOBUF = "application/x-protobuf"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    error: str | None  # the status message of an ERROR span


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


class Receiver:
    """The spans of every export request received, in arrival order."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.endpoint = ""  # http://127.0.0.1:PORT, set once listening

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name", "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.start_time_unix_nano,
                            s.end_time_unix_nano,
                            {a.key: _value(a.value) for a in s.attributes},
                            [(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in s.events],
                            s.status.message if s.status.code == 2 else None,
                        )
                    )
        with self.lock:
            self.spans.extend(got)

    def trace_of(self, predicate: Any, expected: int, timeout: float = 20.0) -> list[Span]:
        """The spans of the trace holding the span `predicate` picks, once `expected` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                root = next((s for s in self.spans if predicate(s)), None)
                spans = [s for s in self.spans if root is not None and s.trace_id == root.trace_id]
            if len(spans) >= expected or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def one_span(spans: list[Span], service: str, name: str) -> Span:
    """The one span of `service` called `name` among `spans`."""
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def grpc_receiver() -> Iterator[Receiver]:
    """An OTLP/gRPC receiver on a free loopback port."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), server)
    receiver.endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None)


class HttpReceiver(Receiver):
    """An OTLP/HTTP receiver: POST /v1/traces with a protobuf ExportTraceServiceRequest body.
    `requests` records (path, content type) of every POST, accepted or not."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []


@contextlib.contextmanager
def http_receiver() -> Iterator[HttpReceiver]:
    """An OTLP/HTTP receiver on a free loopback port (a thread of this process)."""
    receiver = HttpReceiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            content_type = self.headers.get("Content-Type", "")
            with receiver.lock:
                receiver.requests.append((self.path, content_type))
            if self.path != TRACES_PATH or content_type != PROTOBUF:
                self.send_error(404 if self.path != TRACES_PATH else 415)
                return
            receiver.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", PROTOBUF)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows what the assertions say

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
