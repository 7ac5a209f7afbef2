r"""Online serving benchmark: streamed /v1/completions against any OpenAI-compatible server.

Tandem's counterpart of `sglang.bench_serving` and `vllm bench serve`. Every prompt is new random
token ids (seeded; `--shared-prefix-len N` makes the first N the same in all prompts), every
answer streams exactly `--output-len` tokens (`ignore_eos`). A load level is a closed loop of C
clients (`--concurrency 1,16,64,128`, `--num-prompts-factor` x C requests) or Poisson arrivals
(`--request-rate 4,8 --num-prompts 200`); two warm-up requests go first and are not counted.
`--client-processes N` spreads a closed loop's clients over N processes: one Python process
streaming thousands of chunks a second nears a core itself, and its queueing then reads as the
server's TTFT and ITL (the client's CPU is printed per level: look before comparing).
Per level: completed/failed requests (a failure is a status other than 200, an error event in the
stream, a transport error, or fewer tokens than asked; the first errors are kept verbatim and the
statuses counted), output, input and request throughput over the level's duration (its first request
sent to its last one answered, `send_window`), and p50/p99 of
TTFT (to the first chunk with text), ITL (between chunks with text), TPOT and end-to-end latency;
and for each Tandem service whose /metrics it can read (those it launched, or `--metrics
NAME=URL,...`): where a worker's engine steps went during the level (steps a second, the decode
batch, prompt tokens a step, the share of mixed steps, the host's milliseconds a step and, with the
engine flag `--step-gpu-timing`, how busy the GPU was), and every process's CPU per 1,000 output
tokens and share of a core (gateway, router, each worker's gRPC front and its engine process: a
process near one core is a bottleneck); and, for a dense model it launched, the level's matmul
FLOP/s and weight bandwidth against the device's own, measured before the suite starts, and the
share it reached of the workload's roofline, the output tokens a second that device allows for
these requests (bench/serving_limits.py: the hardware limit in the same run). One table row per
level (and a line per worker, one of limits and one of CPU); `--json` keeps everything
(`--save-requests`: every request too), `--png` plots it, `--compare A.json B.json` reads runs
back into one table with ratios to the first, and one figure.

On an H200: unified (one worker) against prefill/decode (one of each, both on the one GPU) on a
random-weight Llama-3-8B-shape checkpoint (built once by the first command, reused by the second;
its tokenizer gets a token for every id, so that random outputs stream text as a real model's do):

    python bench/serving.py --launch --topology unified --make-model llama3-8b \
        --model-dir /tmp/tandem-llama3-8b --worker-args "--device cuda:0 --max-total-tokens 150000" \
        --json out/serving_unified.json
    python bench/serving.py --launch --topology pd --make-model llama3-8b \
        --model-dir /tmp/tandem-llama3-8b --worker-args "--device cuda:0 --max-total-tokens 150000" \
        --json out/serving_pd.json
    python bench/serving.py --compare out/serving_unified.json out/serving_pd.json \
        --png out/serving_pd_vs_unified.png

Against a server that is already up (any OpenAI-compatible one):

    python bench/serving.py --base-url http://127.0.0.1:8000/v1 --concurrency 1,8 --input-len 256

Needs only the standard library, httpx and numpy (matplotlib for `--png`); `--launch` runs
`python -m services.cli up` from this checkout and `--make-model` imports bench/gpu_bench.py.
`--trace` (with `--launch`) receives the suite's OpenTelemetry spans itself and prints where
each level's requests spent their time between the services (bench/trace_timeline.py; it needs
the `opentelemetry-proto` package the services' exporter brings). `--py-spy` (with `--launch`)
samples every worker's engine process during each level and prints where its loop's wall clock
went: waiting for the GPU, launching forwards, posting KV writes, waiting for messages
(bench/pyspy_summary.py; it needs py-spy on PATH and the right to ptrace).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import device_model, pyspy_summary, serving_limits, trace_timeline  # noqa: E402 (after the path)
from bench.pyspy_summary import Recorder  # noqa: E402
from bench.trace_timeline import SpanReceiver  # noqa: E402

Mode = Literal["concurrency", "rate"]
MAX_ERRORS = 5  # error messages kept per level
STEPS = "tandem_worker_engine_steps_total"  # a worker's step counters (shared/step_stats.py)
ENGINE_CPU = "tandem_worker_engine_cpu_seconds_total"  # its engine process's CPU time
PRESETS = ["llama3-8b", "deepseek-v2-lite", "tiny", "tiny-deepseek"]  # bench/gpu_bench.py's
SPAN_WAIT_S = 3 * trace_timeline.SCHEDULE_DELAY_MS / 1000  # after a level, for its last spans


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    shared_prefix_len: int
    vocab_low: int  # prompt ids are drawn from [vocab_low, vocab_high)
    vocab_high: int
    temperature: float
    seed: int


@dataclass
class RequestResult:
    """One streamed request. `chunk_gaps_s` are the gaps between successive chunks carrying text:
    a chunk may carry several tokens (a server sends what it has when the client lags, and
    Tandem's gateway sends nothing for a token that adds no text yet, like part of a UTF-8
    character), so these are per chunk, not per token. TPOT spreads the time after the first chunk
    over the tokens after the first; `tokens_per_chunk` in the summary shows how far they differ."""

    prompt_len: int
    output_len: int  # tokens asked for
    completion_tokens: int = 0  # from the usage chunk (chunks with text where a server sends none)
    ttft_s: float | None = None  # to the first chunk with text
    e2e_s: float = 0.0
    chunk_gaps_s: list[float] = field(default_factory=list)
    text_chunks: int = 0
    status: int | None = None
    # time.monotonic() when it was sent: Linux's CLOCK_MONOTONIC, one clock for every process of
    # the machine, so the client processes' requests share the level's window (`send_window`).
    sent_at: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


@dataclass
class LevelSummary:
    """One load level: counts, throughput over the level's duration (completed requests only),
    and latency statistics in ms ({"p50", "p99", "mean"}; None where no request gave a value)."""

    mode: Mode
    load: float  # concurrent clients, or requests/s
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    output_tok_s: float
    input_tok_s: float
    request_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    tokens_per_chunk: float | None
    status_codes: dict[str, int]
    errors: list[str]
    # Per Tandem worker profiled: `engine_profile` of its step counters over the level.
    engine: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per Tandem process profiled: `cpu_profile`, its CPU time per output token over the level.
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    # With --trace, per mode: bench/trace_timeline.py's summary of the level's requests.
    timeline: dict[str, dict[str, Any]] = field(default_factory=dict)
    # With --py-spy, per worker: bench/pyspy_summary.py's summary of its engine loop.
    profile: dict[str, dict[str, Any]] = field(default_factory=dict)
    # With --launch (dense models): bench/serving_limits.py's level, against the measured limits.
    limits: dict[str, float] | None = None
    # Per hop ("client", then each Tandem service with latency histograms): `hop_profile`.
    hops: dict[str, dict[str, float]] = field(default_factory=dict)


def stats_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 (linear interpolation) and mean of seconds, in ms."""
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ms = np.asarray(values, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
    }


