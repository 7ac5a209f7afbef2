"""bench/serving.py, the online serving benchmark, against a real `tandem up` on a tiny model:
every token counted, failures recorded (not raised), and its statistics on known numbers."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bench import serving
from bench.serving import RequestResult, Workload
from tests.suite.cluster import tandem_up

pytestmark = pytest.mark.xdist_group("suite_serving_bench")

IN, OUT = 16, 8


@pytest.fixture(scope="module")
def up(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tandem_up(tiny_llama, tmp_path_factory.mktemp("serving-bench")) as info:
        yield info


def bench(tmp_path: Path, *flags: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    flags = ("--input-len", str(IN), "--output-len", str(OUT), "--warmup", "1", *flags)
    assert serving.main([*flags, "--json", str(out)]) == 0
    return dict(json.loads(out.read_text()))


def test_sweep_completes_every_request_with_every_token(
    up: dict[str, Any], tiny_llama: Path, tmp_path: Path
) -> None:
    result = bench(
        tmp_path,
        *("--base-url", up["openai"], "--model-path", str(tiny_llama), "--concurrency", "1,2"),
        *("--num-prompts-factor", "2", "--shared-prefix-len", "8", "--save-requests"),
    )
    assert result["model"] == up["model"]
    assert [lv["load"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        n = 2 * int(lv["load"])
        assert (lv["num_prompts"], lv["completed"], lv["failed"]) == (n, n, 0)
        assert lv["output_tokens"] == OUT * n and lv["input_tokens"] == IN * n
        assert lv["ttft_ms"]["p50"] > 0 and lv["output_tok_s"] > 0
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert lv[key]["p50"] <= lv[key]["p99"]
        assert lv["ttft_ms"]["p99"] <= lv["e2e_ms"]["p99"]
        requests = result["requests"][str(lv["load"])]
        assert all(r["completion_tokens"] == OUT and not r["error"] for r in requests)


def test_clients_spread_over_processes_complete_every_request(up: dict[str, Any], tmp_path: Path) -> None:
    result = bench(
        tmp_path,
        *("--base-url", up["openai"], "--vocab-size", "512", "--concurrency", "3"),
        *("--num-prompts-factor", "2", "--client-processes", "2", "--save-requests"),
    )
    (lv,) = result["levels"]
    assert (lv["num_prompts"], lv["completed"], lv["failed"]) == (6, 6, 0)
    assert lv["output_tokens"] == OUT * 6 and lv["ttft_ms"]["p50"] > 0
    assert all(r["completion_tokens"] == OUT and not r["error"] for r in result["requests"]["3.0"])
    assert lv["cpu"]["client"]["ms_per_1k_tokens"] > 0


def test_client_processes_deal_out_the_prompts_and_report_their_cpu(up: dict[str, Any]) -> None:
    w = Workload(IN, OUT, shared_prefix_len=0, vocab_low=5, vocab_high=512, temperature=0.0, seed=0)
    prompts = serving.Prompts(w).take(5)
    target = serving.Target(f"{up['openai']}/completions", up["model"])
    processes = serving.ClientProcesses(2, request_timeout=60)
    try:
        before = time.monotonic()
        results, cpu = asyncio.run(processes.closed_loop(target, w, prompts, clients=3))
        after = time.monotonic()
        # Fewer clients than processes: every prompt still sent (one process's share was dropped).
        alone, _ = asyncio.run(processes.closed_loop(target, w, prompts[:3], clients=1))
    finally:
        processes.close()
    assert sorted(r.prompt_len for r in results) == [IN] * 5 and all(r.ok for r in results)
    assert all(r.completion_tokens == OUT for r in results)
    assert cpu > 0  # measured in the client processes, not here
    # Sent in the children, on this process's clock: the level's window lies inside its wall time.
    assert all(before <= r.sent_at <= after for r in results if r.sent_at is not None)
    window = serving.send_window(results)
    assert window is not None and 0 < window <= after - before
    assert len(alone) == 3 and all(r.ok and r.completion_tokens == OUT for r in alone)


def test_poisson_arrivals(up: dict[str, Any], tmp_path: Path) -> None:
    result = bench(
        tmp_path,
        "--base-url",
        up["openai"],
        "--request-rate",
        "50",
        "--num-prompts",
        "3",
        "--vocab-size",
        "512",
    )
    (lv,) = result["levels"]
    assert (lv["mode"], lv["load"], lv["completed"], lv["failed"]) == ("rate", 50, 3, 0)


def test_each_level_profiles_the_engines_and_every_process_cpu(up: dict[str, Any], tmp_path: Path) -> None:
    assert set(up["metrics"]) == {"prefill-0", "decode-0", "router", "gateway"}
    spec = ",".join(f"{name}={url}" for name, url in up["metrics"].items())
    # Enough tokens a level (8 and 16 requests x 64) that every process's CPU moves past the
    # 10 ms resolution of process_cpu_seconds_total.
    out = 64
    flags = ("--base-url", up["openai"], "--vocab-size", "512", "--concurrency", "2,4")
    result = bench(tmp_path, *flags, "--output-len", str(out), "--num-prompts-factor", "4", "--metrics", spec)
    for lv in result["levels"]:
        assert lv["completed"] == 4 * lv["load"]
        assert set(lv["engine"]) == {"prefill-0", "decode-0"}  # the services with engines
        # Every process moved tokens or computed them: each spent CPU on the level.
        processes = {"gateway", "router", "prefill-0", "decode-0", "prefill-0 engine", "decode-0 engine"}
        assert set(lv["cpu"]) == processes | {"client"}
        for cpu in lv["cpu"].values():
            assert cpu["ms_per_1k_tokens"] > 0 and 0 < cpu["cores"] < 4
        prefill, decode = lv["engine"]["prefill-0"], lv["engine"]["decode-0"]
        # The prompt tokens on the prefill side (less any the prefix cache held: random prompts
        # from 256 ids may share a first token); out - 1 decode rows a request on the other.
        # (rates times counts: products of floats, compared with a rounding margin)
        computed = round(prefill["prefill_tokens_per_step"] * prefill["steps"], 6)
        assert 0.75 * IN * lv["completed"] <= computed <= IN * lv["completed"]
        assert prefill["decode_batch"] is None and decode["prefill_tokens_per_step"] is None
        assert decode["decode_batch"] * decode["steps"] == pytest.approx((out - 1) * lv["completed"])
        assert 1 <= decode["decode_batch"] <= lv["load"]
        for prof in (prefill, decode):
            assert prof["wall_ms_per_step"] > 0 and 0 < prof["host_share"] < 1.5
            assert prof["gpu_busy"] is None  # no GPU timing on the CPU
        # Each hop sees a request start later and end sooner than the one before it.
        hops = lv["hops"]
        chain = [hops[n] for n in ("client", "gateway", "router", "decode-0")]
        for outer, inner in itertools.pairwise(chain):
            assert outer["e2e_ms"] >= inner["e2e_ms"] > 0
            assert outer["ttft_ms"] >= inner["ttft_ms"] > 0


def test_engine_profile_of_known_counters() -> None:
    before = {'tandem_worker_engine_steps_total{kind="decode"}': 10.0}
    after = {
        'tandem_worker_engine_steps_total{kind="decode"}': 40.0,
        'tandem_worker_engine_steps_total{kind="mixed"}': 10.0,
        'tandem_worker_engine_steps_total{kind="prefill"}': 10.0,
        "tandem_worker_engine_decode_rows_total": 1200.0,
        "tandem_worker_engine_prefill_tokens_total": 8000.0,
        "tandem_worker_engine_step_host_seconds_total": 0.25,
        "tandem_worker_engine_step_wait_seconds_total": 0.1,
        "tandem_worker_engine_step_gpu_seconds_total": 1.5,
    }
    p = serving.engine_profile(before, after, duration_s=2.0)
    assert (p["steps"], p["steps_per_s"], p["wall_ms_per_step"]) == (50, 25, 40)
    assert p["decode_batch"] == 1200 / 40 and p["prefill_tokens_per_step"] == 8000 / 20
    assert (p["prompt_tokens"], p["decode_rows"]) == (8000, 1200)
    assert p["mixed_share"] == 0.2 and p["host_ms_per_step"] == 5 and p["host_share"] == 0.125
    assert p["host_busy_ms_per_step"] == 1e3 * (0.25 - 0.1) / 50
    assert "busy 3.00, the rest waiting on the GPU" in serving.engine_line(p)
    assert p["gpu_busy"] == 0.75
    assert "decode batch 30.0" in serving.engine_line(p) and "GPU busy 75%" in serving.engine_line(p)


def test_cpu_profile_of_known_counters() -> None:
    before = {
        "router": {"process_cpu_seconds_total": 10.0},
        "decode-0": {"process_cpu_seconds_total": 1.0, serving.ENGINE_CPU: 5.0},
    }
    after = {
        "router": {"process_cpu_seconds_total": 10.5},
        "decode-0": {"process_cpu_seconds_total": 1.2, serving.ENGINE_CPU: 7.0},
    }
    cpu = serving.cpu_profile(before, after, output_tokens=2000, duration_s=2.0)
    assert cpu["router"] == {"ms_per_1k_tokens": 250.0, "cores": 0.25}
    assert cpu["decode-0"] == pytest.approx({"ms_per_1k_tokens": 100.0, "cores": 0.1})
    assert cpu["decode-0 engine"] == {"ms_per_1k_tokens": 1000.0, "cores": 1.0}
    assert "decode-0 engine 1000 ms (1.00 core)" in serving.cpu_line(cpu)


def test_hop_profile_of_known_counters() -> None:
    """Means between two scrapes, by hop; the gateway's of /v1/completions only."""
    gw = "tandem_gateway_time_to_first_token_seconds"
    before = {
        "gateway": {
            f'{gw}_sum{{endpoint="/v1/completions"}}': 1.0,
            f'{gw}_count{{endpoint="/v1/completions"}}': 2,
        },
        "worker-0": {"tandem_worker_time_to_first_token_seconds_sum": 0.0},
    }
    after = {
        "gateway": {
            f'{gw}_sum{{endpoint="/v1/completions"}}': 2.0,
            f'{gw}_count{{endpoint="/v1/completions"}}': 4,
            f'{gw}_sum{{endpoint="/v1/chat/completions"}}': 9.0,
            f'{gw}_count{{endpoint="/v1/chat/completions"}}': 1,
            'tandem_gateway_request_duration_seconds_sum{endpoint="/v1/completions"}': 8.0,
            'tandem_gateway_request_duration_seconds_count{endpoint="/v1/completions"}': 2,
        },
        "worker-0": {
            "tandem_worker_time_to_first_token_seconds_sum": 0.8,
            "tandem_worker_time_to_first_token_seconds_count": 2,
            "tandem_worker_e2e_request_latency_seconds_sum": 6.0,
            "tandem_worker_e2e_request_latency_seconds_count": 2,
        },
    }
    results = [RequestResult(prompt_len=4, output_len=2, completion_tokens=2, ttft_s=0.6, e2e_s=4.5)] * 2
    hops = serving.hop_profile(before, after, results)
    expected = {
        "client": {"ttft_ms": 600.0, "e2e_ms": 4500.0},
        "gateway": {"ttft_ms": 500.0, "e2e_ms": 4000.0},
        "worker-0": {"ttft_ms": 400.0, "e2e_ms": 3000.0},
    }
    assert set(hops) == set(expected)
    for name, hop in expected.items():
        assert hops[name] == pytest.approx(hop)
    assert "outside the worker 1500 ms a request" in serving.hops_line(hops)


