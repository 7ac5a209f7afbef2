"""What the gateway and the router add to a request, and how many requests the router sustains.

Part 1, latency (real services, tiny model, CPU): the same one-token greedy request, one at a
time, sent (a) straight to a unified worker, (b) through the router, (c) through gateway +
router (OpenAI /v1/completions with token ids). p50/p99 of each; the differences are the hops'
cost. Part 2, throughput: the router in front of stub workers that answer at once (so only the
router is measured), driven by closed-loop gRPC clients at several concurrencies.

    python bench/router_overhead.py [--requests 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from services.launcher import free_port
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent

PROMPT = list(range(10, 42))


class Procs:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            self.procs.append(
                subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
            )

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(20)


def wait_for(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.2)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": 1000 * statistics.fmean(ordered),
    }


def timed(call: Any, n: int) -> list[float]:
    for _ in range(10):  # warm-up: connections, caches, JIT-free but allocator-warm
        call()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def latency(model: Path, n: int, log_dir: Path) -> dict[str, Any]:
    procs = Procs(log_dir)
    router_port, worker_port, gw_port, admin_port = free_port(), free_port(), free_port(), free_port()
    router, worker = f"127.0.0.1:{router_port}", f"127.0.0.1:{worker_port}"
    admin_address = f"127.0.0.1:{admin_port}"
    try:
        procs.start(
            "router",
            *("-m", "services.router", "--model", str(model)),
            *("--port", str(router_port), "--admin-port", str(admin_port)),
        )
        procs.start(
            "worker",
            "-m",
            "services.worker",
            "--model",
            str(model),
            "--port",
            str(worker_port),
            "--router",
            admin_address,
            "--device",
            "cpu",
            "--max-total-tokens",
            "4096",
        )
        procs.start(
            "gateway",
            "-m",
            "services.gateway",
            "--port",
            str(gw_port),
            "--router",
            router,
            "--tokenizer",
            str(model),
        )
        rch, wch = grpc.insecure_channel(router), grpc.insecure_channel(worker)
        rstub, wstub = router_pb2_grpc.RouterServiceStub(rch), worker_pb2_grpc.WorkerServiceStub(wch)
        ach = grpc.insecure_channel(admin_address)
        admin = router_pb2_grpc.RouterAdminServiceStub(ach)
        wait_for(
            lambda: len(admin.ListWorkers(router_pb2.ListWorkersRequest(), timeout=1).workers) == 1, "worker"
        )
        url = f"http://127.0.0.1:{gw_port}"
        wait_for(lambda: urllib.request.urlopen(f"{url}/health", timeout=1).status == 200, "gateway")
        params = {"max_new_tokens": 1, "temperature": 0.0}
        counter = iter(range(10**9))

        def direct() -> None:
            req = worker_pb2.GenerateRequest(
                rid=f"d{next(counter)}", token_ids=PROMPT, sampling_params=params
            )
            list(wstub.Generate(req, timeout=30))

        def via_router() -> None:
            list(
                rstub.Generate(
                    router_pb2.GenerateRequest(token_ids=PROMPT, sampling_params=params), timeout=30
                )
            )

        body = json.dumps({"model": model.name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()

        def via_gateway() -> None:
            req = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()

        results = {}
        for name, call in [("worker", direct), ("router", via_router), ("gateway", via_gateway)]:
            results[name] = percentiles(timed(call, n))
        results["router_adds"] = {k: results["router"][k] - results["worker"][k] for k in results["worker"]}
        results["gateway_and_router_add"] = {
            k: results["gateway"][k] - results["worker"][k] for k in results["worker"]
        }
        rch.close()
        wch.close()
        ach.close()
        return results
    finally:
        procs.stop()


async def _drive(router: str, concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        request = router_pb2.GenerateRequest(token_ids=PROMPT, sampling_params={"max_new_tokens": 1})
        done = 0
        stop = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async for _ in stub.Generate(request, timeout=30):
                    pass
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


def throughput(model: Path, log_dir: Path, seconds: float) -> dict[str, float]:
    procs = Procs(log_dir)
    router_port, admin_port = free_port(), free_port()
    router = f"127.0.0.1:{router_port}"
    stub_ports = [free_port(), free_port()]
    stub = str(Path(__file__).resolve().parent / "stub_worker.py")
    try:
        for i, port in enumerate(stub_ports):
            procs.start(f"stub-{i}", stub, "--port", str(port), "--model", model.name)
        procs.start(
            "router-tp",
            "-m",
            "services.router",
            "--model",
            str(model),
            "--port",
            str(router_port),
            *("--admin-port", str(admin_port)),
            *[f"--worker=127.0.0.1:{p}" for p in stub_ports],
        )
        with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as ch:
            admin = router_pb2_grpc.RouterAdminServiceStub(ch)
            wait_for(
                lambda: len(admin.ListWorkers(router_pb2.ListWorkersRequest(), timeout=1).workers) == 2,
                "stubs",
            )
        return {f"c{c}": asyncio.run(_drive(router, c, seconds)) for c in (1, 8, 32, 128)}
    finally:
        procs.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--seconds", type=float, default=5.0, help="per concurrency level in part 2")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from shared.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny-llama", "llama", seed=0)
        lat = latency(model, args.requests, Path(tmp))
        tput = throughput(model, Path(tmp), args.seconds)
    print(f"one-token requests, {args.requests} sequential, {platform.processor() or platform.machine()}")
    print(f"{'path':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for name in ("worker", "router", "gateway", "router_adds", "gateway_and_router_add"):
        r = lat[name]
        print(f"{name:<26}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}")
    print("router in front of instant stub workers, closed-loop clients:")
    for level, rate in tput.items():
        print(f"  concurrency {level[1:]:>4}: {rate:8.0f} req/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": lat, "router_req_per_s": tput}, indent=2))


if __name__ == "__main__":
    main()
