"""OTLP over HTTP (`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`): a real `tandem up` (router, a
unified worker, gateway as processes) posts its spans to an in-test OTLP/HTTP receiver at
`OTEL_EXPORTER_OTLP_ENDPOINT` + /v1/traces, one trace per request across the three services.
Plus how the standard variables pick the protocol and the endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from services.common.tracing import TracingConfig
from tests.suite.cluster import tandem_up
from tests.suite.otlp import PROTOBUF, TRACES_PATH, HttpReceiver, http_receiver, one_span

pytestmark = pytest.mark.xdist_group("suite_otlp_http")


@pytest.fixture(scope="module")
def receiver() -> Iterator[HttpReceiver]:
    with http_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def up(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, receiver: HttpReceiver
) -> Iterator[dict[str, Any]]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # the base URL: /v1/traces is added
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    args = ("--prefill", "0", "--decode", "0", "--unified", "1")
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("otlp-http"), env, args) as info:
        yield info


def test_a_request_is_one_trace_over_otlp_http(
    client: openai.OpenAI, up: dict[str, Any], receiver: HttpReceiver
) -> None:
    reply = client.chat.completions.create(
        model=up["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    spans = receiver.trace_of(lambda s: s.attributes.get("tandem.request_id") == reply.id, 3)
    assert {s.service for s in spans} == {"tandem-gateway", "tandem-router", "tandem-worker"}, spans
    gateway = one_span(spans, "tandem-gateway", "POST /v1/chat/completions")
    router = one_span(spans, "tandem-router", "router.generate")
    worker = one_span(spans, "tandem-worker", "generate")
    assert len(spans) == 3
    assert router.parent_id == gateway.span_id and worker.parent_id == router.span_id
    assert router.attributes["tandem.mode"] == "unified"
    assert reply.usage is not None
    assert gateway.attributes["tandem.completion_tokens"] == reply.usage.completion_tokens
    with receiver.lock:  # every export was a protobuf POST to the signal path
        assert set(receiver.requests) == {(TRACES_PATH, PROTOBUF)}


ENDPOINT = "http://collector:4318"


@pytest.mark.parametrize(
    "env,protocol,endpoint",
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "grpc", "http://collector:4317"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": f"{ENDPOINT}/", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "http/protobuf",
            f"{ENDPOINT}/v1/traces",
        ),
        (  # the signal's own endpoint is the whole URL, as given
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{ENDPOINT}/custom",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/protobuf",
            },
            "http/protobuf",
            f"{ENDPOINT}/custom",
        ),
        (  # the signal's own protocol wins
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            "http/protobuf",
            f"{ENDPOINT}/v1/traces",
        ),
    ],
)
def test_protocol_and_endpoint_from_the_standard_variables(
    env: dict[str, str], protocol: str, endpoint: str
) -> None:
    config = TracingConfig.from_env(env)
    assert config.enabled and (config.protocol, config.endpoint) == (protocol, endpoint)


def test_http_json_is_refused_with_a_reason() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}
    config = TracingConfig.from_env(env)
    assert not config.enabled
    assert config.reason.startswith("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json")
    assert "no JSON" in config.reason and "supported: grpc, http/protobuf" in config.reason