def test_several_gateways_are_one_hop() -> None:
    """`tandem up --gateways 2`: the gateway hop's means are over both processes' requests."""
    ttft, e2e = "tandem_gateway_time_to_first_token_seconds", "tandem_gateway_request_duration_seconds"
    label = '{endpoint="/v1/completions"}'

    def scrape(ttft_sum: float, e2e_sum: float, count: int) -> dict[str, float]:
        return {
            f"{ttft}_sum{label}": ttft_sum,
            f"{ttft}_count{label}": count,
            f"{e2e}_sum{label}": e2e_sum,
            f"{e2e}_count{label}": count,
        }

    before = {"gateway-0": scrape(0, 0, 0), "gateway-1": scrape(0, 0, 0)}
    after = {"gateway-0": scrape(0.3, 3.0, 3), "gateway-1": scrape(0.5, 1.0, 1)}
    hops = serving.hop_profile(before, after, [])
    assert list(hops) == ["gateway"]
    assert hops["gateway"] == pytest.approx({"ttft_ms": 200.0, "e2e_ms": 1000.0})


def test_a_wrong_model_id_is_reported_as_failed_requests(up: dict[str, Any], tmp_path: Path) -> None:
    result = bench(
        tmp_path,
        "--base-url",
        up["openai"],
        "--model",
        "no-such-model",
        "--concurrency",
        "2",
        "--num-prompts",
        "3",
    )
    (lv,) = result["levels"]
    assert (lv["completed"], lv["failed"], lv["output_tokens"]) == (0, 3, 0)
    assert lv["status_codes"] == {"404": 3}
    assert "HTTP 404" in lv["errors"][0] and "no-such-model" in lv["errors"][0]
    assert lv["ttft_ms"] == {"p50": None, "p99": None, "mean": None}


