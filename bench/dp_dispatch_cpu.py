"""DP attention's dispatch on the CPU: prefix-cache reuse and time, cache-aware vs round robin.

A prefix is cached only on the DP rank that ran it, so where rank 0 sends a request decides
whether its shared prefix is computed again. One engine process (EngineClient) with a tiny
random-weight DeepSeek-V3 (MLA + MoE) at `tp_size=2, enable_dp_attention`, real gloo ranks, is
sent `--families` prompt families interleaved (family 0, 1, ..., 4, 0, 1, ...), each request a
`--prefix`-token shared prefix plus a `--suffix`-token suffix of its own, one request at a time
to `--max-new-tokens` greedy tokens. Reported per `--dp-dispatch`, in the same run: the share of
prompt tokens served from the prefix cache against the most a perfect placement could reuse
(every family's prefix computed once), and the wall time of the whole sequence.

    PYTHONPATH=. python bench/dp_dispatch_cpu.py [--families 5] [--requests 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.inputs import Prompt
from shared.outputs import RequestOutput
from shared.tiny_model import make_tiny_model


def workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """Token ids in [10, vocab): families differ from their first token on."""
    span = vocab - 10
    prefixes = [
        [10 + (100 + 37 * f + 7 * i) % span for i in range(args.prefix)] for f in range(args.families)
    ]
    return [
        [*prefixes[r % args.families], *(10 + (53 * r + 3 * i) % span for i in range(args.suffix))]
        for r in range(args.requests)
    ]


def run(model: Path, policy: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    config = EngineConfig.from_options(
        str(model),
        tp_size=2,
        enable_dp_attention=True,
        device="cpu",
        page_size=args.page_size,
        dp_dispatch=policy,
    )
    client = EngineClient(config)
    try:
        done: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        client.add(["warm-up"], Prompt([7, 8, 9], params), done.put)  # both ranks' first steps, off the clock
        while not _finished(done.get(timeout=120)):
            pass
        prompt_tokens = cached_tokens = 0
        start = time.perf_counter()
        for i, ids in enumerate(prompts):
            client.add([str(i)], Prompt(ids, params), done.put)
            while not _finished(out := done.get(timeout=120)):
                pass
            assert isinstance(out, RequestOutput)
            prompt_tokens += out.prompt_tokens
            cached_tokens += out.cached_tokens
        wall = time.perf_counter() - start
    finally:
        client.shutdown()
    return {"policy": policy, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "seconds": wall}


def _finished(item: RequestOutput | BaseException) -> bool:
    if isinstance(item, BaseException):
        raise item
    return item.finished


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=int, default=5)  # odd: round robin splits every family
    p.add_argument("--requests", type=int, default=25)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--suffix", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model", "deepseek_v3", max_position_embeddings=4096)
        prompts = workload(args, json.loads((model / "config.json").read_text())["vocab_size"])
        results = [run(model, policy, prompts, args) for policy in ("round_robin", "cache_aware")]
    # A perfect placement computes each family's prefix once (whole pages only are shared).
    shared = args.prefix // args.page_size * args.page_size
    best = shared * (len(prompts) - args.families)
    total = results[0]["prompt_tokens"]
    base = results[0]["seconds"]
    print(f"{args.requests} requests, {args.families} families of a {args.prefix}-token prefix, DP=2")
    print(f"best possible reuse: {best / total:.2f} of prompt tokens")
    for r in results:
        r["reuse"] = r["cached_tokens"] / r["prompt_tokens"]
        r["reuse_of_best"] = r["cached_tokens"] / best
        print(
            f"  {r['policy']:12s} reuse {r['reuse']:.2f} ({r['reuse_of_best']:.2f} of the best),"
            f" {r['seconds']:.2f} s ({base / r['seconds']:.2f}x round robin's speed)"
        )
    if args.json:
        record = {"args": vars(args), "host": platform.node(), "best_reuse": best / total, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