def send_window(results: Sequence[RequestResult]) -> float | None:
    """Seconds from the level's first request sent to its last one answered (None without send
    times): the level's duration, as `vllm bench serve` times it. The wall time around the level
    would also count starting the client processes' loops and connections (~0.2 s: 8% of one
    client's four requests on the H200)."""
    sent = [(r.sent_at, r.e2e_s) for r in results if r.sent_at is not None]
    if not sent or len(sent) < len(results):
        return None
    return max(t + e2e for t, e2e in sent) - min(t for t, _ in sent)


def summarize(results: list[RequestResult], mode: Mode, load: float, duration_s: float) -> LevelSummary:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    in_tokens = sum(r.prompt_len for r in done)
    out_tokens = sum(r.completion_tokens for r in done)
    chunks = sum(r.text_chunks for r in done)
    statuses = Counter(str(r.status) if r.status is not None else "no response" for r in failed)
    return LevelSummary(
        mode=mode,
        load=load,
        num_prompts=len(results),
        completed=len(done),
        failed=len(failed),
        duration_s=duration_s,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        output_tok_s=out_tokens / duration_s if duration_s > 0 else 0.0,
        input_tok_s=in_tokens / duration_s if duration_s > 0 else 0.0,
        request_s=len(done) / duration_s if duration_s > 0 else 0.0,
        ttft_ms=stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=stats_ms([gap for r in done for gap in r.chunk_gaps_s]),
        tpot_ms=stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        e2e_ms=stats_ms([r.e2e_s for r in done]),
        tokens_per_chunk=out_tokens / chunks if chunks else None,
        status_codes=dict(statuses),
        errors=[r.error for r in failed[:MAX_ERRORS]],
    )


# ---- requests -------------------------------------------------------------------------------


class Prompts:
    """Seeded random prompts; each call to `take` continues the stream, so no prompt repeats and
    only the shared prefix can hit the server's prefix cache."""

    def __init__(self, workload: Workload) -> None:
        self.w = workload
        self.rng = np.random.default_rng(workload.seed)
        self.prefix = self._ids(workload.shared_prefix_len)

    def _ids(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(self.w.vocab_low, self.w.vocab_high, n)]

    def take(self, n: int) -> list[list[int]]:
        return [self.prefix + self._ids(self.w.input_len - len(self.prefix)) for _ in range(n)]


async def send(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], w: Workload
) -> RequestResult:
    """One streamed completion; every failure is recorded in the result, never raised."""
    result = RequestResult(prompt_len=len(prompt), output_len=w.output_len)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": w.output_len,
        "temperature": w.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result.sent_at = time.monotonic()
    start = time.perf_counter()
    try:
        await _stream(client, url, body, result, start)
    except (httpx.HTTPError, OSError, ValueError) as e:  # transport errors, bad JSON
        result.error = f"{type(e).__name__}: {e}"
    result.e2e_s = time.perf_counter() - start
    if not result.error and result.completion_tokens < w.output_len:
        result.error = f"{result.completion_tokens} of {w.output_len} tokens"
    return result


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult, start: float
) -> None:
    last = start
    usage_tokens: int | None = None
    async with client.stream("POST", url, json=body) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            result.error = f"HTTP {resp.status_code}: {text[:1000]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result.error = f"error event: {json.dumps(event['error'])[:1000]}"
                return
            if any(c.get("text") for c in event.get("choices") or ()):
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.chunk_gaps_s.append(now - last)
                last = now
                result.text_chunks += 1
            if event.get("usage"):
                usage_tokens = int(event["usage"].get("completion_tokens", 0))
    result.completion_tokens = result.text_chunks if usage_tokens is None else usage_tokens


# ---- load levels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str  # .../v1/completions
    model: str