def test_a_dead_server_is_reported_as_failed_requests(tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    result = bench(tmp_path, "--base-url", dead, "--model", "m", "--concurrency", "1", "--num-prompts", "2")
    (lv,) = result["levels"]
    assert (lv["failed"], lv["status_codes"]) == (2, {"no response": 2})
    assert "ConnectError" in lv["errors"][0]


def test_a_launch_that_fails_shows_the_launcher_output(tmp_path: Path) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="tandem up did not start"):
        serving.main(["--launch", "--model-path", str(broken), "--log-dir", str(tmp_path / "logs")])


def test_a_launch_on_a_device_model_keeps_its_pace(tiny_llama: Path, tmp_path: Path) -> None:
    """--device-model: the launched suite's engine steps take the model's time (60 ms a decode
    step here), every request still completes, and the report says which model ran."""
    result = bench(
        tmp_path,
        *("--launch", "--topology", "unified", "--model-path", str(tiny_llama)),
        *("--device-model", "decode_ms=60,row_ms=0", "--concurrency", "2", "--num-prompts-factor", "2"),
        *("--log-dir", str(tmp_path / "logs")),
    )
    (level,) = result["levels"]
    assert (level["completed"], level["failed"]) == (4, 0)
    assert level["output_tokens"] == 4 * OUT
    assert 55 <= level["itl_ms"]["p50"] < 200
    assert result["args"]["device_model"] == "decode_ms=60,row_ms=0"
    # A dense model it launched: the level is set against this machine's limits measured in the
    # run, its requests' roofline at the level's decode batch included (bench/serving_limits.py).
    limits = level["limits"]
    assert limits["roofline_decode_batch"] >= 1 and limits["roofline_out_tok_s"] > 0
    assert limits["roofline_share"] == pytest.approx(level["output_tok_s"] / limits["roofline_out_tok_s"])


