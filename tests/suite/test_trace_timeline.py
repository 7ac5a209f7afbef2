"""bench/trace_timeline.py: OTLP/HTTP spans received from a real `tandem up` (PD, tiny model)
become per-request timelines whose milestones come in the order the hand-off runs them; and the
timeline of known spans, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from bench import serving, trace_timeline
from bench.trace_timeline import SpanReceiver

pytestmark = pytest.mark.xdist_group("suite_trace_timeline")

MS = 1_000_000  # ns


def span(service: str, name: str, trace: str, start_ms: float, end_ms: float, **attrs: object) -> dict:
    return {
        "service": service,
        "name": name,
        "trace": trace,
        "start": int(start_ms * MS),
        "end": int(end_ms * MS),
        "attributes": attrs,
    }


def test_timeline_of_known_spans() -> None:
    t0 = 1_000_000.0  # ms since the epoch, as spans carry it
    pd = [
        span("tandem-gateway", "POST /v1/completions", "a", t0, t0 + 100),
        span("tandem-router", "router.generate", "a", t0 + 2, t0 + 99),
        span("tandem-decode", "decode", "a", t0 + 4, t0 + 98, **{"tandem.time_to_first_token_s": 0.040}),
        span("tandem-prefill", "prefill", "a", t0 + 7, t0 + 40),
        span("tandem-decode", "reserve_kv", "a", t0 + 10, t0 + 11),
        span("tandem-prefill", "kv_transfer", "a", t0 + 36, t0 + 39),
    ]
    unified = [
        span("tandem-gateway", "POST /v1/completions", "b", t0, t0 + 50),
        span("tandem-router", "router.generate", "b", t0 + 3, t0 + 49),
        span("tandem-worker", "generate", "b", t0 + 5, t0 + 48, **{"tandem.time_to_first_token_s": 0.030}),
    ]
    orphan = [span("tandem-router", "router.generate", "c", t0, t0 + 1)]  # its gateway span not in
    lines = {line["mode"]: line for line in trace_timeline.timelines([*unified, *orphan, *pd])}
    expected = {"mode": "pd", "router": 2, "worker": 4, "first_token": 44, "prefill": 7}
    expected |= {"reserve_kv": 10, "reserved": 11, "kv_write": 36, "kv_done": 39, "end": 100}
    assert lines["pd"] == pytest.approx(expected)
    assert lines["unified"] == pytest.approx(
        {"mode": "unified", "router": 3, "worker": 5, "first_token": 35, "end": 50}
    )
    summary = trace_timeline.summarize([lines["unified"], {**lines["unified"], "worker": 7}])
    assert summary["unified"]["requests"] == 2
    assert summary["unified"]["worker"]["p50"] == pytest.approx(6)
    assert summary["unified"]["worker"]["p90"] == pytest.approx(6.8)
    assert "prefill" not in summary["unified"]
    line = trace_timeline.summary_line("unified", summary["unified"])
    assert "2 requests" in line and "worker 6.0" in line and "first_token 35.0" in line


def otlp_body(name: str) -> bytes:
    s = Span(
        name=name, trace_id=bytes(range(16)), span_id=bytes(8), start_time_unix_nano=5, end_time_unix_nano=9
    )
    s.attributes.append(KeyValue(key="tandem.rid", value=AnyValue(string_value="r1")))
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=[s])])
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="svc")))
    return ExportTraceServiceRequest(resource_spans=[resource]).SerializeToString()


def test_receiver_decodes_otlp_and_refuses_what_is_not(tmp_path: Path) -> None:
    receiver = SpanReceiver(out=tmp_path / "spans.jsonl")
    try:
        url = f"http://127.0.0.1:{receiver.port}/v1/traces"
        headers = {"Content-Type": "application/x-protobuf"}
        bad = httpx.post(url, content=b"\xff\x00 not protobuf", headers=headers, trust_env=False)
        assert bad.status_code == 400
        good = httpx.post(url, content=otlp_body("decode"), headers=headers, trust_env=False)
        assert good.status_code == 200
        (got,) = receiver.take()
        assert got == {
            "service": "svc", "name": "decode", "trace": bytes(range(16)).hex(), "start": 5, "end": 9,
            "attributes": {"tandem.rid": "r1"},
        }  # fmt: skip
        assert receiver.take() == []
    finally:
        receiver.close()
    assert [json.loads(line)["name"] for line in (tmp_path / "spans.jsonl").read_text().splitlines()] == [
        "decode"
    ]


def test_serving_bench_traces_a_launched_pd_suite(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    flags = ["--launch", "--trace", "--topology", "pd", "--model-path", str(tiny_llama)]
    flags += ["--worker-args", "--device cpu --max-total-tokens 4096", "--log-dir", str(tmp_path / "logs")]
    flags += ["--input-len", "16", "--output-len", "4", "--concurrency", "1,2", "--num-prompts-factor", "3"]
    assert serving.main([*flags, "--warmup", "1", "--json", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [lv["completed"] for lv in levels] == [3, 6]
    for lv in levels:
        pd = lv["timeline"]["pd"]
        assert pd["requests"] == lv["completed"]  # the warm-up's and no other level's
        order = ["router", "worker", "prefill", "reserve_kv", "kv_write", "first_token", "end"]
        p50 = [pd[key]["p50"] for key in order]
        assert p50 == sorted(p50) and p50[0] > 0, dict(zip(order, p50, strict=True))


def test_trace_needs_launch() -> None:
    with pytest.raises(SystemExit, match="--trace needs --launch"):
        serving.main(["--trace", "--base-url", "http://127.0.0.1:9/v1"])
