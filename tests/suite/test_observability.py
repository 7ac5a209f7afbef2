"""Traces and metrics of a real `tandem up` (router, a prefill and a decode worker, gateway as
processes): spans arrive at an in-test OTLP/gRPC receiver, one trace per request across all four
services; every series docs/observability.md lists is on each service's /metrics and moves
with traffic. Plus the no-op path: without an OTLP endpoint no SDK provider is installed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families

from services.common.tracing import TracingConfig, setup_tracing
from tests.suite.cluster import admin_auth, tandem_up
from tests.suite.otlp import Receiver, Span, grpc_receiver, one_span

pytestmark = pytest.mark.xdist_group("suite_observability")

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("tandem-gateway", "tandem-router", "tandem-prefill", "tandem-decode")
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


# ---- the suite, up once for the module ------------------------------------------------------------


def scrape(url: str) -> dict[str, Any]:
    """{family name: family} (counters under their name without `_total`, as the parser gives)."""
    text = httpx.get(url, timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of series `name` with these labels (0 when absent)."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with grpc_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def up(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> Iterator[dict[str, Any]]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("observability"), env) as info:
        info["before"] = {name: scrape(url) for name, url in info["metrics"].items()}
        yield info


@pytest.fixture(scope="module")
def traffic(up: dict[str, Any]) -> dict[str, Any]:
    """Three chat requests (one streamed), one continuing a caller's trace and one the decode
    engine refuses; then the scrape."""
    client = openai.OpenAI(base_url=up["openai"], api_key="unused", max_retries=0)
    plain = [
        client.chat.completions.create(model=up["model"], messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
        for _ in range(2)
    ]
    chunks = list(
        client.chat.completions.create(
            model=up["model"],
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    continued = client.chat.completions.create(
        model=up["model"],
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=4,
        extra_headers={"traceparent": f"00-{caller_trace}-{caller_span}-01", "X-Request-Id": "caller-7"},
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=up["model"],
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
            extra_body={"stop_token_ids": [10**6]},  # outside the vocabulary: the engine says no
        )
    return {
        "plain": plain,
        "refused": refused.value,
        "stream": chunks,
        "continued": continued,
        "caller": (caller_trace, caller_span),
        "requests": 4,
        "after": {name: scrape(url) for name, url in up["metrics"].items()},
    }


def check_request_trace(receiver: Receiver, request_id: str, usage: Any, stream: bool) -> list[Span]:
    """The trace of one gateway request: six spans in four services, correctly parented."""
    spans = receiver.trace_of(lambda s: s.attributes.get("tandem.request_id") == request_id, 6)
    assert {s.service for s in spans} == set(SERVICES), [(s.service, s.name) for s in spans]
    gateway = one_span(spans, "tandem-gateway", "POST /v1/chat/completions")
    router = one_span(spans, "tandem-router", "router.generate")
    prefill = one_span(spans, "tandem-prefill", "prefill")
    transfer = one_span(spans, "tandem-prefill", "kv_transfer")
    decode = one_span(spans, "tandem-decode", "decode")
    reserve = one_span(spans, "tandem-decode", "reserve_kv")
    assert len(spans) == 6
    assert router.parent_id == gateway.span_id
    assert prefill.parent_id == decode.parent_id == router.span_id
    assert transfer.parent_id == reserve.parent_id == prefill.span_id
    assert reserve.attributes["tandem.kv_pages"] > 0 and reserve.end_ns <= transfer.end_ns
    assert all(s.error is None for s in spans), [(s.name, s.error) for s in spans]

    g = gateway.attributes
    assert g["http.route"] == "/v1/chat/completions" and g["http.response.status_code"] == 200
    assert g["tandem.stream"] is stream and g["tandem.n"] == 1 and g["gen_ai.request.model"]
    assert (g["tandem.prompt_tokens"], g["tandem.completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    r = router.attributes
    assert r["tandem.mode"] == "pd" and r["tandem.attempts"] == 1 and r["rpc.grpc.status_code"] == 0
    assert r["tandem.prefill_worker"] and r["tandem.decode_worker"]
    assert (r["tandem.prompt_tokens"], r["tandem.completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    routes = {e["role"]: e for name, e in router.events if name == "route"}
    assert routes["prefill"]["worker"] == r["tandem.prefill_worker"] and routes["prefill"]["policy"]
    assert routes["decode"]["worker"] == r["tandem.decode_worker"] and routes["decode"]["policy"]
    rid_prefix = f"{r['tandem.request_id']}-"
    assert prefill.attributes["tandem.rid"].startswith(rid_prefix)
    assert prefill.attributes["tandem.prompt_tokens"] == usage.prompt_tokens
    assert "tandem.cached_tokens" in prefill.attributes
    t = transfer.attributes
    assert t["tandem.kv_bytes"] > 0 and t["tandem.kv_transport"] in ("nixl", "grpc")
    assert t["tandem.kv_peer"] == r["tandem.decode_worker"]
    slack = 5_000_000  # ns: the engine process stamps the transfer with its own clock reads
    assert prefill.start_ns - slack <= transfer.start_ns <= transfer.end_ns <= prefill.end_ns + slack
    d = decode.attributes
    assert d["tandem.rid"] == prefill.attributes["tandem.rid"]
    assert d["tandem.completion_tokens"] == usage.completion_tokens
    assert 0 < d["tandem.time_to_first_token_s"] < (decode.end_ns - decode.start_ns) / 1e9 + 1e-3
    with receiver.lock:  # nothing of this request landed in another trace
        strays = [
            s
            for s in receiver.spans
            if str(s.attributes.get("tandem.rid", "")).startswith(rid_prefix)
            and s.trace_id != gateway.trace_id
        ]
    assert not strays
    return spans


# ---- traces ---------------------------------------------------------------------------------------


def test_each_request_is_one_trace_across_the_four_services(
    receiver: Receiver, traffic: dict[str, Any]
) -> None:
    for reply in traffic["plain"]:
        check_request_trace(receiver, reply.id, reply.usage, stream=False)
    chunks = traffic["stream"]
    check_request_trace(receiver, chunks[0].id, chunks[-1].usage, stream=True)
    ids = {s.trace_id for s in receiver.spans if s.name == "router.generate"}
    assert len(ids) >= 4


def test_a_callers_traceparent_is_continued(receiver: Receiver, traffic: dict[str, Any]) -> None:
    caller_trace, caller_span = traffic["caller"]
    reply = traffic["continued"]
    spans = check_request_trace(receiver, reply.id, reply.usage, stream=False)
    gateway = one_span(spans, "tandem-gateway", "POST /v1/chat/completions")
    assert gateway.trace_id == caller_trace and gateway.parent_id == caller_span
    # The caller's X-Request-Id names the response and rides on the gateway's and router's spans.
    assert reply.id == "chatcmpl-caller-7"
    router = one_span(spans, "tandem-router", "router.generate")
    assert gateway.attributes["tandem.x_request_id"] == router.attributes["tandem.x_request_id"] == "caller-7"


def test_a_failure_is_an_error_on_the_spans_it_crossed(receiver: Receiver, traffic: dict[str, Any]) -> None:
    assert traffic["refused"].status_code == 400
    spans = receiver.trace_of(lambda s: s.attributes.get("rpc.grpc.status_code") == 3, 3)
    gateway = one_span(spans, "tandem-gateway", "POST /v1/chat/completions")
    router = one_span(spans, "tandem-router", "router.generate")
    decode = one_span(spans, "tandem-decode", "decode")
    assert gateway.attributes["http.response.status_code"] == 400 and gateway.error is None  # the caller's
    assert router.error is not None and router.error.startswith("INVALID_ARGUMENT: stop_token_ids")
    # The router starts the prefill leg on decode's reservation message, which comes before
    # decode's engine answers: the refusal is on the leg whose answer the router read first
    # (decode's, or prefill's: CI saw both), and every leg that ran ended in an error (refused,
    # or cancelled by the router once it had the other's refusal).
    legs = [decode, *(s for s in spans if s.service == "tandem-prefill")]
    assert any(s.error is not None and "stop_token_ids" in s.error for s in legs), [s.error for s in legs]
    assert all(s.error is not None for s in legs)


# ---- metrics --------------------------------------------------------------------------------------


def documented_metrics() -> dict[str, set[str]]:
    """docs/observability.md's metric tables: {"gateway" | "router" | "worker" | "node": names}
    ("node": a multi-node follower's, tests/engine/test_tensor_parallel_nodes.py)."""
    out: dict[str, set[str]] = {"gateway": set(), "router": set(), "worker": set(), "node": set()}
    for line in (ROOT / "docs" / "observability.md").read_text().splitlines():
        cells = line.strip().split("|")
        if len(cells) > 2 and (m := re.match(r"\s*`(tandem_([a-z]+)_[a-z0-9_]*)`", cells[1])):
            out[m.group(2)].add(m.group(1))
    return out


def family_of(process: str) -> str:
    return process if process in ("gateway", "router") else "worker"


def test_every_documented_series_is_served(up: dict[str, Any], traffic: dict[str, Any]) -> None:
    documented = documented_metrics()
    assert all(documented.values()), documented
    assert set(up["metrics"]) == {"router", "prefill-0", "decode-0", "gateway"}
    for process, families in traffic["after"].items():
        for name in documented[family_of(process)]:
            assert name in families or name.removesuffix("_total") in families, (process, name)


def test_metrics_move_with_traffic(up: dict[str, Any], traffic: dict[str, Any]) -> None:
    before, after, n = up["before"], traffic["after"], traffic["requests"]

    def moved(process: str, name: str, **labels: str) -> float:
        return sample(after[process], name, **labels) - sample(before[process], name, **labels)

    chat = {"endpoint": "/v1/chat/completions"}
    assert moved("gateway", "tandem_gateway_requests_total", status="200", **chat) == n
    assert moved("gateway", "tandem_gateway_requests_total", status="400", **chat) == 1
    assert moved("gateway", "tandem_gateway_request_duration_seconds_count", **chat) == n + 1
    assert moved("gateway", "tandem_gateway_time_to_first_token_seconds_count", **chat) == 1
    assert sample(after["gateway"], "tandem_gateway_requests_in_flight") >= 0

    assert moved("router", "tandem_router_requests_total", mode="pd", status="OK") == n
    assert moved("router", "tandem_router_requests_total", mode="pd", status="INVALID_ARGUMENT") == 1
    for hist in ("time_to_first_token", "e2e_request_latency"):
        assert moved("router", f"tandem_router_{hist}_seconds_count") == n
    assert moved("router", "tandem_router_inter_token_latency_seconds_count") > 0
    completion = sum(r.usage.completion_tokens for r in [*traffic["plain"], traffic["continued"]])
    completion += traffic["stream"][-1].usage.completion_tokens
    assert moved("router", "tandem_router_generation_tokens_total") == completion
    assert moved("router", "tandem_router_prompt_tokens_total") > 0
    listed = httpx.get(up["router_admin"], headers=admin_auth(up), timeout=5).json()["workers"]
    workers = {w["role"]: w["address"] for w in listed}
    assert set(workers) == {"prefill", "decode"}
    for role, address in workers.items():  # the refused request was routed too
        assert moved("router", "tandem_router_decisions_total", role=role, worker=address) == n + 1
    # The refused request (its schema does not compile) is the client's error, not a worker's:
    # counted in the request's status above, never as a worker error (an alert on those would
    # fire on bad input).
    refusals = [
        moved(
            "router", "tandem_router_worker_errors_total", role=role, worker=address, code="INVALID_ARGUMENT"
        )
        for role, address in workers.items()
    ]
    assert refusals == [0, 0], refusals
    assert sample(after["router"], "tandem_router_workers", role="prefill", state="healthy") == 1
    assert sample(after["router"], "tandem_router_workers", role="decode", state="healthy") == 1

    for process, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        assert sample(after[process], "tandem_worker_info", role=role) == 1
        assert moved(process, "tandem_worker_prompt_tokens_total") > 0
        assert moved(process, "tandem_worker_generation_tokens_total") > 0
        assert sample(after[process], "tandem_worker_kv_tokens", state="free") > 0
    assert moved("prefill-0", "tandem_worker_kv_transfer_bytes_total", direction="sent") > 0
    assert moved("prefill-0", "tandem_worker_kv_transfer_seconds_count") == n
    assert moved("decode-0", "tandem_worker_kv_transfer_bytes_total", direction="received") > 0
    assert moved("decode-0", "tandem_worker_kv_reservations_total", outcome="granted") == n
    assert sample(after["decode-0"], "tandem_worker_kv_reservations_total", outcome="expired") == 0
    for hist in ("time_to_first_token", "e2e_request_latency"):
        assert moved("decode-0", f"tandem_worker_{hist}_seconds_count") == n
    # Where the engines' steps went: prompt tokens on the prefill side, decode rows on the other.
    assert moved("prefill-0", "tandem_worker_engine_steps_total", kind="prefill") > 0
    assert moved("prefill-0", "tandem_worker_engine_prefill_tokens_total") == moved(
        "prefill-0", "tandem_worker_prompt_tokens_computed_total"
    )
    assert moved("prefill-0", "tandem_worker_engine_decode_rows_total") == 0
    decode_steps = moved("decode-0", "tandem_worker_engine_steps_total", kind="decode")
    assert decode_steps > 0
    assert moved("decode-0", "tandem_worker_engine_decode_rows_total") >= decode_steps
    assert moved("decode-0", "tandem_worker_engine_step_host_seconds_total") > 0
    assert sample(after["decode-0"], "tandem_worker_engine_step_gpu_seconds_total") == 0  # CPU: no timing
    # The same prompt four times: the prefill worker's prefix cache served part of it.
    assert moved("prefill-0", "tandem_worker_cached_tokens_total") > 0
    assert 0 < sample(after["prefill-0"], "tandem_worker_prefix_cache_hit_ratio") < 1


# ---- the no-op path -------------------------------------------------------------------------------


def test_without_an_otlp_endpoint_no_sdk_provider_is_installed() -> None:
    assert not TracingConfig.from_env({}).enabled
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert TracingConfig.from_env(endpoint).enabled
    assert not TracingConfig.from_env({**endpoint, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not TracingConfig.from_env({**endpoint, "OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not TracingConfig.from_env({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}).enabled
    tracing = setup_tracing("tandem-test", environ={})
    assert not tracing.enabled
    provider = trace.get_tracer_provider()
    assert type(provider).__module__.startswith("opentelemetry.trace"), provider  # the API's, not the SDK's
    with trace.get_tracer("t").start_as_current_span("s") as span:
        assert not span.is_recording()
    tracing.shutdown()