def test_client_processes_with_poisson_arrivals_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="closed loops"):
        serving.main(
            ["--base-url", "http://127.0.0.1:9/v1", "--request-rate", "4", "--client-processes", "2"]
        )


def test_a_bad_device_model_is_refused_before_launching(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="key=value"):
        serving.main(["--launch", "--model-path", str(tmp_path), "--device-model", "fast"])


def test_a_level_lasts_from_its_first_request_sent_to_its_last_answer() -> None:
    def req(sent_at: float | None, e2e: float) -> RequestResult:
        return RequestResult(10, 4, 4, 0.1, e2e, sent_at=sent_at)

    assert serving.send_window([req(10.0, 0.4), req(10.5, 0.9), req(10.2, 0.3)]) == pytest.approx(1.4)
    # Without every request's send time the caller keeps its own clock.
    assert serving.send_window([req(10.0, 0.4), req(None, 0.9)]) is None
    assert serving.send_window([]) is None


def test_summary_of_known_requests() -> None:
    def req(ttft: float, e2e: float, tokens: int, gaps: list[float], error: str = "") -> RequestResult:
        return RequestResult(10, 4, tokens, ttft, e2e, gaps, len(gaps) + 1, 200, error)

    results = [
        req(0.1, 0.4, 4, [0.1, 0.1, 0.1]),  # TPOT 0.1
        req(0.3, 0.9, 4, [0.2, 0.2, 0.2]),  # TPOT 0.2
        RequestResult(10, 4, status=503, error="HTTP 503: busy"),
    ]
    s = serving.summarize(results, "concurrency", 2, duration_s=2.0)
    assert (s.num_prompts, s.completed, s.failed) == (3, 2, 1)
    assert (s.output_tokens, s.input_tokens) == (8, 20)
    assert (s.output_tok_s, s.input_tok_s, s.request_s) == (4.0, 10.0, 1.0)
    assert s.ttft_ms["p50"] == pytest.approx(200.0) and s.ttft_ms["mean"] == pytest.approx(200.0)
    assert s.ttft_ms["p99"] == pytest.approx(100 + 200 * 0.99)
    assert s.tpot_ms["p50"] == pytest.approx(150.0)
    assert s.itl_ms["p50"] == pytest.approx(150.0) and s.itl_ms["p99"] == pytest.approx(200.0)
    assert s.e2e_ms["p50"] == pytest.approx(650.0)
    assert s.tokens_per_chunk == 1.0
    assert (s.status_codes, s.errors) == ({"503": 1}, ["HTTP 503: busy"])