async def closed_loop(
    client: httpx.AsyncClient, t: Target, w: Workload, prompts: list[list[int]], clients: int
) -> list[RequestResult]:
    """`clients` loops, each sending its next prompt when its last answer has ended."""
    pending = iter(prompts)
    results: list[RequestResult] = []

    async def loop() -> None:
        for prompt in pending:  # shared: each prompt goes to exactly one loop
            results.append(await send(client, t.url, t.model, prompt, w))

    await asyncio.gather(*(loop() for _ in range(clients)))
    return results


class ClientProcesses:
    """Closed-loop clients spread over `count` processes, each its own event loop and HTTP
    client: one Python process streaming thousands of chunks a second is itself near a core, and
    then its own queueing shows up as the server's TTFT and ITL (docs/benchmarks.md, r22)."""

    def __init__(self, count: int, request_timeout: float) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.count = count
        self.request_timeout = request_timeout
        # spawn: this process runs an event loop and threads, which a fork would copy half-made.
        self.pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))
        for future in [self.pool.submit(_client_process_ready) for _ in range(count)]:
            future.result()  # up, this module imported, before the first level's clock starts

    async def closed_loop(
        self, t: Target, w: Workload, prompts: list[list[int]], clients: int
    ) -> tuple[list[RequestResult], float]:
        """`clients` loops over `prompts`, dealt out to as many processes as there are
        clients, at most `count` (prompt i to process i mod that, clients as evenly); the results
        and the processes' CPU seconds."""
        loop = asyncio.get_running_loop()
        used = min(self.count, clients)  # a process with no client would leave its prompts unsent
        shares = [(prompts[i::used], clients // used + (i < clients % used)) for i in range(used)]
        runs = [
            loop.run_in_executor(self.pool, _client_process, t, w, share, n, self.request_timeout)
            for share, n in shares
            if n and share
        ]
        results: list[RequestResult] = []
        cpu = 0.0
        for answers, used in await asyncio.gather(*runs):
            results += [RequestResult(**a) for a in answers]
            cpu += used
        return results, cpu

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _client_process(
    t: Target, w: Workload, prompts: list[list[int]], clients: int, request_timeout: float
) -> tuple[list[dict[str, Any]], float]:
    """One client process's share of a level: its results (as dicts) and its CPU seconds."""

    async def main() -> list[RequestResult]:
        async with _http_client(request_timeout) as client:
            # A fresh client's first request pays for its connection and setup (one client's
            # TTFT was 140 ms over the gateway's on the H100 host, r25): paid here, untimed.
            with contextlib.suppress(httpx.HTTPError):
                await client.get(t.url.rsplit("/", 1)[0] + "/models")
            return await closed_loop(client, t, w, prompts, clients)

    cpu = time.process_time()
    results = asyncio.run(main())
    return [asdict(r) for r in results], time.process_time() - cpu


def _client_process_ready() -> int:
    return os.getpid()


def _http_client(request_timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


async def poisson(
    client: httpx.AsyncClient, t: Target, w: Workload, prompts: list[list[int]], rate: float
) -> list[RequestResult]:
    """Requests sent at exponential gaps of mean 1/rate, however many are in flight."""
    gaps = np.random.default_rng(w.seed).exponential(1.0 / rate, len(prompts))
    tasks = []
    for prompt, gap in zip(prompts, gaps):
        tasks.append(asyncio.create_task(send(client, t.url, t.model, prompt, w)))
        await asyncio.sleep(float(gap))
    return list(await asyncio.gather(*tasks))


async def sweep(
    args: argparse.Namespace,
    t: Target,
    w: Workload,
    report: dict[str, Any],
    server: subprocess.Popen[bytes] | None = None,
    services: dict[str, str] | None = None,
    spans: SpanReceiver | None = None,
    recorder: Recorder | None = None,
    costs: dict[str, float] | None = None,
) -> None:
    """Warm up, then run every level, printing a row and saving the report after each; stops early
    if the launched `server` exits. `services`: /metrics URLs of Tandem services to profile per
    level (the engines' steps of the workers among them, and every process's CPU). `spans`: the
    launched suite's traces, each level's turned into request timelines. `recorder`: py-spy on
    the workers during each level. `costs`: the model's (bench/serving_limits.py), to set each
    level's engine steps against the hardware limits in `report["hardware"]`."""
    mode: Mode = "rate" if args.request_rate else "concurrency"
    loads = [float(x) for x in (args.request_rate or args.concurrency).split(",")]
    prompts = Prompts(w)
    processes = None
    if args.client_processes > 1:  # closed loops only (run() refuses it with --request-rate)
        processes = ClientProcesses(args.client_processes, args.request_timeout)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(_http_client(args.request_timeout))
        if processes is not None:
            stack.callback(processes.close)
        warm = prompts.take(args.warmup)
        warm_results = await asyncio.gather(*(send(client, t.url, t.model, p, w) for p in warm))
        for r in warm_results:
            if not r.ok:
                print(f"warm-up request failed: {r.error}", flush=True)
        if spans is not None:
            await asyncio.sleep(SPAN_WAIT_S)
            spans.take()  # the warm-up's
        print(table_header(mode), flush=True)
        for load in loads:
            if server is not None and server.poll() is not None:
                print(f"tandem up exited ({server.returncode}); its logs: {report['server']['logs']}")
                break
            n = args.num_prompts or (args.num_prompts_factor * int(load) if mode == "concurrency" else 200)
            batch = prompts.take(n)
            before = await asyncio.to_thread(scrape_metrics, services) if services else {}
            if recorder is not None:
                recorder.start(f"{mode}_{load:g}")
            start, client_cpu, children_cpu = time.perf_counter(), time.process_time(), 0.0
            if processes is not None:
                results, children_cpu = await processes.closed_loop(t, w, batch, int(load))
            elif mode == "concurrency":
                results = await closed_loop(client, t, w, batch, int(load))
            else:
                results = await poisson(client, t, w, batch, load)
            wall = time.perf_counter() - start
            summary = summarize(results, mode, load, send_window(results) or wall)
            # The clients of the load: this process, and the client processes when there are.
            client_cpu = time.process_time() - client_cpu + children_cpu
            if recorder is not None:
                summary.profile = await asyncio.to_thread(recorder.stop)
            if services:
                after = await asyncio.to_thread(scrape_metrics, services)
                read = [name for name in services if name in before and name in after]
                summary.engine = {
                    name: engine_profile(before[name], after[name], summary.duration_s)
                    for name in read
                    if any(key.startswith(STEPS) for key in after[name])
                }
                summary.cpu = cpu_profile(
                    {name: before[name] for name in read},
                    {name: after[name] for name in read},
                    summary.output_tokens,
                    summary.duration_s,
                )
                summary.hops = hop_profile(before, after, results)
                if costs and report.get("hardware"):
                    summary.limits = serving_limits.level(
                        summary.engine,
                        costs,
                        report["hardware"],
                        summary.duration_s,
                        serving_limits.Requests(w.input_len, w.output_len, w.shared_prefix_len),
                        summary.output_tok_s,
                    )
            summary.cpu["client"] = cpu_share(client_cpu, summary.output_tokens, summary.duration_s)
            if spans is not None:
                await asyncio.sleep(SPAN_WAIT_S)  # the last requests' spans are exported
                summary.timeline = trace_timeline.summarize(trace_timeline.timelines(spans.take()))
            print(table_row(asdict(summary)), flush=True)
            for topology, entry in summary.timeline.items():
                print(f"    {trace_timeline.summary_line(topology, entry)}", flush=True)
            for name, prof in summary.engine.items():
                print(f"    {name}: {engine_line(prof)}", flush=True)
            if summary.limits:
                print(f"    {serving_limits.line(summary.limits)}", flush=True)
            for name, loop in summary.profile.items():
                print(f"    {name} engine loop (py-spy): {pyspy_summary.line(loop)}", flush=True)
            if summary.hops:
                print(f"    {hops_line(summary.hops)}", flush=True)
            if summary.cpu:
                print(f"    {cpu_line(summary.cpu)}", flush=True)
            if summary.failed:
                print(f"    failed by status {summary.status_codes}; first: {summary.errors[0]}", flush=True)
            if (summary.tokens_per_chunk or 1.0) > 1.5:
                print(
                    f"    {summary.tokens_per_chunk:.1f} tokens per text chunk: ITL is per chunk", flush=True
                )
            report["levels"].append(asdict(summary))
            if args.save_requests:
                report["requests"][str(load)] = [asdict(r) for r in results]
            save(report, args.json)


# ---- the server -----------------------------------------------------------------------------


def model_vocab(model_path: Path) -> int | None:
    """Ids the model and its tokenizer both know: the gateway refuses prompt ids past the tokenizer."""
    sizes = []
    with contextlib.suppress(OSError, ValueError, KeyError):
        sizes.append(int(json.loads((model_path / "config.json").read_text())["vocab_size"]))
    with contextlib.suppress(OSError, ValueError, KeyError):
        spec = json.loads((model_path / "tokenizer.json").read_text())
        ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]
        sizes.append(max(ids) + 1)
    return min(sizes, default=None)


def widen_tokenizer(model_path: Path, vocab_size: int) -> None:
    """Give every id of the model a token (" w<id>") in the random checkpoint's small tokenizer:
    gpu_bench writes 512 tokens, and ids past those are refused in prompts and stream no text."""
    path = model_path / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for i in range(max(vocab.values()) + 1, vocab_size):
        vocab[f"\u0120w{i}"] = i  # byte-level BPE writes a leading space as U+0120
    path.write_text(json.dumps(spec))


def make_model(preset: str, out: Path) -> None:
    """A random-weight checkpoint of a gpu_bench preset in `out`, unless one is there already.
    Built in a child process, so this one holds no GPU memory while the server runs."""
    if (out / "config.json").exists():
        print(f"model: {out} (already built)", flush=True)
        return
    tmp = out.with_name(out.name + ".partial")
    code = (
        "import argparse, pathlib, torch; from bench.gpu_bench import PRESETS, build_model; "
        f"args = argparse.Namespace(**{{'arch': 'llama', **PRESETS[{preset!r}]}}); "
        f"build_model(args, pathlib.Path({str(tmp)!r}), "
        "torch.device('cuda' if torch.cuda.is_available() else 'cpu'))"
    )
    print(f"building a random-weight {preset} checkpoint in {out} ...", flush=True)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    widen_tokenizer(tmp, int(json.loads((tmp / "config.json").read_text())["vocab_size"]))
    tmp.rename(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launcher_command(args: argparse.Namespace, ready: Path, log_dir: Path) -> list[str]:
    prefill, decode = {"unified": (0, 0), "pd": (1, 1)}[args.topology]
    cmd = [sys.executable, "-m", "services.cli", "up", "--model", str(args.model_path)]
    cmd += ["--port", str(free_port()), "--ready-file", str(ready), "--log-dir", str(log_dir)]
    cmd += ["--startup-timeout", str(args.launch_timeout)]
    cmd += ["--prefill", str(args.prefill if args.prefill is not None else prefill)]
    cmd += ["--decode", str(args.decode if args.decode is not None else decode)]
    if args.kv_transport:
        cmd += ["--kv-transport", args.kv_transport]
    if args.gateways:
        cmd += ["--gateways", str(args.gateways)]
    return [*cmd, "--worker-args", " ".join(args.worker_args), *shlex.split(args.launch_args)]


@contextlib.contextmanager
def launched(args: argparse.Namespace, env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """`tandem up` (with `env` added to ours) until the block ends (SIGTERM, then SIGKILL after a
    grace period); yields its ready-file (endpoints, logs) plus "process"."""
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-serving-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ready, output = log_dir / "ready.json", log_dir / "launcher.log"
    ready.unlink(missing_ok=True)
    cmd = launcher_command(args, ready, log_dir)
    print(f"launching: {shlex.join(cmd)}\nlogs: {log_dir}", flush=True)
    with open(output, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    # SIGTERM (a job scheduler, `timeout`) unwinds like Ctrl-C, so the server is stopped below.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        deadline = time.monotonic() + args.launch_timeout + 30  # the launcher's own timeout first
        while (endpoints := _read_json(ready)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(output.read_text(errors="replace").splitlines()[-40:])
                raise SystemExit(f"tandem up did not start; last lines of {output}:\n{tail}\nlogs: {log_dir}")
            time.sleep(0.5)
        yield endpoints | {"process": proc}
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def scrape_metrics(urls: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each launched service's counters, histogram sums and counts after the run (buckets left
    out): where the time went, e.g. `tandem_worker_kv_transfer_seconds` of the prefill worker."""
    out: dict[str, dict[str, float]] = {}
    for name, url in urls.items():
        try:
            text = httpx.get(url, timeout=10).text
        except httpx.HTTPError as e:
            print(f"could not scrape {name} at {url}: {e}")
            continue
        samples = {}
        for line in text.splitlines():
            if line.startswith(("tandem_", "process_cpu_seconds_total")) and "_bucket{" not in line:
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    samples[key] = float(value)
        out[name] = samples
    return out


def engine_profile(before: dict[str, float], after: dict[str, float], duration_s: float) -> dict[str, Any]:
    """One worker's engine over a level, from two readings of its step counters
    (shared/step_stats.py): rates and per-step figures; None where the level ran no such step."""

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    kinds = {k: moved(f'{STEPS}{{kind="{k}"}}') for k in ("decode", "mixed", "prefill")}
    steps = sum(kinds.values())
    rows, tokens = (
        moved("tandem_worker_engine_decode_rows_total"),
        moved("tandem_worker_engine_prefill_tokens_total"),
    )
    host, wait, gpu = (
        moved("tandem_worker_engine_step_host_seconds_total"),
        moved("tandem_worker_engine_step_wait_seconds_total"),
        moved("tandem_worker_engine_step_gpu_seconds_total"),
    )
    with_decode, with_prompt = kinds["decode"] + kinds["mixed"], kinds["prefill"] + kinds["mixed"]
    return {
        "steps": steps,
        "prompt_tokens": tokens,
        "decode_rows": rows,
        "steps_per_s": steps / duration_s if duration_s > 0 else None,
        "decode_batch": rows / with_decode if with_decode else None,
        "prefill_tokens_per_step": tokens / with_prompt if with_prompt else None,
        "mixed_share": kinds["mixed"] / steps if steps else None,
        "host_ms_per_step": 1e3 * host / steps if steps else None,
        # the host's own work a step: its time inside steps less the waits on the device
        "host_busy_ms_per_step": 1e3 * (host - wait) / steps if steps else None,
        "wall_ms_per_step": 1e3 * duration_s / steps if steps else None,
        "host_share": host / duration_s if duration_s > 0 else None,
        "gpu_busy": gpu / duration_s if gpu > 0 and duration_s > 0 else None,
    }


def cpu_profile(
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    output_tokens: int,
    duration_s: float,
) -> dict[str, dict[str, float]]:
    """Each process's CPU over a level from two scrapes of its service's /metrics: milliseconds
    of CPU per 1,000 output tokens and the share of one core it kept busy. A worker is two
    processes, its gRPC front (`process_cpu_seconds_total`) and its engine
    (`tandem_worker_engine_cpu_seconds_total`, reported as "NAME engine")."""
    out: dict[str, dict[str, float]] = {}
    for name in after:
        for label, key in ((name, "process_cpu_seconds_total"), (f"{name} engine", ENGINE_CPU)):
            if key not in after[name] or key not in before[name]:
                continue
            out[label] = cpu_share(after[name][key] - before[name][key], output_tokens, duration_s)
    return out


def cpu_share(used_s: float, output_tokens: int, duration_s: float) -> dict[str, float]:
    """`used_s` seconds of a process's CPU over a level: per 1,000 output tokens and in cores."""
    return {
        "ms_per_1k_tokens": 1e6 * used_s / output_tokens if output_tokens else float("nan"),
        "cores": used_s / duration_s if duration_s > 0 else float("nan"),
    }


# Per service: its histograms of a request's time to first token and to its last token (the
# gateway's: of /v1/completions, from its HTTP request's start).
HOP_HISTOGRAMS = {
    "gateway": ("tandem_gateway_time_to_first_token_seconds", "tandem_gateway_request_duration_seconds"),
    "router": ("tandem_router_time_to_first_token_seconds", "tandem_router_e2e_request_latency_seconds"),
    "worker": ("tandem_worker_time_to_first_token_seconds", "tandem_worker_e2e_request_latency_seconds"),
}
_COMPLETIONS = 'endpoint="/v1/completions"'


def hop_profile(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], results: list[RequestResult]
) -> dict[str, dict[str, float]]:
    """Mean TTFT and end-to-end time in ms over a level as each hop saw it: the client (this
    process), then every service by its own histograms (two scrapes). The differences are what
    each hop adds to a request's start and end; client less worker is the serving path's round
    trip, which under a closed loop sets TTFT (bench/schedule_sim.py --client-ms)."""
    ok = [r for r in results if r.ok and r.ttft_s is not None]
    out: dict[str, dict[str, float]] = {}
    if ok:
        out["client"] = {
            "ttft_ms": 1e3 * sum(r.ttft_s or 0.0 for r in ok) / len(ok),
            "e2e_ms": 1e3 * sum(r.e2e_s for r in ok) / len(ok),
        }
    hops: dict[str, list[str]] = {}  # hop -> its services: the gateways (one or several) as one
    for name in sorted(after, key=lambda n: (not is_gateway(n), n != "router")):  # path order
        hops.setdefault("gateway" if is_gateway(name) else name, []).append(name)
    for hop, names in hops.items():
        kind = "gateway" if hop == "gateway" else "router" if hop == "router" else "worker"
        means = [
            _mean_moved([before.get(n, {}) for n in names], [after[n] for n in names], prefix)
            for prefix in HOP_HISTOGRAMS[kind]
        ]
        if means[0] is not None and means[1] is not None:
            out[hop] = {"ttft_ms": 1e3 * means[0], "e2e_ms": 1e3 * means[1]}
    return out


def is_gateway(name: str) -> bool:
    """A launched suite's gateway process: "gateway", or "gateway-N" of several (tandem up --gateways)."""
    return name == "gateway" or name.startswith("gateway-")


def _mean_moved(before: list[dict[str, float]], after: list[dict[str, float]], prefix: str) -> float | None:
    """The mean of a histogram's observations between two scrapes of each of its processes (the
    gateway's: /v1/completions)."""

    def read(scrapes: list[dict[str, float]], suffix: str) -> float:
        return sum(
            v
            for samples in scrapes
            for k, v in samples.items()
            if k == prefix + suffix or (k.startswith(prefix + suffix + "{") and _COMPLETIONS in k)
        )

    count = read(after, "_count") - read(before, "_count")
    return (read(after, "_sum") - read(before, "_sum")) / count if count > 0 else None


def hops_line(hops: dict[str, dict[str, float]]) -> str:
    parts = ", ".join(f"{n} {h['ttft_ms']:.0f} / {h['e2e_ms']:.0f}" for n, h in hops.items())
    line = f"mean ms TTFT / E2E by hop: {parts}"
    workers = [h["e2e_ms"] for n, h in hops.items() if n not in ("client", "gateway", "router")]
    if "client" in hops and len(workers) == 1:
        line += f"; outside the worker {hops['client']['e2e_ms'] - workers[0]:.0f} ms a request"
    return line


def cpu_line(cpu: dict[str, dict[str, float]]) -> str:
    parts = (f"{n} {c['ms_per_1k_tokens']:.0f} ms ({c['cores']:.2f} core)" for n, c in cpu.items())
    return "CPU per 1k output tokens: " + ", ".join(parts)


def engine_line(p: dict[str, Any]) -> str:
    def f(key: str, fmt: str, scale: float = 1.0) -> str:
        return "-" if p[key] is None else format(p[key] * scale, fmt)

    return (
        f"{p['steps']:.0f} steps ({f('steps_per_s', '.1f')}/s, {f('wall_ms_per_step', '.1f')} ms each), "
        f"decode batch {f('decode_batch', '.1f')}, prompt tokens/step {f('prefill_tokens_per_step', '.0f')}, "
        f"mixed {f('mixed_share', '.0f', 100)}%, host {f('host_ms_per_step', '.2f')} ms/step "
        f"({f('host_share', '.0f', 100)}% of wall; busy {f('host_busy_ms_per_step', '.2f')}, the rest waiting"
        f" on the GPU), GPU busy {f('gpu_busy', '.0f', 100)}%"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, or None while it is missing or half written."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def served_model(base_url: str) -> str:
    """The first model id of GET /models."""
    try:
        reply = httpx.get(f"{base_url}/models", timeout=30, trust_env=False)
        reply.raise_for_status()
        return str(reply.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"no model id from {base_url}/models ({e}); pass --model") from e


# ---- report ---------------------------------------------------------------------------------


def _f(x: float | None, width: int, prec: int = 1) -> str:
    return ("-" if x is None else f"{x:.{prec}f}").rjust(width)


def table_header(mode: Mode) -> str:
    load = "clients" if mode == "concurrency" else "req/s"
    return (
        f"{load:>7} {'ok':>5} {'fail':>4} {'dur s':>7} {'out tok/s':>10} {'req/s':>7} {'in tok/s':>10}"
        f" | ms: {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7}"
        f" {'E2E p50':>8} {'p99':>8}"
    )


def table_row(lv: dict[str, Any]) -> str:
    ttft, tpot, itl, e2e = lv["ttft_ms"], lv["tpot_ms"], lv["itl_ms"], lv["e2e_ms"]
    return (
        f"{lv['load']:>7g} {lv['completed']:>5} {lv['failed']:>4} {lv['duration_s']:>7.1f}"
        f" {lv['output_tok_s']:>10.1f} {lv['request_s']:>7.2f} {lv['input_tok_s']:>10.1f} |    "
        f" {_f(ttft['p50'], 9)} {_f(ttft['p99'], 8)} {_f(tpot['p50'], 9, 2)} {_f(tpot['p99'], 7, 2)}"
        f" {_f(itl['p50'], 8, 2)} {_f(itl['p99'], 7, 2)} {_f(e2e['p50'], 8)} {_f(e2e['p99'], 8)}"
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x".rjust(10) if a is not None and b else "-".rjust(10)


def print_comparison(runs: list[dict[str, Any]]) -> None:
    """Each run's table, then every later run's ratios to the first at the loads both ran."""
    for run in runs:
        print(f"\n{run['label']}  ({run['command']})")
        print(table_header(run["levels"][0]["mode"] if run["levels"] else "concurrency"))
        for lv in run["levels"]:
            print(table_row(lv))
            if lv.get("limits"):
                print(f"    {serving_limits.line(lv['limits'])}")
    base = runs[0]
    ref = {(lv["mode"], lv["load"]): lv for lv in base["levels"]}
    for run in runs[1:]:
        print(f"\n{run['label']} / {base['label']}")
        print(f"{'load':>7}{'out tok/s':>10}{'req/s':>10}{'TTFT p50':>10}{'TPOT p50':>10}{'ITL p50':>10}"
              f"{'E2E p50':>10}")  # fmt: skip
        for lv in run["levels"]:
            b = ref.get((lv["mode"], lv["load"]))
            if b is None:
                continue
            cells = [_ratio(lv[k], b[k]) for k in ("output_tok_s", "request_s")]
            cells += [_ratio(lv[k]["p50"], b[k]["p50"]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")]
            print(f"{lv['load']:>7g}" + "".join(cells))


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    """Output tok/s and TTFT p50 against the load, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {out}", flush=True)
        return
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        xs = [lv["load"] for lv in run["levels"]]
        tput.plot(xs, [lv["output_tok_s"] for lv in run["levels"]], marker="o", label=run["label"])
        p50 = [lv["ttft_ms"]["p50"] for lv in run["levels"]]
        ttft.plot(xs, [np.nan if v is None else v for v in p50], marker="o", label=run["label"])
    rate = any(lv["mode"] == "rate" for run in runs for lv in run["levels"])
    for ax, name in ((tput, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
        ax.set_xlabel("request rate (req/s)" if rate else "concurrent clients")
        if not rate:
            loads = sorted({lv["load"] for run in runs for lv in run["levels"]})
            ax.set_xscale("log", base=2)
            ax.set_xticks(loads, [f"{x:g}" for x in loads])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    w = runs[0]["workload"]
    fig.suptitle(f"{runs[0]['model']}: {w['input_len']} in / {w['output_len']} out tokens per request")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"plot: {out}", flush=True)


def save(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


# ---- command line ---------------------------------------------------------------------------


def parse_metrics(spec: str) -> dict[str, str]:
    """`--metrics` ("decode-0=http://h:p/metrics,...") -> {name: url}."""
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise SystemExit(f"--metrics: {item!r} is not NAME=URL")
        out[name] = url
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model id (default: the first of GET /models)")
    p.add_argument("--model-path", type=Path, help="checkpoint: served by --launch, its vocab for prompts")
    p.add_argument("--vocab-size", type=int, help="prompt ids < this (default: the checkpoint's, or 32000)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0)
    p.add_argument("--concurrency", default="1,16,64,128", help="closed-loop clients per level")
    p.add_argument("--num-prompts-factor", type=int, default=4, help="requests per level = this x clients")
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="closed loops: spread the clients over this many processes (each its own event loop)",
    )
    p.add_argument("--request-rate", help="Poisson arrivals instead, req/s per level (e.g. 4,8)")
    p.add_argument("--num-prompts", type=int, help="requests per level (rate mode: default 200)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests before the first level, not counted")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--label", help="this run's name in tables and plots (default: the topology)")
    p.add_argument("--json", type=Path, help="write the results here (after every level)")
    p.add_argument(
        "--metrics",
        default="",
        metavar="NAME=URL,...",
        help="Tandem services' /metrics to profile per level (default with --launch: all of them)",
    )
    p.add_argument("--save-requests", action="store_true", help="every request's record in the JSON")
    p.add_argument("--png", type=Path, help="plot out tok/s and TTFT p50 against the load")
    p.add_argument("--compare", type=Path, nargs="+", metavar="JSON", help="report saved runs; no load")
    launch = p.add_argument_group("start the server (tandem up) for the run")
    launch.add_argument("--launch", action="store_true")
    launch.add_argument("--topology", choices=["unified", "pd"], default="pd")
    launch.add_argument("--prefill", type=int, help="prefill workers (default: by topology)")
    launch.add_argument("--decode", type=int, help="decode workers (default: by topology)")
    launch.add_argument("--kv-transport", choices=["auto", "nixl", "grpc"])
    launch.add_argument("--gateways", type=int, help="gateway processes on the port (tandem up --gateways)")
    launch.add_argument(
        "--worker-args",
        action="append",
        default=[],
        help='engine flags, e.g. "--device cuda:0"; given again, appended (bench/serving_ab.sh flags)',
    )
    launch.add_argument("--launch-args", default="", help="more `tandem up` flags, e.g. '--unified 2'")
    launch.add_argument("--launch-timeout", type=float, default=900.0)
    launch.add_argument("--log-dir", help="the services' logs (default: a fresh temp dir)")
    launch.add_argument("--make-model", choices=PRESETS, help="build a gpu_bench preset's checkpoint first")
    launch.add_argument("--model-dir", type=Path, help="where --make-model builds (and finds) it")
    launch.add_argument(
        "--trace",
        action="store_true",
        help="trace the suite into a local receiver: each level's request timeline (bench/trace_timeline.py)",
    )
    launch.add_argument(
        "--device-model",
        metavar="SPEC",
        help="on a CPU: stretch every engine step to a GPU's modelled time, e.g. 'scale=2' for the"
        " H200 model at half speed (bench/device_model.py); what the suite adds beyond"
        " bench/schedule_sim.py's figures is the serving path's share",
    )
    launch.add_argument(
        "--py-spy",
        action="store_true",
        help="sample the workers' engine processes with py-spy (on PATH) during each level: where each"
        " engine loop's time went (bench/pyspy_summary.py; raw stacks in the log dir)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    step_model = None
    if args.device_model is not None:
        if not args.launch:
            raise SystemExit("--device-model needs --launch (the engines it starts run the model)")
        try:
            step_model = device_model.StepModel.parse(args.device_model)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.make_model:
        args.model_path = args.model_dir or Path(tempfile.gettempdir()) / f"tandem-{args.make_model}"
        make_model(args.make_model, args.model_path)
    if args.launch and not (args.model_path and (args.model_path / "config.json").exists()):
        raise SystemExit("--launch needs --model-path (a checkpoint with config.json) or --make-model")
    if args.client_processes < 1:
        raise SystemExit("--client-processes must be at least 1")
    if args.client_processes > 1 and args.request_rate:
        raise SystemExit("--client-processes spreads closed loops (--concurrency), not --request-rate")
    if args.trace and not args.launch:
        raise SystemExit("--trace needs --launch (it points the suite's span exporters at this process)")
    if args.py_spy and not args.launch:
        raise SystemExit("--py-spy needs --launch (it samples the workers it started)")
    vocab = args.vocab_size or (model_vocab(args.model_path) if args.model_path else None) or 32000
    w = Workload(
        input_len=args.input_len,
        output_len=args.output_len,
        shared_prefix_len=min(args.shared_prefix_len, args.input_len),
        vocab_low=min(1000, vocab // 2),  # clear of the special tokens of most vocabularies
        vocab_high=vocab,
        temperature=args.temperature,
        seed=args.seed,
    )
    with contextlib.ExitStack() as stack:
        server: dict[str, Any] | None = None
        base_url = args.base_url.rstrip("/")
        spans: SpanReceiver | None = None
        if args.trace:
            spans = SpanReceiver()
            stack.callback(spans.close)
        hardware, costs = None, None
        if args.launch:
            costs = serving_limits.checkpoint_costs(args.model_path, args.worker_args)
            if costs is not None:  # measured before the suite holds the device
                hardware = serving_limits.measure()
                if hardware is not None:
                    print(serving_limits.header(hardware), flush=True)
            env = trace_timeline.exporter_env(spans.port) if spans else {}
            if step_model is not None:
                env |= device_model.env(step_model)
            server = stack.enter_context(launched(args, env))
            base_url = server["openai"]
        target = Target(f"{base_url}/completions", args.model or served_model(base_url))
        label = args.label or (args.topology if args.launch else "run")
        report: dict[str, Any] = {
            "label": label,
            "command": shlex.join(["bench/serving.py", *argv]),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_url": base_url,
            "model": target.model,
            "model_path": str(args.model_path) if args.model_path else None,
            "server": {k: v for k, v in server.items() if k != "process"} if server else None,
            "workload": asdict(w) | {"mode": "rate" if args.request_rate else "concurrency"},
            "hardware": hardware,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "levels": [],
            "requests": {},
        }
        print(f"{label}: {target.model} at {base_url}, {w.input_len} in / {w.output_len} out", flush=True)
        services = parse_metrics(args.metrics) or dict((server or {}).get("metrics", {}))
        recorder = None
        if args.py_spy and server is not None:
            workers = {
                name: pid for name, pid in server["pids"].items() if name != "router" and not is_gateway(name)
            }
            recorder = Recorder(workers, Path(server["logs"]) / "py-spy")
        process = server["process"] if server else None
        asyncio.run(sweep(args, target, w, report, process, services, spans, recorder, costs))
        if server and server.get("metrics"):
            report["server_metrics"] = scrape_metrics(server["metrics"])
            save(report, args.json)
    if args.png:
        plot([report], args.png)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        runs = [json.loads(path.read_text()) for path in args.compare]
        print_comparison(runs)
        if args.png:
            plot(runs, args.png)
        return 0
    try:
        return run(args, argv)
    except KeyboardInterrupt:  # the server is stopped by now; finished levels are in --json
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
