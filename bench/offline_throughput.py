"""Offline generation throughput: Tandem's Engine vs HF transformers `generate`, same weights.

Builds a random-weight model of the given shape (nothing downloads), generates for the same
batch of prompts with both (greedy, fixed output length), and prints tokens/s and the ratio.
Each side runs in a fresh process with the same thread settings, so neither inherits the
other's thread pools or allocator state.

    python bench/offline_throughput.py                       # CPU-sized defaults
    python bench/offline_throughput.py --batch 32 --new-tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from shared import Engine
from shared.tiny_model import make_tiny_model


def build_model(args: argparse.Namespace, out: Path) -> Path:
    return make_tiny_model(
        out,
        args.arch,
        seed=0,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=4096,
    )


def prompts_for(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    """Equal-length prompts, or with --ragged lengths spread over [prompt_len / 8, prompt_len]."""
    rng = random.Random(0)
    lengths = [
        rng.randint(max(1, args.prompt_len // 8), args.prompt_len) if args.ragged else args.prompt_len
        for _ in range(args.batch)
    ]
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def bench_tandem(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> float:
    params = {"max_new_tokens": args.new_tokens, "temperature": 0.0, "ignore_eos": True}
    with Engine(
        model_path=str(path), dtype=args.dtype, device=args.device, page_size=16, disable_radix_cache=True
    ) as engine:
        engine.generate(input_ids=prompts[:2], sampling_params=dict(params, max_new_tokens=4))  # warm up
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=params)
            times.append(time.perf_counter() - start)
            assert isinstance(outs, list)
            assert all(len(o["output_ids"]) == args.new_tokens for o in outs)
    return statistics.median(times)


@torch.inference_mode()
def bench_hf(path: Path, prompts: list[list[int]], args: argparse.Namespace) -> float:
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    # Left padding, as HF batch generation needs for prompts of different lengths.
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs: dict[str, Any] = dict(
        do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0
    )
    model.generate(ids[:2], attention_mask=mask[:2], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        times.append(time.perf_counter() - start)
        assert out.shape[1] == width + args.new_tokens
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ragged", action="store_true", help="prompts of different lengths")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side; the median counts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--only", choices=["tandem", "hf"], help=argparse.SUPPRESS)  # one side, internal
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:  # child process: time one side, print seconds
        vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
        bench = bench_tandem if args.only == "tandem" else bench_hf
        print(json.dumps({"seconds": bench(args.model, prompts_for(args, vocab), args)}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args, Path(tmp) / "model")
        tandem_s, hf_s = (_run_side(side, path) for side in ("tandem", "hf"))

    tokens = args.batch * args.new_tokens
    result = {
        "shape": {
            k: getattr(args, k) for k in ("arch", "hidden", "layers", "heads", "kv_heads", "intermediate")
        },
        "workload": {
            "batch": args.batch,
            "prompt_len": args.prompt_len,
            "ragged": args.ragged,
            "new_tokens": args.new_tokens,
            "dtype": args.dtype,
            "repeat": args.repeat,
        },
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "tandem_tok_s": tokens / tandem_s,
        "hf_tok_s": tokens / hf_s,
        "ratio_vs_hf": hf_s / tandem_s,
    }
    print(f"{'':10}{'seconds':>10}{'tok/s':>10}")
    print(f"{'tandem':10}{tandem_s:10.2f}{result['tandem_tok_s']:10.0f}")
    print(f"{'hf':10}{hf_s:10.2f}{result['hf_tok_s']:10.0f}")
    print(f"tandem / hf throughput: {result['ratio_vs_hf']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


def _run_side(side: str, model: Path) -> float:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--only", side, "--model", str(model)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


if __name__ == "__main__":
    main()