def test_percentiles_of_known_numbers() -> None:
    stats = serving.stats_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50"] == pytest.approx(50.5) and stats["mean"] == pytest.approx(50.5)
    assert stats["p99"] == pytest.approx(99.01)
    assert serving.stats_ms([]) == {"p50": None, "p99": None, "mean": None}


def test_prompts_share_their_prefix_and_never_repeat() -> None:
    w = Workload(
        input_len=12, output_len=1, shared_prefix_len=5, vocab_low=100, vocab_high=200, temperature=0, seed=3
    )
    prompts = serving.Prompts(w)
    first, second = prompts.take(4), prompts.take(4)
    everything = first + second
    assert all(len(p) == 12 and p[:5] == first[0][:5] for p in everything)
    assert all(100 <= t < 200 for p in everything for t in p)
    assert len({tuple(p[5:]) for p in everything}) == 8
    assert serving.Prompts(w).take(4) == first  # seeded


def test_a_widened_tokenizer_covers_every_id_of_the_model(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copytree(tokenizer_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4096}))
    assert serving.model_vocab(tmp_path) == 512  # the tokenizer's: the gateway refuses ids past it
    serving.widen_tokenizer(tmp_path, 4096)
    assert serving.model_vocab(tmp_path) == 4096
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 4096
    assert tokenizer.decode([4095, 1000]) == " w4095 w1000"
    assert tokenizer.decode([300]) == AutoTokenizer.from_pretrained(str(tokenizer_dir)).decode([300])


def test_compare_prints_ratios_to_the_first_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(label: str, tok_s: float, ttft_ms: float) -> Path:
        result = RequestResult(10, 4, 4, ttft_ms / 1e3, 1.0, [0.1] * 3, 4, 200)
        level = asdict(serving.summarize([result], "concurrency", 1, 1.0))
        level["output_tok_s"] = tok_s
        report = {
            "label": label,
            "command": "c",
            "model": "m",
            "workload": {"input_len": 10, "output_len": 4},
        }
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps(report | {"levels": [level]}))
        return path

    a, b = run("unified", 100.0, 50.0), run("pd", 150.0, 25.0)
    png = tmp_path / "cmp.png"
    assert serving.main(["--compare", str(a), str(b), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    ratios = out.split("pd / unified")[1].splitlines()[2].split()
    assert ratios[:4] == ["1", "1.50x", "1.00x", "0.50x"]  # load, out tok/s, req/s, TTFT p50
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        assert png.stat().st_size > 0


def test_scraped_metrics_keep_sums_and_counts_of_every_service(up: dict[str, Any]) -> None:
    # The real services' /metrics (what a --launch run records under "server_metrics").
    scraped = serving.scrape_metrics(up["metrics"] | {"gone": "http://127.0.0.1:9/metrics"})
    assert set(scraped) == set(up["metrics"])  # an unreachable one is reported, not fatal
    router = scraped["router"]
    assert "tandem_router_time_to_first_token_seconds_count" in router
    assert all(
        k.startswith(("tandem_", "process_cpu_seconds_total")) and "_bucket{" not in k
        for s in scraped.values()
        for k in s
    )
    assert all("process_cpu_seconds_total" in s for s in scraped.values())
    assert all(serving.ENGINE_CPU in scraped[name] for name in ("prefill-0", "decode-0"))


def test_worker_args_given_twice_reach_the_workers_joined(tmp_path: Path) -> None:
    """bench/serving_ab.sh flags adds run b's worker flags as a second --worker-args."""
    model = str(tmp_path)
    twice = ["--worker-args", "--device cpu", "--worker-args=--disable-split-mixed-steps"]
    args = serving.parse_args(["--launch", "--model-path", model, *twice])
    cmd = serving.launcher_command(args, tmp_path / "ready.json", tmp_path / "logs")
    assert cmd[cmd.index("--worker-args") + 1] == "--device cpu --disable-split-mixed-steps"
    args = serving.parse_args(["--launch", "--model-path", model])
    cmd = serving.launcher_command(args, tmp_path / "ready.json", tmp_path / "logs")
    assert cmd[cmd.index("--worker-args") + 1] == "" and "--gateways" not in cmd
    args = serving.parse_args(["--launch", "--model-path", model, "--gateways", "2"])
    cmd = serving.launcher_command(args, tmp_path / "ready.json", tmp_path / "logs")
    assert cmd[cmd.index("--gateways") + 1] == "2"
