"""Embeddings end to end: `tandem up --prefill 0 --decode 0` serving a tiny embedding checkpoint
(architectures LlamaModel, no lm head), driven by the official `openai` client and by LiteLLM;
the vectors equal HF transformers' AutoModel forward + pooling on the same weights."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from tests.engine.test_embeddings import hf_embedding
from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_embeddings")
KEY = "embed-key"


@pytest.fixture(scope="module")
def embedder(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama", embedding=True)


@pytest.fixture(scope="module")
def up(embedder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    args = ("--prefill", "0", "--decode", "0", "--api-key", KEY)
    with tandem_up(embedder, tmp_path_factory.mktemp("embed-up"), args=args) as info:
        yield info


@pytest.fixture(scope="module")
def client(up: dict[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=up["openai"], api_key=KEY, max_retries=0)


def tokenize(up: dict[str, Any], text: str) -> list[int]:
    base = up["openai"].removesuffix("/v1")
    r = httpx.post(
        f"{base}/tokenize", json={"prompt": text}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    return list(r.json()["tokens"])


def cosine(a: list[float], b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), b, dim=0))


def test_openai_client_embeddings_equal_hf(client: openai.OpenAI, up: dict[str, Any], embedder: Path) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog, again and again"]
    # The SDK asks for base64 by default and decodes it: this checks our encoding too.
    resp = client.embeddings.create(model=up["model"], input=texts)
    assert [d.index for d in resp.data] == [0, 1]
    ids = [tokenize(up, t) for t in texts]
    assert resp.usage.prompt_tokens == sum(map(len, ids)) == resp.usage.total_tokens
    for d, prompt in zip(resp.data, ids):
        want = hf_embedding(embedder, prompt, "last")
        assert cosine(d.embedding, want) > 0.9999
        torch.testing.assert_close(torch.tensor(d.embedding), want, atol=1e-3, rtol=1e-3)
    mean = client.embeddings.create(model=up["model"], input=ids[0], extra_body={"pooling": "mean"})
    assert cosine(mean.data[0].embedding, hf_embedding(embedder, ids[0], "mean")) > 0.9999


def test_base64_equals_float_and_dimensions_renormalize(client: openai.OpenAI, up: dict[str, Any]) -> None:
    model, text = up["model"], "a sentence to embed"
    floats = client.embeddings.create(model=model, input=text, encoding_format="float").data[0].embedding
    raw = client.with_raw_response.embeddings.create(model=model, input=text, encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert isinstance(encoded, str)
    data = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(data) // 4}f", data)) == floats
    cut = (
        client.embeddings.create(model=model, input=text, dimensions=8, encoding_format="float")
        .data[0]
        .embedding
    )
    assert len(cut) == 8
    want = torch.nn.functional.normalize(torch.tensor(floats[:8]), dim=0)
    torch.testing.assert_close(torch.tensor(cut), want, atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_400_naming_the_field(client: openai.OpenAI, up: dict[str, Any]) -> None:
    model = up["model"]
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ([], {}, "input"),
        ([5, 10**6], {}, "input"),  # outside the vocabulary
        ([[5, 6], [7] * 100_000], {}, "input[1]"),  # past the context
        ("x", {"dimensions": 10**6}, "dimensions"),
    ]
    for inp, extra, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=model, input=inp, encoding_format="float", **extra)
        assert e.value.status_code == 400
        assert e.value.param == param, (inp, e.value)


def test_generation_on_the_embedding_model_is_a_clear_400(client: openai.OpenAI, up: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError, match="embedding model") as e:
        client.completions.create(model=up["model"], prompt="hello", max_tokens=4)
    assert e.value.param == "model"


def test_the_api_key_guards_embeddings(up: dict[str, Any]) -> None:
    r = httpx.post(f"{up['openai']}/embeddings", json={"model": up["model"], "input": "x"}, timeout=10)
    assert r.status_code == 401


@pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")  # litellm's
def test_litellm_embedding_equals_hf(
    up: dict[str, Any], embedder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LiteLLM's `embedding()` through its OpenAI-compatible provider (`openai/<model id>`)."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    litellm = pytest.importorskip("litellm")
    texts = ["The quick brown fox", "a second, longer sentence to embed"]
    resp = litellm.embedding(model=f"openai/{up['model']}", input=texts, api_base=up["openai"], api_key=KEY)
    assert [d["index"] for d in resp.data] == [0, 1]
    for d, text in zip(resp.data, texts):
        assert cosine(d["embedding"], hf_embedding(embedder, tokenize(up, text), "last")) > 0.9999
    assert resp.usage.prompt_tokens == sum(len(tokenize(up, t)) for t in texts)
