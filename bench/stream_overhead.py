"""What streaming costs the gateway and the router, per token, at serving concurrency.

Stub workers (bench/stub_worker.py) stream each request's tokens one message at a time, one every
`--interval-ms` (an engine stepping its batch that often); the router and the gateway stand
between them and `--concurrency` streaming `/v1/completions` clients (token-id prompts, the
official wire format read by httpx). Reported against the rate the stubs offer (concurrency x
1000 / interval tokens per second, the limit with free services), in the same run:

- delivered tokens/s and its ratio to the offered rate;
- inter-token latency at the client, p50/p99, against the stubs' interval (what the hops add);
- time to first token at the client: the stubs answer at once, so it is what the gateway and the
  router add to a request's start under that streaming load (`--prompt-len` token ids each);
- CPU seconds per 1,000 streamed tokens of the gateway and the router processes, and the share
  of one core each used (a service near 1.0 is the bottleneck: each is one event loop).

    PYTHONPATH=. python bench/stream_overhead.py [--concurrency 128] [--tokens 128]
        [--interval-ms 16] [--prompt-len 32] [--json out.json]

The client runs in this process; on a machine with few cores it competes with the services, so
compare the CPU-per-token figures between runs, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.router_overhead import Procs, percentiles, wait_for
from services.launcher import free_port
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc

STUB = str(Path(__file__).resolve().parent / "stub_worker.py")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(
    url: str, model: str, w: Workload, gaps: list[float], ttfts: list[float], counts: list[int], stop: float
) -> None:
    prompt = [10 + i % 400 for i in range(w.prompt_len)]  # inside the tiny model's vocab
    body = {"model": model, "prompt": prompt, "max_tokens": w.tokens, "stream": True}
    async with httpx.AsyncClient(timeout=120) as http:
        while time.monotonic() < stop:
            sent, last = time.monotonic(), None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    else:
                        ttfts.append(now - sent)
                    last = now
                    counts[0] += 1


@dataclass(frozen=True)
class Workload:
    tokens: int  # a request's output tokens
    prompt_len: int  # its prompt's token ids


async def drive(
    url: str, model: str, concurrency: int, w: Workload, seconds: float
) -> tuple[list[float], list[float], int]:
    gaps: list[float] = []
    ttfts: list[float] = []
    counts = [0]
    stop = time.monotonic() + seconds
    await asyncio.gather(*(client(url, model, w, gaps, ttfts, counts, stop) for _ in range(concurrency)))
    return gaps, ttfts, counts[0]


def run(model: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs(log_dir)
    router_port, admin_port, gw_port = free_port(), free_port(), free_port()
    stub_ports = [free_port() for _ in range(args.stubs)]
    try:
        for i, port in enumerate(stub_ports):
            procs.start(
                f"stub-{i}",
                *(STUB, "--port", str(port), "--model", model.name, "--tokens", str(args.tokens)),
                *("--interval-ms", str(args.interval_ms)),
            )
        procs.start(
            "router",
            *("-m", "services.router", "--model", str(model), "--port", str(router_port)),
            *("--admin-port", str(admin_port), *[f"--worker=127.0.0.1:{p}" for p in stub_ports]),
            *("--worker-streams", args.router_streams),
        )
        procs.start(
            "gateway",
            *("-m", "services.gateway", "--port", str(gw_port), "--router", f"127.0.0.1:{router_port}"),
            *("--tokenizer", str(model), "--router-streams", args.router_streams),
        )
        with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as ch:
            admin = router_pb2_grpc.RouterAdminServiceStub(ch)
            wait_for(
                lambda: (
                    len(admin.ListWorkers(router_pb2.ListWorkersRequest(), timeout=1).workers)
                    == len(stub_ports)
                ),
                "stubs",
            )
        url = f"http://127.0.0.1:{gw_port}"
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=1).status == 200, "gateway")
        w = Workload(args.tokens, args.prompt_len)
        asyncio.run(drive(url, model.name, 4, w, 1.0))  # warm-up
        router_proc, gateway_proc = procs.procs[len(stub_ports)], procs.procs[len(stub_ports) + 1]
        before = {n: cpu_seconds(p.pid) for n, p in (("router", router_proc), ("gateway", gateway_proc))}
        start = time.monotonic()
        gaps, ttfts, delivered = asyncio.run(drive(url, model.name, args.concurrency, w, args.seconds))
        wall = time.monotonic() - start
        used = {
            n: cpu_seconds(p.pid) - before[n] for n, p in (("router", router_proc), ("gateway", gateway_proc))
        }
    finally:
        procs.stop()
    offered = args.concurrency * 1000 / args.interval_ms
    return {
        "concurrency": args.concurrency,
        "interval_ms": args.interval_ms,
        "offered_tok_per_s": offered,
        "delivered_tok_per_s": delivered / wall,
        "delivered_vs_offered": delivered / wall / offered,
        "itl": percentiles(gaps),
        "ttft": percentiles(ttfts),
        "cpu_s_per_1k_tokens": {n: 1000 * s / delivered for n, s in used.items()},
        "core_share": {n: s / wall for n, s in used.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128, help="tokens per request")
    p.add_argument("--interval-ms", type=float, default=16.0, help="between a request's tokens")
    p.add_argument("--prompt-len", type=int, default=32, help="token ids in each prompt")
    p.add_argument("--stubs", type=int, default=1)
    p.add_argument(
        "--router-streams",
        choices=("multiplexed", "per-request"),
        default="multiplexed",
        help="the gateway's --router-streams and the router's --worker-streams: one GenerateMany "
        "call per hop, or a Generate call per request",
    )
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from shared.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny-llama", "llama", seed=0)
        result = run(model, Path(tmp), args)
    result["machine"] = f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    itl = result["itl"]
    print(
        f"{args.concurrency} streams x 1 token / {args.interval_ms:g} ms: offered"
        f" {result['offered_tok_per_s']:.0f} tok/s, delivered {result['delivered_tok_per_s']:.0f}"
        f" ({result['delivered_vs_offered']:.2f}); ITL p50 {itl['p50_ms']:.1f} ms p99 {itl['p99_ms']:.1f} ms;"
        f" TTFT p50 {result['ttft']['p50_ms']:.1f} ms p99 {result['ttft']['p99_ms']:.1f} ms"
        f" ({args.prompt_len}-token prompts, answered at once)"
    )
    for name in ("gateway", "router"):
        print(
            f"  {name:<8} {result['cpu_s_per_1k_tokens'][name] * 1000:7.1f} ms CPU per 1k tokens,"
            f" {result['core_share'][name]:.2f} of a core"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
