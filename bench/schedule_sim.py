"""The engine's scheduling under a closed-loop load, timed by a model of a GPU's steps, on the CPU.

A real `EngineCore` (its scheduler, KV pool, radix cache, overlap scheduling) serves a tiny
model on the CPU while `--clients` clients keep one request each in flight, as
`bench/serving.py --concurrency` does: a client sends its next request as soon as its last one
finishes. The clock does not advance by the CPU's time but by a model of what each step would
take on a GPU, from the decode rows and prompt tokens it ran (defaults: one H200, Llama-3-8B,
split mixed steps, docs/benchmarks.md r20):

    decode-only step        --decode-ms + --row-ms x rows
    step with prompt tokens --token-us x prompt tokens, + --overlap-ms when decode rows ride along
    every step              x --scale

(the model: bench/device_model.py). It prints the output throughput and TTFT that the
scheduling implies. `--client-ms D` puts the serving path's round trip in the loop: a finished
request's client's next request reaches the engine D ms after the last token left it (through
the worker, router and gateway to the client, and back in). Small D matters a lot: requests
that finish in a run of fast decode-only steps come back together and queue for the slower
mixed steps. r20's unified run at 128 clients on the H200 (TTFT p50 1.21 s, decode batch 102,
42% mixed steps) comes out at D ~ 200 ms (1.08 s, 100.5, 42%), where D = 0 gives 0.16 s
(docs/benchmarks.md, "Where TTFT goes"). `bench/serving.py --launch --device-model ...` runs
the whole suite under the same model on the CPU, D included.

    PYTHONPATH=. python bench/schedule_sim.py --clients 128 [--client-ms 200] [--requests 512]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.device_model import DeviceClock, StepModel, step_with_model
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
    timing = StepModel(args.decode_ms, args.row_ms, args.token_us, args.overlap_ms, args.scale)
    rng = random.Random(args.seed)
    vocab = core.runner.vocab_size
    params = SamplingParams(max_new_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    clock = DeviceClock(timing)
    now, done, steps = 0.0, 0, 0  # seconds on the modelled clock (the host's own time is none)
    due: list[float] = []  # when each client's next request reaches the engine

    def send() -> None:
        rid = f"r{len(sent)}"
        core.add_request([rid], [rng.randrange(3, vocab) for _ in range(args.input_len)], params)
        sent[rid] = now

    for _ in range(min(args.clients, args.requests)):
        send()
    while done < args.requests:
        due.sort()
        if due and not core.has_work:
            now = max(now, due[0])
        while due and due[0] <= now and len(sent) < args.requests:
            due.pop(0)
            send()
        outputs, now = step_with_model(core, EngineCore.step, clock, now)
        steps += 1
        for out in outputs:
            if out.new_ids and out.rid not in first:
                first[out.rid] = now
            if out.finished:
                done += 1
                due.append(now + args.client_ms / 1e3)
    stats = core.stats()
    mixed = stats.get("engine_mixed_steps", 0)
    ttft = [1e3 * (first[rid] - sent[rid]) for rid in first]
    later = [1e3 * (first[rid] - sent[rid]) for rid in first if int(rid[1:]) >= args.clients]
    return {
        "clients": args.clients,
        "requests": args.requests,
        "seconds": now,
        "output_tok_s": args.requests * args.output_len / now,
        "steps": steps,
        "decode_batch": stats["engine_decode_rows"] / max(stats.get("engine_decode_steps", 0) + mixed, 1),
        "mixed_share": mixed / max(stats.get("engine_steps", 0), 1),
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
    d = StepModel()
    p.add_argument("--decode-ms", type=float, default=d.decode_ms, help="a decode-only step's fixed time")
    p.add_argument("--row-ms", type=float, default=d.row_ms, help="... and its time a decode row")
    p.add_argument("--token-us", type=float, default=d.token_us, help="a prompt token's time in a step")
    p.add_argument("--overlap-ms", type=float, default=d.overlap_ms, help="decode rows beside prompt tokens")
    p.add_argument("--scale", type=float, default=d.scale, help="every step's time x this")
    p.add_argument(
        "--client-ms",
        type=float,
        default=0.0,
        help="from a request's last token to its client's next request in the engine (the serving path's"
        " round trip)",
    )
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
