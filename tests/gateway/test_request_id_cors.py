"""`X-Request-Id` taken or made and echoed on every response (and used as the response id and
sent to the router), and CORS with `--allowed-origins` (off by default)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.gateway import GatewayConfig
from services.gateway.args import parse_args
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "The cat runs."}], "max_tokens": 2}
ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_client_request_id_is_echoed_and_used(http: httpx.Client, stub: StubRouter) -> None:
    response = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "req-42.a"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42.a"
    assert response.json()["id"] == "chatcmpl-req-42.a"
    assert stub.service.metadata[-1]["x-request-id"] == "req-42.a"
    body = {"model": MODEL_ID, "prompt": "a cat", "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "s-1"}) as stream:
        assert stream.headers["x-request-id"] == "s-1"
        assert '"id":"cmpl-s-1"' in stream.read().decode()


def test_request_id_is_made_when_missing_or_unusable(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=CHAT)
    made = response.headers["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", made) and response.json()["id"] == f"chatcmpl-{made}"
    for bad in ("x" * 129, "has space", ""):
        replaced = http.get("/v1/models", headers={"X-Request-Id": bad}).headers["x-request-id"]
        assert re.fullmatch("[0-9a-f]{32}", replaced)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/health", None, 200),
        ("GET", "/version", None, 200),
        ("GET", "/no-such-route", None, 404),
        ("POST", "/v1/chat/completions", {"model": MODEL_ID}, 400),
        ("POST", "/v1/completions", {"model": "other", "prompt": "a"}, 404),
        ("POST", "/tokenize", {"prompt": "a"}, 200),
    ],
)
def test_every_response_carries_it(
    http: httpx.Client, method: str, path: str, body: dict[str, object] | None, status: int
) -> None:
    response = http.request(method, path, json=body, headers={"X-Request-Id": "every-1"})
    assert response.status_code == status and response.headers["x-request-id"] == "every-1"


def test_without_allowed_origins_there_is_no_cors(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    assert http.options("/v1/chat/completions", headers=PREFLIGHT).status_code == 405


@pytest.fixture(scope="module")
def cors(stub: StubRouter, tokenizer_dir: Path) -> Iterator[str]:
    config = GatewayConfig(
        router=stub.address,
        tokenizer=str(tokenizer_dir),
        api_keys=("the-key",),
        allowed_origins=(ORIGIN, "http://localhost:3000"),
    )
    server = GatewayThread(config).start()
    yield server.url
    server.stop()


def test_cors_preflight_and_responses(cors: str) -> None:
    with httpx.Client(base_url=cors, timeout=10) as http:
        # The preflight carries no key: it is answered, not refused.
        preflight = http.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "x-request-id" in preflight.headers
        stranger = http.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers
        auth = {"Origin": ORIGIN, "Authorization": "Bearer the-key"}
        response = http.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
        # A 401 is readable by the page too.
        refused = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_allowed_origins_flag() -> None:
    base = ["--router", "r:1", "--tokenizer", "t"]
    assert parse_args(base).allowed_origins == ()
    config = parse_args([*base, "--allowed-origins", "https://a.example, http://localhost:3000"])
    assert config.allowed_origins == ("https://a.example", "http://localhost:3000")
    assert parse_args([*base, "--allowed-origins", "*"]).allowed_origins == ("*",)
