r"""Where a request's time goes between the services, from their own traces.

Tandem's services export OpenTelemetry spans (docs/observability.md). This receives them over
OTLP/HTTP (protobuf) on a local port, with no collector to install, and turns each request's
trace into a timeline: milliseconds from the gateway's span start to each milestone

    router        the router's `router.generate` begins
    worker        the worker's `generate` (unified) or `decode` (PD) call begins
    prefill       PD: the router's prefill call begins (decode's reservation message is back)
    reserve_kv    PD: the prefill worker asks decode for pages (just in time) / `reserved`: granted
    kv_write      PD: the first KV write posted / `kv_done`: the prefill engine saw the last one done
    first_token   the worker's first token (its span start + `tandem.time_to_first_token_s`)
    end           the gateway's span ends (the last byte sent)

and the median and 90th percentile of each over many requests. `bench/serving.py --launch
--trace` runs the receiver and prints a level's timeline after its table row (its JSON keeps it
under `timeline`); tracing costs the services some CPU, so a traced run's throughput is not the
untraced one's.

    python bench/trace_timeline.py --port 4318 --out spans.jsonl   # receive until Ctrl-C, then
    OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 \
        OTEL_BSP_SCHEDULE_DELAY=200 tandem up ...                  # in another shell, and load it
    python bench/trace_timeline.py --summarize spans.jsonl         # the timeline, by mode
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

MILESTONES = (
    "router",
    "worker",
    "prefill",
    "reserve_kv",
    "reserved",
    "kv_write",
    "kv_done",
    "first_token",
    "end",
)
# Span name -> the milestones its start and end mark (end: None where it marks none).
_SPAN_MILESTONES = {
    "router.generate": ("router", None),
    "prefill": ("prefill", None),
    "reserve_kv": ("reserve_kv", "reserved"),
    "kv_transfer": ("kv_write", "kv_done"),
}
# The environment that points a suite's exporters at a receiver on `port` (spans sent every
# 200 ms rather than the SDK's 5 s, so a level's spans are in shortly after it ends).
SCHEDULE_DELAY_MS = 200


def exporter_env(port: int) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": str(SCHEDULE_DELAY_MS),
    }


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "int_value", "double_value", "bool_value") else None


def decode_spans(body: bytes) -> list[dict[str, Any]]:
    """An OTLP ExportTraceServiceRequest -> one dict per span: service, name, trace (hex), start
    and end (ns since the epoch), attributes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    {
                        "service": resource.get("service.name", ""),
                        "name": s.name,
                        "trace": s.trace_id.hex(),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in s.attributes},
                    }
                )
    return spans


class SpanReceiver:
    """An OTLP/HTTP trace endpoint on 127.0.0.1 (`port` 0: a free one) in a daemon thread;
    `take()` hands over the spans received since the last call."""

    def __init__(self, port: int = 0, out: Path | None = None) -> None:
        self._spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._out = open(out, "a") if out else None  # noqa: SIM115 (closed in close())
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    spans = decode_spans(body)
                except Exception as e:  # not OTLP protobuf: say so, keep serving
                    self.send_error(400, f"not an OTLP protobuf trace export: {e}")
                    return
                receiver._add(spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _add(self, spans: list[dict[str, Any]]) -> None:
        with self._lock:
            self._spans.extend(spans)
            if self._out is not None:
                self._out.writelines(json.dumps(s) + "\n" for s in spans)
                self._out.flush()

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            spans, self._spans = self._spans, []
        return spans

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._out is not None:
            self._out.close()


def timelines(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One timeline per request whose gateway span is among `spans`: "mode" ("pd" or "unified")
    and each milestone it reached, in ms from the gateway span's start. With several spans of a
    name in a trace (a retried attempt), the last one started counts."""
    traces: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in sorted(spans, key=lambda s: s["start"]):
        name = "gateway" if s["service"] == "tandem-gateway" else s["name"]
        traces[s["trace"]][name] = s
    out = []
    for named in traces.values():
        gateway = named.get("gateway")
        if gateway is None:
            continue
        t0 = gateway["start"]

        def ms(ns: int, t0: int = t0) -> float:
            return (ns - t0) / 1e6

        line: dict[str, Any] = {"mode": "pd" if "decode" in named else "unified", "end": ms(gateway["end"])}
        for name, (start, end) in _SPAN_MILESTONES.items():
            if name in named:
                line[start] = ms(named[name]["start"])
                if end:
                    line[end] = ms(named[name]["end"])
        worker = named.get("decode") or named.get("generate")
        if worker is not None:
            line["worker"] = ms(worker["start"])
            ttft = worker["attributes"].get("tandem.time_to_first_token_s")
            if ttft is not None:
                line["first_token"] = line["worker"] + 1e3 * float(ttft)
        out.append(line)
    return out


def summarize(lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: how many requests, and p50 / p90 (ms) of each milestone that any reached."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        by_mode[line["mode"]].append(line)
    summary: dict[str, dict[str, Any]] = {}
    for mode, group in sorted(by_mode.items()):
        entry: dict[str, Any] = {"requests": len(group)}
        for key in MILESTONES:
            values = [line[key] for line in group if key in line]
            if values:
                p50, p90 = np.percentile(values, [50, 90])
                entry[key] = {"p50": float(p50), "p90": float(p90)}
        summary[mode] = entry
    return summary


def summary_line(mode: str, entry: dict[str, Any]) -> str:
    """One line: "pd, 8 requests, ms p50: router 2.5, worker 4.3, ..."."""
    parts = [f"{key} {entry[key]['p50']:.1f}" for key in MILESTONES if key in entry]
    return f"timeline {mode}, {entry['requests']} requests, ms from the gateway (p50): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, default=4318, help="receive OTLP/HTTP spans here")
    p.add_argument("--out", type=Path, help="append every span received to this JSON-lines file")
    p.add_argument("--summarize", type=Path, metavar="JSONL", help="print the timeline of saved spans")
    args = p.parse_args(argv)
    if args.summarize:
        spans = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
        for mode, entry in summarize(timelines(spans)).items():
            print(summary_line(mode, entry))
        return 0
    receiver = SpanReceiver(args.port, args.out)
    print(f"receiving OTLP/HTTP spans on http://127.0.0.1:{receiver.port}; Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()
        for mode, entry in summarize(timelines(receiver.take())).items():
            print(summary_line(mode, entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
