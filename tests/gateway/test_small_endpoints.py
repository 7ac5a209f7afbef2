"""The gateway's small endpoints: /version, /tokenize and /detokenize (vLLM's shapes), and which
of them want the API key when keys are on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from services.gateway import GatewayConfig
from services.version import tandem_version
from tests.gateway.conftest import GatewayThread
from tests.gateway.stub_router import MODEL_ID, StubRouter

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat runs."}]
CONTEXT = 256  # the stub router's default max_context_len


def test_version(http: httpx.Client) -> None:
    response = http.get("/version")
    assert response.status_code == 200
    assert response.json() == {"version": tandem_version()}


def test_tokenize_prompt_and_round_trip(http: httpx.Client, tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "The cat runs, the dog sleeps."
    response = http.post("/tokenize", json={"model": MODEL_ID, "prompt": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"tokens": hf.encode(text), "count": len(hf.encode(text)), "max_model_len": CONTEXT}
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == hf.encode(text, add_special_tokens=False)
    back = http.post("/detokenize", json={"model": MODEL_ID, "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    # Special tokens are kept, as vLLM's /detokenize keeps them.
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"] == hf.decode(
        body["tokens"]
    )


def test_tokenize_messages_as_a_chat_request_sends_them(http: httpx.Client, stub: StubRouter) -> None:
    chat = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 1}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    sent = list(stub.last_request.token_ids)
    body = http.post("/tokenize", json={"model": MODEL_ID, "messages": MESSAGES}).json()
    assert body["tokens"] == sent and body["count"] == len(sent)
    without = http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert without["count"] < body["count"] and sent[: without["count"]] == without["tokens"]


def test_tokenize_token_strs(http: httpx.Client, tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    body = http.post("/tokenize", json={"prompt": "a cat", "return_token_strs": True}).json()
    assert body["token_strs"] == hf.convert_ids_to_tokens(body["tokens"])


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"model": MODEL_ID}, 400, "prompt"),
        ("/tokenize", {"model": "other", "prompt": "a"}, 404, "model"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "x" * 70_000}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x" * 70_000}]}, 400, "messages"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        (
            "/tokenize",
            {"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}},
            400,
            "chat_template_kwargs.tokenize",
        ),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"),
        ("/detokenize", {"tokens": [1, -1]}, 400, "tokens[1]"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
        ("/detokenize", {"tokens": [1] * (CONTEXT + 1)}, 400, "tokens"),
        ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ],
)
def test_bad_tokenize_requests(
    http: httpx.Client, path: str, body: dict[str, object], status: int, param: str
) -> None:
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def keyed(stub: StubRouter, tokenizer_dir: Path) -> Iterator[str]:
    config = GatewayConfig(router=stub.address, tokenizer=str(tokenizer_dir), api_keys=("the-key",))
    server = GatewayThread(config).start()
    yield server.url
    server.stop()


def test_with_keys_tokenize_wants_one_and_version_does_not(keyed: str) -> None:
    with httpx.Client(base_url=keyed, timeout=10) as http:
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
            assert http.post(path, json=body).status_code == 401
            ok = http.post(path, json=body, headers={"Authorization": "Bearer the-key"})
            assert ok.status_code == 200, ok.text
        assert http.get("/version").status_code == 200
        assert http.get("/health").status_code == 200
