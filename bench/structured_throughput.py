"""Constrained decoding's cost: JSON-schema decode throughput vs unconstrained, and compile time.

In one run on one device:

1. compile time of a large JSON schema with the engine's `GrammarCompiler`: parse (`check`),
   cold compile, and a cached compile (the LRU hit every later request with that schema gets);
2. decode throughput at each batch size (default 1 and 32), greedy, unconstrained and under a
   JSON schema whose output cannot end within the timed steps (an array of at least 64
   objects), alternating the two `--repeats` times; tok/s counted as in bench/gpu_bench.py
   (every request running), plus the host time spent filling grammar masks per step.

The ratio constrained / unconstrained is the figure of merit (DESIGN.md §7: >= 0.9 at batch 32).
The `llama3-8b` preset uses the Llama-3-8B shape and a synthetic 128k-token byte-level BPE
vocabulary (xgrammar's mask cost grows with the vocabulary; the tiny test tokenizer has 512).

    python bench/structured_throughput.py --preset tiny --json out/structured_cpu.json    # CPU
    python bench/structured_throughput.py --json out/structured_h100.json                  # H100
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import PRESETS as GPU_PRESETS
from gpu_bench import build_model, model_dir_root, prompts_for, run_header, tandem_decode

from shared.config import EngineConfig
from shared.constrained import GrammarCompiler
from shared.engine_core import EngineCore
from shared.model_runner import resolve_device
from shared.sampling import SamplingParams

PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": GPU_PRESETS["llama3-8b"]
    | dict(batches="1,32", context=256, decode_tokens=64, vocab_tokens=128000),
    "tiny": dict(
        hidden=256, layers=4, heads=8, kv_heads=4, intermediate=512, vocab=512, batches="1,32",
        context=64, decode_tokens=64, prefill_batch=2, dtype="float32", vocab_tokens=0,
    ),
}  # fmt: skip

# Output that cannot end within the timed steps: at least 64 items of a few fields each.
LONG_SCHEMA = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 10**6},
                    "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
                    "ok": {"type": "boolean"},
                    "score": {"type": "number"},
                },
                "required": ["id", "kind", "ok", "score"],
            },
        }
    },
    "required": ["rows"],
}


def large_schema(properties: int = 120) -> dict[str, Any]:
    """A wide, nested schema of the kind tool definitions and extraction forms produce."""
    kinds: list[dict[str, Any]] = [
        {"type": "string"},
        {"type": "integer", "minimum": 0, "maximum": 1000},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue", "cyan", "magenta"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "required": ["a"],
        },
    ]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props)[: properties // 2]}


def synthetic_tokenizer(out: Path, tokens: int, seed: int = 0) -> None:
    """A byte-level BPE tokenizer with `tokens` random multi-byte tokens (words with and without a
    leading space, JSON punctuation, digits): the vocabulary's size and character mix are what
    xgrammar's mask computation depends on. Encoding is not needed (prompts are token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz" * 4 + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789" + '{}[]":,.-_ '
    vocab: dict[str, int] = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < tokens:
        word = ("Ġ" if rng.random() < 0.5 else "") + "".join(
            rng.choice(letters) for _ in range(rng.randint(2, 9))
        ).replace(" ", "Ġ")
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    fast.save_pretrained(str(out))


def bench_compile(path: Path, vocab: int) -> dict[str, float]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    schema = json.dumps(large_schema())
    compiler = GrammarCompiler(tokenizer, vocab, [1])
    t0 = time.perf_counter()
    compiler.check("json_schema", schema)
    t1 = time.perf_counter()
    compiler.compile("json_schema", schema).result()
    t2 = time.perf_counter()
    compiler.compile("json_schema", schema).result()
    t3 = time.perf_counter()
    compiler.close()
    return {
        "schema_chars": len(schema),
        "tokenizer_tokens": len(tokenizer),
        "check_ms": 1e3 * (t1 - t0),
        "cold_compile_ms": 1e3 * (t2 - t1),
        "cached_compile_ms": 1e3 * (t3 - t2),
    }


class MaskTimer:
    """Host seconds in `TokenMasks.build` (the per-step grammar work)."""

    def __init__(self, core: EngineCore) -> None:
        self.seconds = 0.0
        inner = core.masks.build

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        core.masks.build = timed  # type: ignore[method-assign]


def bench_decode(path: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import AutoTokenizer

    batches = [int(b) for b in args.batches.split(",")]
    steps = args.decode_tokens
    max_len = args.context + steps + 600
    config = EngineConfig.from_options(
        str(path),
        device=str(device),
        dtype=args.dtype,
        max_total_tokens=max(batches) * (max_len + 16) + 4096,
        max_context_len=max_len,
        max_running_requests=max(max(batches), 8),
        disable_radix_cache=True,
    )
    core = EngineCore(config, tokenizer=AutoTokenizer.from_pretrained(str(path)))
    masks = MaskTimer(core)
    budget = steps + 256
    plain = SamplingParams(max_new_tokens=budget, temperature=0.0, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=budget, temperature=0.0, json_schema=json.dumps(LONG_SCHEMA))
    tandem_decode(core, prompts_for(2, args.context, args.vocab, 99), 4, params=constrained)  # warm up
    out: dict[str, Any] = {}
    for b in batches:
        prompts = prompts_for(b, args.context, args.vocab, b)
        runs: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
        mask_ms: list[float] = []
        for _ in range(args.repeats):
            runs["unconstrained"].append(tandem_decode(core, prompts, steps, params=plain)["tok_s"])
            masks.seconds = 0.0
            runs["json_schema"].append(tandem_decode(core, prompts, steps, params=constrained)["tok_s"])
            mask_ms.append(1e3 * masks.seconds / steps)
        row = {name: statistics.median(v) for name, v in runs.items()}
        row["ratio"] = row["json_schema"] / row["unconstrained"]
        row["mask_ms_per_step"] = statistics.median(mask_ms)
        row["runs"] = runs
        out[str(b)] = row
        print(
            f"batch {b}: unconstrained {row['unconstrained']:.1f} tok/s, json_schema "
            f"{row['json_schema']:.1f} tok/s -> {row['ratio']:.3f}x "
            f"(masks {row['mask_ms_per_step']:.3f} ms/step)",
            flush=True,
        )
    core.check_idle()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--batches")
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = resolve_device(args.device)
    result = run_header(device)
    with tempfile.TemporaryDirectory(dir=model_dir_root()) as tmp:
        path = Path(tmp) / "model"
        build_model(args, path, device)
        if args.vocab_tokens:
            synthetic_tokenizer(path, args.vocab_tokens)
        result["compile"] = bench_compile(path, args.vocab)
        c = result["compile"]
        print(
            f"compile ({c['schema_chars']} chars, {c['tokenizer_tokens']} tokens): "
            f"check {c['check_ms']:.1f} ms, cold {c['cold_compile_ms']:.1f} ms, "
            f"cached {c['cached_compile_ms']:.3f} ms",
            flush=True,
        )
        result["decode"] = bench_decode(path, args, device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
