"""Embedding requests (shared/pooling.py): pooled hidden states equal HF's `AutoModel` forward on
the same tiny weights, through `EngineCore` (chunked prefill, prefix cache, mixed batches) and
through the engine process (`EngineClient`)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.engine_core import EngineCore
from shared.errors import InvalidRequest
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from shared.pooling import PoolingParams
from shared.sampling import SamplingParams
from tests.engine.hf_reference import load_hf


@pytest.fixture(scope="session")
def tiny_embedder(tiny_model_factory: Callable[..., Path]) -> Path:
    """A Llama-shaped embedding checkpoint: architectures LlamaModel, bare names, no lm head."""
    return tiny_model_factory("llama", embedding=True)


def hf_embedding(
    model_path: Path, ids: list[int], pooling: str, normalize: bool = True, dims: int | None = None
) -> torch.Tensor:
    """HF transformers' own forward (AutoModel, float32) and the pooling done by hand."""
    from transformers import AutoModel

    model = load_hf(model_path, AutoModel)
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]  # [T, H], after the final norm
    vec = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    if dims is not None:
        vec = vec[:dims]
    return torch.nn.functional.normalize(vec, dim=-1) if normalize else vec


def run(core: EngineCore) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    while core.has_work:
        for out in core.step():
            if out.finished:
                done[out.rid] = out
    return done


@pytest.fixture(scope="module")
def core(tiny_embedder: Path) -> EngineCore:
    # A small chunk budget so a long prompt spans several steps (mean pooling across chunks).
    config = EngineConfig.from_options(
        str(tiny_embedder), page_size=4, chunked_prefill_size=16, dtype="float32", debug_invariants=True
    )
    return EngineCore(config)


def test_the_checkpoint_is_an_embedding_layout(tiny_embedder: Path) -> None:
    import json

    from safetensors import safe_open

    assert json.loads((tiny_embedder / "config.json").read_text())["architectures"] == ["LlamaModel"]
    with safe_open(str(tiny_embedder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert "embed_tokens.weight" in names and not any(n.startswith(("model.", "lm_head")) for n in names)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_embedding_matches_hf(core: EngineCore, tiny_embedder: Path, pooling: str) -> None:
    prompts = {"short": list(range(5, 12)), "long": list(range(30, 75))}  # 45 tokens: 3 chunks
    for rid, ids in prompts.items():
        core.add_request([f"{pooling}-{rid}"], ids, SamplingParams(), pooling=PoolingParams(pooling))
    done = run(core)
    for rid, ids in prompts.items():
        out = done[f"{pooling}-{rid}"]
        assert out.embedding is not None and out.new_ids == [] and out.prompt_tokens == len(ids)
        assert out.finish_reason == {"type": "stop"}
        got = torch.tensor(out.embedding)
        want = hf_embedding(tiny_embedder, ids, pooling)
        assert got.shape == want.shape
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99999
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    core.check_idle()


def test_cached_prefix_gives_the_same_last_token_embedding(core: EngineCore) -> None:
    ids = list(range(100, 140))
    core.add_request(["first"], ids, SamplingParams(), pooling=PoolingParams())
    first = run(core)["first"]
    core.add_request(["again"], ids, SamplingParams(), pooling=PoolingParams())
    again = run(core)["again"]
    assert again.cached_tokens > 0  # the radix cache served the prefix
    torch.testing.assert_close(
        torch.tensor(again.embedding), torch.tensor(first.embedding), atol=1e-5, rtol=1e-5
    )


def test_dimensions_truncate_then_renormalize(core: EngineCore, tiny_embedder: Path) -> None:
    ids = list(range(7, 20))
    core.add_request(["full"], ids, SamplingParams(), pooling=PoolingParams(normalize=False))
    core.add_request(["cut"], ids, SamplingParams(), pooling=PoolingParams(dimensions=8))
    done = run(core)
    full, cut = torch.tensor(done["full"].embedding), torch.tensor(done["cut"].embedding)
    assert cut.shape == (8,)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(full[:8], dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cut, hf_embedding(tiny_embedder, ids, "last", dims=8), atol=1e-4, rtol=1e-4)
    assert abs(float(full.norm()) - 1.0) > 1e-3  # not normalized when asked not to


def test_bad_embedding_requests_name_the_field(core: EngineCore) -> None:
    with pytest.raises(InvalidRequest) as e:
        core.add_request(["d"], [5, 6], SamplingParams(), pooling=PoolingParams(dimensions=10_000))
    assert e.value.param == "dimensions"
    with pytest.raises(InvalidRequest) as e:
        core.add_request(["v"], [core.runner.vocab_size], SamplingParams(), pooling=PoolingParams())
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="embedding model") as e:
        core.add_request(["g"], [5, 6], SamplingParams())
    assert e.value.param == "model"
    assert not core.has_work


def test_a_generative_model_embeds_beside_its_decodes(tiny_llama: Path) -> None:
    """A causal LM may answer embedding requests too; they share steps with decoding requests
    and leave the decodes' tokens unchanged."""
    from tests.engine.hf_reference import hf_greedy

    config = EngineConfig.from_options(str(tiny_llama), page_size=4, dtype="float32", debug_invariants=True)
    core = EngineCore(config)
    prompt = list(range(20, 30))
    core.add_request(["gen"], prompt, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))
    tokens = [t for out in core.step() for t in out.new_ids]  # decoding when the embedding arrives
    core.add_request(["emb"], list(range(40, 60)), SamplingParams(), pooling=PoolingParams("mean"))
    done: dict[str, RequestOutput] = {}
    while core.has_work:
        for out in core.step():
            if out.rid == "gen":
                tokens += out.new_ids
            if out.finished:
                done[out.rid] = out
    emb = done["emb"].embedding
    assert emb is not None and len(emb) == core.runner.model_config.hidden_size
    assert abs(float(torch.tensor(emb).norm()) - 1.0) < 1e-5
    assert tokens == hf_greedy(tiny_llama, prompt, 8)
    core.check_idle()


