"""The engine's scheduling under a closed-loop load, timed by a model of a GPU's steps, on the CPU.

A real `EngineCore` (its scheduler, KV pool, radix cache, overlap scheduling) serves a tiny
model on the CPU while `--clients` clients keep one request each in flight, as
`bench/serving.py --concurrency` does: a client sends its next request as soon as its last one
finishes. The clock does not advance by the CPU's time but by a model of what each step would
take on a GPU, from the decode rows and prompt tokens it ran (defaults: one H200, Llama-3-8B,
split mixed steps, docs/benchmarks.md r20):

    decode-only step        --decode-ms + --row-ms x rows
    step with prompt tokens --token-us x prompt tokens, + --overlap-ms when decode rows ride along

It prints the output throughput and TTFT that the scheduling alone implies (no network, no
gateway, no router). Against a real run's figures, the difference is what the serving path
adds: r20's unified run at 128 clients measured TTFT p50 1.21 s where this gives ~0.16 s.

    PYTHONPATH=. python bench/schedule_sim.py --clients 128 --requests 512
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import EngineConfig
from shared.engine_core import EngineCore
from shared.sampling import SamplingParams
from shared.tiny_model import make_tiny_model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def simulate(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    config = EngineConfig.from_options(
        str(model),
        device="cpu",
        max_total_tokens=args.max_total_tokens,
        chunked_prefill_size=args.chunked_prefill_size,
        enable_overlap_schedule=True,
    )
    core = EngineCore(config)
    rng = random.Random(args.seed)
    vocab = core.runner.vocab_size
    params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    clock_ms, done, steps, decode_rows = 0.0, 0, 0, 0.0

    def send() -> None:
        rid = f"r{len(sent)}"
        core.add_request([rid], [rng.randrange(3, vocab) for _ in range(args.input_len)], params)
        sent[rid] = clock_ms

    for _ in range(min(args.clients, args.requests)):
        send()
    before = core.stats()
    while done < args.requests:
        outputs = core.step()
        now = core.stats()
        rows = now["engine_decode_rows"] - before.get("engine_decode_rows", 0)
        tokens = now["engine_prefill_tokens"] - before.get("engine_prefill_tokens", 0)
        before = now
        if tokens:
            clock_ms += tokens * args.token_us / 1e3 + (args.overlap_ms if rows else 0.0)
        elif rows:
            clock_ms += args.decode_ms + args.row_ms * rows
        steps += 1
        decode_rows += rows
        for out in outputs:
            if out.new_ids and out.rid not in first:
                first[out.rid] = clock_ms
            if out.finished:
                done += 1
                if len(sent) < args.requests:
                    send()
    now = core.stats()
    mixed = now.get("engine_mixed_steps", 0)
    ttft = [first[rid] - sent[rid] for rid in first]
    later = [first[rid] - sent[rid] for rid in first if int(rid[1:]) >= args.clients]
    return {
        "clients": args.clients,
        "requests": args.requests,
        "seconds": clock_ms / 1e3,
        "output_tok_s": args.requests * args.output_len / (clock_ms / 1e3),
        "steps": steps,
        "decode_batch": decode_rows / max(now.get("engine_decode_steps", 0) + mixed, 1),
        "mixed_share": mixed / max(now.get("engine_steps", 0), 1),
        "ttft_ms": {"p50": percentile(ttft, 0.5), "p90": percentile(ttft, 0.9)},
        # the first clients' requests arrive at once; the later ones as the earlier finish
        "ttft_after_first_wave_ms": {"p50": percentile(later, 0.5), "p90": percentile(later, 0.9)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--requests", type=int, help="requests in all (default: 4 x clients)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-total-tokens", type=int, default=150000, help="the KV pool, in tokens")
    p.add_argument("--chunked-prefill-size", type=int, default=2048, help="the step budget")
    p.add_argument("--decode-ms", type=float, default=7.0, help="a decode-only step's fixed time")
    p.add_argument("--row-ms", type=float, default=0.02, help="... and its time a decode row")
    p.add_argument("--token-us", type=float, default=24.5, help="a prompt token's time in a step")
    p.add_argument("--overlap-ms", type=float, default=6.0, help="decode rows beside prompt tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tandem-sim-tiny"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.requests = args.requests or 4 * args.clients
    if not (args.model_dir / "config.json").exists():
        make_tiny_model(args.model_dir, "llama", num_hidden_layers=1, max_position_embeddings=8192)
    result = simulate(args, args.model_dir)
    print(
        f"{result['clients']} clients, {result['requests']} requests: {result['output_tok_s']:.0f} out tok/s,"
        f" decode batch {result['decode_batch']:.1f}, mixed {100 * result['mixed_share']:.0f}%,"
        f" TTFT p50 {result['ttft_ms']['p50']:.0f} ms (p90 {result['ttft_ms']['p90']:.0f}),"
        f" after the first wave p50 {result['ttft_after_first_wave_ms']['p50']:.0f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
