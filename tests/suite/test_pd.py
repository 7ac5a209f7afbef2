"""The PD suite end to end over loopback: router + prefill worker + decode worker as processes.

Greedy outputs equal HF transformers; the decode worker never computes a prompt; the KV bytes
that moved equal the prompt's pages; NIXL and the gRPC transport give identical results."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from services.common.errors import PARAM_METADATA_KEY
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2
from shared.transfer import nixl_available
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import Cluster, Service, collect

pytestmark = pytest.mark.xdist_group("suite_pd")

TRANSPORTS = [
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")),
    "grpc",
]
PAGE_SIZE = 16


def kv_bytes_per_token(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[
        cfg["torch_dtype"] if "torch_dtype" in cfg else cfg["dtype"]
    ]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize  # K and V


@pytest.fixture(scope="module", params=TRANSPORTS)
def pd(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Service, Service]]:
    transport = request.param
    with Cluster(tiny_llama, tmp_path_factory.mktemp(f"pd-{transport}")) as cluster:
        cluster.start_router()
        prefill, decode = cluster.start_workers(
            [
                # Forgets the decode worker after 1 s without a prompt: the tests below also
                # run with it learnt again (channel, NIXL agent) between their requests.
                (
                    "prefill",
                    "--kv-transport",
                    transport,
                    "--chunked-prefill-size",
                    "32",
                    "--forget-decode-after",
                    "1",
                ),
                ("decode", "--kv-transport", transport),
            ]
        )
        yield cluster, prefill, decode


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randrange(3, 90))] for _ in range(count)]


def test_greedy_equals_hf_and_decode_never_runs_the_prompt(
    pd: tuple[Cluster, Service, Service], tiny_llama: Path
) -> None:
    cluster, prefill, decode = pd
    p0, d0 = prefill.load().counters, decode.load().counters
    batch = prompts(4, seed=1)
    for ids in batch:
        (sample,) = collect(
            cluster.generate(ids, max_new_tokens=8, temperature=0.0, ignore_eos=True)
        ).values()
        assert sample["ids"] == hf_greedy(tiny_llama, ids, 8)
        assert sample["finish"].reason == common_pb2.FINISH_REASON_LENGTH
        assert sample["usage"].prompt_tokens == len(ids) and sample["usage"].completion_tokens == 8
        assert sample["route"].prefill_worker == prefill.address
        assert sample["route"].decode_worker == decode.address
    p1, d1 = prefill.load().counters, decode.load().counters
    assert d1["prompt_tokens_computed"] == d0.get("prompt_tokens_computed", 0) == 0
    pages = sum(-(-len(ids) // PAGE_SIZE) for ids in batch)
    sent = p1["kv_bytes_sent"] - p0.get("kv_bytes_sent", 0)
    assert (
        sent
        == d1["kv_bytes_received"] - d0.get("kv_bytes_received", 0)
        == pages * PAGE_SIZE * kv_bytes_per_token(tiny_llama)
    )
    assert p1["kv_transfers"] - p0.get("kv_transfers", 0) == len(batch)


def test_an_idle_decode_worker_is_forgotten_and_learnt_again(
    pd: tuple[Cluster, Service, Service], tiny_llama: Path
) -> None:
    """After `--forget-decode-after` (1 s here) without a prompt for it, the prefill worker closes
    its channel to the decode worker and its engine drops the decode engine's NIXL agent; the
    next request learns both again."""
    cluster, prefill, decode = pd
    ids = prompts(1, seed=3)[0]
    forgotten = f"forgetting decode worker {decode.address}"
    logged = prefill.log.read_text().count(forgotten)  # before: it may be forgotten at once after
    assert collect(cluster.generate(ids, max_new_tokens=4, temperature=0.0))[0]["ids"] == hf_greedy(
        tiny_llama, ids, 4
    )
    nixl = "nixl" in prefill.process.args

    def forgot() -> bool:  # with NIXL its engine no longer knows the agent the request taught it
        return prefill.log.read_text().count(forgotten) > logged and (
            not nixl or prefill.load().counters["kv_peers"] == 0
        )

    cluster.wait(forgot, "the decode worker forgotten")
    assert collect(cluster.generate(ids, max_new_tokens=4, temperature=0.0))[0]["ids"] == hf_greedy(
        tiny_llama, ids, 4
    )


def test_n_samples_logprobs_and_stop(pd: tuple[Cluster, Service, Service]) -> None:
    cluster, _, _ = pd
    ids = prompts(1, seed=2)[0]
    out = collect(
        cluster.generate(
            ids,
            n=3,
            max_new_tokens=6,
            temperature=1.0,
            seed=7,
            ignore_eos=True,
            return_logprob=True,
            top_logprobs_num=2,
        )
    )
    assert sorted(out) == [0, 1, 2]
    for sample in out.values():
        assert len(sample["ids"]) == 6 and len(sample["logprobs"]) == 6
        assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in sample["logprobs"])
        assert [lp.token_id for lp in sample["logprobs"]] == sample["ids"]
    # Seeded: the same request again gives the same samples.
    again = collect(cluster.generate(ids, n=3, max_new_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
    assert [again[i]["ids"] for i in range(3)] == [out[i]["ids"] for i in range(3)]
    # A stop token id taken from a greedy run ends generation there.
    greedy = collect(cluster.generate(ids, max_new_tokens=6, temperature=0.0, ignore_eos=True))[0]["ids"]
    stopped = collect(cluster.generate(ids, max_new_tokens=6, temperature=0.0, stop_token_ids=[greedy[2]]))[0]
    assert stopped["ids"] == greedy[: greedy.index(greedy[2]) + 1]
    assert stopped["finish"].reason == common_pb2.FINISH_REASON_STOP


def test_text_in_text_out(pd: tuple[Cluster, Service, Service]) -> None:
    cluster, _, _ = pd
    ids = list(
        cluster.stub.Tokenize(
            router_pb2.TokenizeRequest(text="Hello there", add_special_tokens=True), timeout=10
        ).token_ids
    )
    by_text = collect(
        cluster.generate(text="Hello there", max_new_tokens=5, temperature=0.0, ignore_eos=True)
    )[0]
    by_ids = collect(cluster.generate(ids, max_new_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert by_text["ids"] == by_ids["ids"] and by_text["text"] == by_ids["text"]
    models = cluster.stub.ListModels(router_pb2.ListModelsRequest(), timeout=5).models
    assert [m.id for m in models] == [Path(cluster.model).name] and models[0].max_context_len > 0


@pytest.mark.parametrize(
    ("kwargs", "message", "param"),
    [
        ({"temperature": -1.0}, "temperature", "temperature"),  # checked by the engine
        ({"top_p": 1.5}, "top_p", "top_p"),
        ({"min_new_tokens": 9, "max_new_tokens": 2}, "min_new_tokens", "min_new_tokens"),
        ({"n": 99}, "n must be", "n"),  # checked by the router
        ({"token_ids": [10**7]}, "token ids", "prompt"),
        ({"token_ids": []}, "empty", "text"),
    ],
)
def test_bad_requests_are_refused_and_the_suite_keeps_serving(
    pd: tuple[Cluster, Service, Service], kwargs: dict[str, object], message: str, param: str
) -> None:
    cluster, prefill, decode = pd
    kwargs = dict(kwargs)  # parametrize values are shared between the transports
    token_ids = kwargs.pop("token_ids", [5, 6, 7])
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(token_ids, **kwargs)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    # The field at fault crossed the engine process, the worker and the router as data.
    trailing = dict(err.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert trailing.get(PARAM_METADATA_KEY) == param
    assert collect(cluster.generate([5, 6, 7], max_new_tokens=2))[0]["finish"] is not None
    for worker in (prefill, decode):
        worker.wait_released()


def test_a_prompt_that_generates_nothing_is_answered_without_a_prefill(
    pd: tuple[Cluster, Service, Service],
) -> None:
    """max_new_tokens 0 (a completion that only echoes or scores its prompt): answered as a
    unified worker answers it, `length` with no tokens and the prompt counted, by the decode
    worker at once; no prefill leg and no KV moved. Bad input is still refused."""
    cluster, prefill, decode = pd
    ids = prompts(1, seed=5)[0]
    before = prefill.load().counters
    out = collect(cluster.generate(ids, n=2, max_new_tokens=0, temperature=0.0))
    assert sorted(out) == [0, 1]
    for sample in out.values():
        assert sample["ids"] == [] and sample["finish"].reason == common_pb2.FINISH_REASON_LENGTH
        assert sample["usage"].prompt_tokens == len(ids) and sample["usage"].completion_tokens == 0
        assert sample["route"].prefill_worker == "" and sample["route"].decode_worker == decode.address
    after = prefill.load().counters
    assert after.get("prompt_tokens_computed", 0) == before.get("prompt_tokens_computed", 0)
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate([10**7], max_new_tokens=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for worker in (prefill, decode):
        worker.wait_released()


def test_clients_reusing_a_request_id_are_both_served(
    pd: tuple[Cluster, Service, Service], tiny_llama: Path
) -> None:
    cluster, _, _ = pd
    prompts = [list(range(10, 30)), list(range(40, 60))]
    requests = []
    for ids in prompts:
        request = cluster.request(ids, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        request.request_id = 4242  # the same id, in flight at the same time
        requests.append(request)
    streams = [cluster.stub.Generate(r, timeout=60) for r in requests]
    results = [collect(list(stream))[0] for stream in streams]
    for ids, result in zip(prompts, results):
        assert result["ids"] == hf_greedy(tiny_llama, ids, 12)


def test_unknown_model_is_not_found(pd: tuple[Cluster, Service, Service]) -> None:
    cluster, _, _ = pd
    request = cluster.request([5, 6])
    request.model = "gpt-nothing"
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.Generate(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_mla_model_through_the_pd_suite(
    tiny_model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """DeepSeek-V3 (MLA + MoE) across worker processes: the prompt's latent KV pages move from
    the prefill to the decode worker (NIXL where installed) and decoding continues == HF."""
    model = tiny_model_factory("deepseek_v3")
    cfg = json.loads((model / "config.json").read_text())
    # One latent per token and layer: kv_lora_rank + rope values (float32).
    latent_bytes = cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    transport = "nixl" if nixl_available() else "grpc"
    with Cluster(model, tmp_path_factory.mktemp("pd-mla")) as cluster:
        cluster.start_router()
        prefill, decode = cluster.start_workers(
            [("prefill", "--kv-transport", transport), ("decode", "--kv-transport", transport)]
        )
        batch = prompts(3, seed=5)
        for ids in batch:
            (sample,) = collect(
                cluster.generate(ids, max_new_tokens=6, temperature=0.0, ignore_eos=True)
            ).values()
            assert sample["ids"] == hf_greedy(model, ids, 6)
            assert sample["route"].prefill_worker == prefill.address
        counters = decode.load().counters
        assert counters.get("prompt_tokens_computed", 0) == 0
        pages = sum(-(-len(ids) // PAGE_SIZE) for ids in batch)
        assert counters["kv_bytes_received"] == pages * PAGE_SIZE * latent_bytes


def test_fp8_worker_flags_reach_the_engines(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`--quantization fp8 --kv-cache-dtype fp8_e4m3` on a PD pair: both engines run FP8 weights
    and an FP8 pool (the KV pages that move are a quarter of the float32 ones: E4M3 is one byte),
    and the tokens equal the offline engine's with the same options (CPU: exact emulation)."""
    from tests.engine.test_parity import build_core, run_staggered

    fp8 = ("--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3")
    batch = prompts(3, seed=6)
    core = build_core(tiny_llama, device="cpu", quantization="fp8", kv_cache_dtype="fp8_e4m3")
    expected = run_staggered(core, batch, max_new_tokens=6)
    with Cluster(tiny_llama, tmp_path_factory.mktemp("pd-fp8")) as cluster:
        cluster.start_router()
        _, decode = cluster.start_workers([("prefill", *fp8), ("decode", *fp8)])
        for i, ids in enumerate(batch):
            (sample,) = collect(
                cluster.generate(ids, max_new_tokens=6, temperature=0.0, ignore_eos=True)
            ).values()
            assert sample["ids"] == expected[f"r{i}"], f"prompt {i}"
        pages = sum(-(-len(ids) // PAGE_SIZE) for ids in batch)
        received = decode.load().counters["kv_bytes_received"]
        assert received == pages * PAGE_SIZE * kv_bytes_per_token(tiny_llama) // 4  # float32 -> E4M3


def _listening(pid: int) -> list[str]:
    """Local addresses (hex, as /proc shows them) of the TCP sockets `pid` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, our socket
                found.append(fields[1].split(":")[0])
    return found


def test_workers_on_loopback_keep_every_listener_there(pd: tuple[Cluster, Service, Service]) -> None:
    # Including UCX's (NIXL): it listens on every interface unless told which.
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    for worker in pd[1:]:
        addresses = [a for pid in (worker.process.pid, worker.engine_pid()) for a in _listening(pid)]
        assert addresses and set(addresses) <= loopback, (worker.name, addresses)