@pytest.fixture(scope="module")
def client(tiny_embedder: Path) -> Iterator[EngineClient]:
    c = EngineClient(EngineConfig.from_options(str(tiny_embedder), page_size=4, dtype="float32"))
    yield c
    c.shutdown()


def embed(client: EngineClient, rid: str, ids: list[int], pooling: dict[str, Any]) -> RequestOutput:
    got: queue.Queue[RequestOutput | BaseException] = queue.Queue()
    client.embed(rid, ids, pooling, got.put).result(timeout=60)
    out = got.get(timeout=60)
    if isinstance(out, BaseException):
        raise out
    assert out.finished
    return out


def test_embedding_through_the_engine_process(client: EngineClient, tiny_embedder: Path) -> None:
    ids = list(range(9, 31))
    for pooling in ("last", "mean"):
        out = embed(client, pooling, ids, {"pooling": pooling})
        torch.testing.assert_close(
            torch.tensor(out.embedding), hf_embedding(tiny_embedder, ids, pooling), atol=1e-4, rtol=1e-4
        )
    with pytest.raises(InvalidRequest, match="embedding model"):
        client.add(["gen"], Prompt(ids, {"max_new_tokens": 2}), lambda _: None)
    with pytest.raises(InvalidRequest, match="dimensions"):
        client.embed("bad", ids, {"dimensions": 0}, lambda _: None).result(timeout=60)


@pytest.mark.parametrize("arch_name", ["Qwen3Model", "Qwen3ForCausalLM"])
def test_qwen3_embedding_layouts_match_hf(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, arch_name: str
) -> None:
    """Qwen3-Embedding's layout: the bare stack, listed as `Qwen3Model` or (as the real
    checkpoint does) `Qwen3ForCausalLM`; both load as the embedder."""
    import json
    import shutil

    src = tiny_model_factory("qwen3", embedding=True)
    path = tmp_path / "qwen3-embed"
    shutil.copytree(src, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [arch_name]
    (path / "config.json").write_text(json.dumps(config))
    core = EngineCore(EngineConfig.from_options(str(path), page_size=4, dtype="float32"))
    assert core.runner.is_embedding
    ids = list(range(3, 40))
    core.add_request(["q"], ids, SamplingParams(), pooling=PoolingParams())
    got = torch.tensor(run(core)["q"].embedding)
    torch.testing.assert_close(got, hf_embedding(src, ids, "last"), atol=1e-4, rtol=1e-4)


def test_offline_engine_encode(tiny_embedder: Path) -> None:
    from shared import Engine

    with Engine(model_path=str(tiny_embedder), page_size=4, dtype="float32") as engine:
        ids = list(range(11, 29))
        one = engine.encode(input_ids=ids, pooling="mean")
        assert isinstance(one, dict) and one["meta_info"]["prompt_tokens"] == len(ids)
        want = hf_embedding(tiny_embedder, ids, "mean")
        torch.testing.assert_close(torch.tensor(one["embedding"]), want, atol=1e-4, rtol=1e-4)
        many = engine.encode(prompt=["a b c", "hello"], dimensions=4)
        assert isinstance(many, list) and [len(m["embedding"]) for m in many] == [4, 4]
        with pytest.raises(InvalidRequest, match="embedding model"):
            engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 2})


@pytest.mark.parametrize(
    ("arch", "architecture", "overrides"),
    [
        # e5-mistral-7b-instruct's layout: MistralModel, with Mistral's sliding window in the config.
        ("mistral", "MistralModel", {"sliding_window": 8}),
        ("qwen2", "Qwen2Model", {}),  # gte-Qwen2's layout
    ],
)
def test_mistral_and_qwen2_embedders_match_hf(
    tiny_model_factory: Callable[..., Path], arch: str, architecture: str, overrides: dict[str, Any]
) -> None:
    import json

    path = tiny_model_factory(arch, embedding=True, **overrides)
    assert json.loads((path / "config.json").read_text())["architectures"] == [architecture]
    core = EngineCore(
        EngineConfig.from_options(
            str(path), page_size=4, chunked_prefill_size=16, dtype="float32", debug_invariants=True
        )
    )
    prompts = {"short": list(range(5, 12)), "long": list(range(30, 75))}  # longer than the window
    for rid, ids in prompts.items():
        for pooling in ("last", "mean"):
            core.add_request([f"{pooling}-{rid}"], ids, SamplingParams(), pooling=PoolingParams(pooling))
    done = run(core)
    for rid, ids in prompts.items():
        for pooling in ("last", "mean"):
            got = torch.tensor(done[f"{pooling}-{rid}"].embedding)
            torch.testing.assert_close(got, hf_embedding(path, ids, pooling), atol=1e-4, rtol=1e-4)
    core.check_idle()
