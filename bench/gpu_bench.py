"""Tandem on one GPU against the copy-bandwidth roofline and HF transformers, in one run.

Builds a random-weight model of an HF shape (default Llama-3-8B, bf16; nothing downloads),
saves it as safetensors, then measures in this order:

1. roofline: device-to-device copy bandwidth (bytes read + written); the decode roofline of
   batch B is B * bandwidth / (weight bytes + KV bytes one step reads); and one large bf16
   matmul's FLOP/s: the prefill roofline is that over the FLOPs a prompt token costs in the
   linear layers (bench/serving_limits.py's `model_costs`, dense models; attention aside);
2. Tandem (`EngineCore` directly, the engine's default GPU path: Triton attention, CUDA graphs,
   fused kernels), greedy with ignore_eos: decode tok/s at each batch size over a prompt of
   `--context` tokens, counted from the step where every request has its first token to the
   last; the graph replay alone (GPU time of one decode forward); prefill tok/s (the mean of
   `--prefill-repeat` runs) and the host's share of it; with `--mixed B`, a unified engine's
   steps under serving load at each budget of `--mixed-chunks`: B requests decoding while new
   prompts fill the rest of the budget, against decode-only and prefill-only steps
   (`--profile`: the mixed steps' kernels, and the prefill's GPU busy time against its wall
   time with the host ops that took the most time; `--compare-prompt-graphs N`: the prefill and
   mixed steps again with prompt steps of up to N tokens as CUDA graphs);
3. HF transformers `generate` (eager, bf16) on the same weights: decode tok/s from the
   difference of two generate lengths, and prefill tok/s.

Prints a table of absolute figures and ratios, writes JSON (`--json`) and a PNG plot (`--png`,
where matplotlib is installed).

    python bench/gpu_bench.py --json out/gpu_bench.json --png out/gpu_bench.png     # H100, 8B
    python bench/gpu_bench.py --preset tiny                                          # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving_limits import checkpoint_costs, rate
from shared.config import EngineConfig
from shared.engine_core import EngineCore
from shared.model_runner import resolve_device
from shared.sampling import SamplingParams
from shared.tiny_model import build_tokenizer
from shared.tiny_model.tokenizer import BOS_TOKEN, EOS_TOKEN, IM_END_TOKEN, special_token_ids

PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-8B's shape.
    "llama3-8b": dict(
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        batches="1,16,64,128", context=1024, decode_tokens=128, prefill_batch=16, dtype="bfloat16",
    ),
    # DeepSeek-V2-Lite's shape: MLA (kv_lora_rank 512, no q compression), 64 routed experts
    # (6 per token, 2 shared), the first layer dense, YaRN rope.
    "deepseek-v2-lite": dict(
        arch="deepseek_v2", hidden=2048, layers=27, heads=16, kv_heads=16, intermediate=10944,
        vocab=102400, batches="1,32,128", context=1024, decode_tokens=64, prefill_batch=8,
        dtype="bfloat16", experts=64, topk=6, shared_experts=2, moe_intermediate=1408,
        kv_lora_rank=512, rope_dim=64, nope_dim=128, v_dim=128,
    ),
    # Seconds on a CPU: checks the script, not the engine.
    "tiny-deepseek": dict(
        arch="deepseek_v2", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=512,
        batches="1,4", context=32, decode_tokens=8, prefill_batch=2, dtype="float32", experts=8,
        topk=2, shared_experts=1, moe_intermediate=32, kv_lora_rank=32, rope_dim=16, nope_dim=16,
        v_dim=16,
    ),
    "tiny": dict(
        hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512,
        batches="1,4", context=32, decode_tokens=8, prefill_batch=2, dtype="float32",
    ),
}  # fmt: skip


# ---- model ----------------------------------------------------------------------------------


def hf_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.arch == "deepseek_v2":
        return {
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "hidden_size": args.hidden, "intermediate_size": args.intermediate,
            "moe_intermediate_size": args.moe_intermediate, "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
            "n_shared_experts": args.shared_experts, "n_routed_experts": args.experts,
            "num_experts_per_tok": args.topk, "first_k_dense_replace": 1, "kv_lora_rank": args.kv_lora_rank,
            "q_lora_rank": None, "qk_nope_head_dim": args.nope_dim, "qk_rope_head_dim": args.rope_dim,
            "v_head_dim": args.v_dim, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 1.0, "norm_topk_prob": False, "scoring_func": "softmax",
            "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
            "rope_theta": 10000, "max_position_embeddings": 163840, "vocab_size": args.vocab,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
            "attention_bias": False, "torch_dtype": args.dtype,
        }  # fmt: skip
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden // args.heads,
        "vocab_size": args.vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": args.dtype,
    }


def build_model(args: argparse.Namespace, out: Path, device: torch.device) -> int:
    """Random weights (std 0.02, norms 1) as safetensors in `out`; returns the weight bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)  # a small tokenizer: ids past its vocab detokenize to nothing
    ids = special_token_ids(out)
    # Its own special tokens: begin of text, and the end of a text or of a chat turn to stop on.
    config = hf_config(args) | {
        "bos_token_id": ids[BOS_TOKEN], "eos_token_id": [ids[EOS_TOKEN], ids[IM_END_TOKEN]]
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    dtype = getattr(torch, args.dtype)
    shapes = weight_shapes(args)
    gen = torch.Generator(device).manual_seed(0)
    total = 0
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files = 0

    def flush() -> None:
        nonlocal files, shard
        if shard:
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            files += 1
            shard = {}

    shard_bytes = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen).cpu()
        shard[name] = t
        total += t.numel() * t.element_size()
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes > 2 << 30:
            flush()
            shard_bytes = 0
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def weight_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in HF's naming, for the preset's architecture."""
    h, i = args.hidden, args.intermediate
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (args.vocab, h),
    }
    if args.arch == "deepseek_v2":
        return shapes | deepseek_layer_shapes(args)
    head_dim = args.hidden // args.heads
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (args.heads * head_dim, h),
            p + "self_attn.k_proj.weight": (args.kv_heads * head_dim, h),
            p + "self_attn.v_proj.weight": (args.kv_heads * head_dim, h),
            p + "self_attn.o_proj.weight": (h, args.heads * head_dim),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def deepseek_layer_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    h, heads = args.hidden, args.heads
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * (args.nope_dim + args.rope_dim), h),
            p + "self_attn.kv_a_proj_with_mqa.weight": (args.kv_lora_rank + args.rope_dim, h),
            p + "self_attn.kv_a_layernorm.weight": (args.kv_lora_rank,),
            p + "self_attn.kv_b_proj.weight": (heads * (args.nope_dim + args.v_dim), args.kv_lora_rank),
            p + "self_attn.o_proj.weight": (h, heads * args.v_dim),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if layer == 0:  # first_k_dense_replace = 1
            mlps = {"mlp.": args.intermediate}
        else:
            shapes[p + "mlp.gate.weight"] = (args.experts, h)
            mlps = {f"mlp.experts.{e}.": args.moe_intermediate for e in range(args.experts)}
            mlps["mlp.shared_experts."] = args.moe_intermediate * args.shared_experts
        for prefix, inter in mlps.items():
            shapes |= {
                p + prefix + "gate_proj.weight": (inter, h),
                p + prefix + "up_proj.weight": (inter, h),
                p + prefix + "down_proj.weight": (h, inter),
            }
    return shapes


def step_weight_bytes(args: argparse.Namespace, weight_bytes: int, batch: int) -> float:
    """Weight bytes one decode step reads: all of a dense model; for MoE every non-expert weight
    plus the experts the batch's tokens reach (expected distinct count under uniform routing)."""
    if args.arch != "deepseek_v2":
        return weight_bytes
    expert = 3 * args.moe_intermediate * args.hidden * getattr(torch, args.dtype).itemsize
    moe_layers = args.layers - 1
    all_experts = moe_layers * args.experts * expert
    hit = args.experts * (1 - (1 - args.topk / args.experts) ** batch)
    return weight_bytes - all_experts + moe_layers * hit * expert


def model_dir_root() -> str | None:
    """RAM-backed /dev/shm when it has room for an 8B checkpoint, else the default temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 << 30:
        return str(shm)
    return None


# ---- timing ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds of one call (CUDA events on the GPU, the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, iters=20)
    return 2 * n / seconds


def matmul_operands(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Two square operands of the large dense matmul in the dtype the device serves in (bf16
    8192^3 on a GPU, float32 1024^3 on the CPU), and that shape's name."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return a, b, f"{str(dtype).removeprefix('torch.')} {n}^3"


def matmul_flops(device: torch.device) -> tuple[float, str]:
    """FLOP/s of `matmul_operands`' matmul (20 calls: a burst) and its shape's name: what a
    GEMM reaches here."""
    a, b, shape = matmul_operands(device)
    seconds = time_fn(lambda: a @ b, device, iters=20)
    return 2 * a.shape[0] ** 3 / seconds, shape


# ---- Tandem ---------------------------------------------------------------------------------


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(length)] for _ in range(batch)]


class PhaseTimer:
    """Host wall time in the engine's step phases: schedule, forward (build + launch), sample
    (queue sampling), process (read the tokens, append, stop checks); wraps the instance's methods."""

    def __init__(self, core: EngineCore) -> None:
        self.totals: dict[str, float] = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "process": 0.0}
        self.calls: dict[str, int] = dict.fromkeys(self.totals, 0)
        self.enabled = False
        self._wrap(core.scheduler, "schedule", "schedule")
        self._wrap(core.runner, "forward", "forward")
        self._wrap(core, "_launch", "sample")
        self._wrap(core, "_resolve", "process")

    def _wrap(self, obj: object, attr: str, key: str) -> None:
        inner = getattr(obj, attr)

        def timed(*a: object, **k: object) -> object:
            if not self.enabled:
                return inner(*a, **k)
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.totals[key] += time.perf_counter() - t0
                self.calls[key] += 1

        setattr(obj, attr, timed)

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.calls = dict.fromkeys(self.totals, 0)


# Output budget beyond the timed steps: requests that started decoding during the others'
# prefill must not finish inside the timed window (they are aborted after it).
_EXTRA_TOKENS = 256


def tandem_decode(
    core: EngineCore,
    prompts: list[list[int]],
    steps: int,
    phases: PhaseTimer | None = None,
    params: SamplingParams | None = None,
    profile_steps: int = 0,
) -> dict[str, Any]:
    """Prefill a batch, then time `steps` decode steps with every request running, then abort.
    `params` (default greedy, ignore_eos) must not let a request finish within the timed steps.
    `profile_steps`: that many more steps under the torch profiler (GPU ops per step)."""
    params = params or SamplingParams(max_new_tokens=steps + _EXTRA_TOKENS, temperature=0.0, ignore_eos=True)
    device = core.runner.device
    rids = [f"d{len(prompts)}-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
    sync(device)
    start = time.perf_counter()
    for rid, ids in zip(rids, prompts):
        core.add_request([rid], ids, params)
    started: set[str] = set()
    while len(started) < len(prompts):  # (a grammar may still be compiling: steps poll it)
        started.update(o.rid for o in core.step() if o.new_ids)
    prefill_s = time.perf_counter() - start
    if phases is not None:
        phases.reset()
        phases.enabled = True
    tokens = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens += sum(len(o.new_ids) for o in core.step())
    decode_s = time.perf_counter() - t0
    if phases is not None:
        phases.enabled = False
    assert tokens == steps * len(prompts), (tokens, steps, len(prompts))
    step_ops = profile_fn(core.step, profile_steps) if profile_steps and device.type == "cuda" else None
    for rid in rids:
        core.abort(rid)
    while core.has_work:
        core.step()
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": steps,
        "tok_s": tokens / decode_s,
        "step_ms": 1e3 * decode_s / steps,
    } | ({"profile_steps": step_ops} if step_ops else {})


def timed_steps(core: EngineCore, steps: int) -> float:
    """Seconds a step of `core.step()`, `steps` back to back (overlapped as in serving): the
    median interval between steps' returns, which an overlapped engine paces at its forwards'
    rate. A median, not a mean, so that a step which first meets a kernel specialization and
    compiles it (~0.1 s) does not count: the likeliest reading of r19 (docs/benchmarks.md), where
    the first of two 8-step windows over the same mixed load ran ~13 ms a step slower at every
    budget."""
    sync(core.runner.device)
    marks = [time.perf_counter()]
    for _ in range(steps):
        core.step()
        marks.append(time.perf_counter())
    sync(core.runner.device)
    return statistics.median(b - a for a, b in itertools.pairwise(marks))


def tandem_mixed(
    core: EngineCore, args: argparse.Namespace, chunk: int, steps: int = 8, profile: bool = False
) -> dict[str, Any]:
    """A unified engine's steps under serving load, at a `chunk`-token step budget: `args.mixed`
    requests decoding (prompts of `args.context` tokens) while new prompts fill the rest of the
    budget, against decode-only steps of the same batch and prefill-only steps of the budget.
    Milliseconds a step and prompt tokens a step of each; with `profile` (CUDA) instead the GPU
    ops of mixed steps."""
    rows, context, device = args.mixed, args.context, core.runner.device
    if chunk <= rows:
        raise SystemExit(f"--mixed-chunks: a {chunk}-token budget leaves no room beside {rows} decode rows")
    scheduler, config = core.scheduler, core.scheduler.config
    scheduler.config = dataclasses.replace(config, chunked_prefill_size=chunk)  # the one reader
    tag = f"{chunk}-{time.monotonic_ns()}"
    computed = core.counters  # prompt tokens launched so far: "prompt_tokens_computed"

    def add_prompts(tokens: int, seed: int) -> None:  # enough one-token prompts for `tokens`
        one = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        for i, ids in enumerate(prompts_for(-(-tokens // context) + 1, context, args.vocab, seed)):
            core.add_request([f"m{tag}-{seed}-{i}"], ids, one)

    def drain() -> None:
        while core.has_work:
            core.step()

    try:
        decoding = [f"d{tag}-{i}" for i in range(rows)]
        params = SamplingParams(max_new_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True)
        for rid, ids in zip(decoding, prompts_for(rows, context, args.vocab, 31)):
            core.add_request([rid], ids, params)
        started: set[str] = set()
        while len(started) < rows:
            started.update(o.rid for o in core.step() if o.new_ids)
        out: dict[str, Any] = {"chunk": chunk, "decode_rows": rows}
        out["decode_ms"] = 1e3 * timed_steps(core, steps)
        # --compare-split-mixed: windows of steps as built and with the split flipped, alternating.
        windows = 4 if args.compare_split_mixed else 1
        add_prompts((steps * windows + 2) * (chunk - rows), 32)
        core.step()  # the first mixed step
        before = computed["prompt_tokens_computed"]
        if profile and device.type == "cuda":
            out["profile_steps"] = profile_fn(core.step, 4)
        else:
            built = core.runner.config
            times: dict[bool, list[float]] = {False: [], True: []}  # flipped -> seconds a step
            try:
                for w in range(windows):
                    flipped = w % 2 == 1
                    whole = built.disable_split_mixed_steps != flipped
                    core.runner.config = dataclasses.replace(built, disable_split_mixed_steps=whole)
                    times[flipped].append(timed_steps(core, steps))
            finally:
                core.runner.config = built
            out["mixed_ms"] = 1e3 * statistics.mean(times[False])
            out["mixed_prompt_tokens"] = (computed["prompt_tokens_computed"] - before) / (steps * windows)
            out["mixed_split"] = not built.disable_split_mixed_steps
            if times[True]:
                out["mixed_flipped_ms"] = 1e3 * statistics.mean(times[True])
        for rid in decoding:
            core.abort(rid)
        drain()
        if "mixed_ms" in out:
            add_prompts((steps + 2) * chunk, 33)
            core.step()
            before = computed["prompt_tokens_computed"]
            out["prefill_ms"] = 1e3 * timed_steps(core, steps)
            out["prefill_prompt_tokens"] = (computed["prompt_tokens_computed"] - before) / steps
            drain()
        return out
    finally:
        scheduler.config = config


def tandem_prefill(core: EngineCore, prompts: list[list[int]]) -> float:
    """Seconds from adding the prompts to every first token (max_new_tokens 1)."""
    params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    sync(core.runner.device)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        core.add_request([f"p{i}-{time.monotonic_ns()}"], ids, params)
    while core.has_work:
        core.step()
    return time.perf_counter() - start


def bench_tandem(
    path: Path, args: argparse.Namespace, device: torch.device, profile: bool = False
) -> dict[str, Any]:
    """Tandem's timed decode and prefill runs; with `profile` instead the GPU ops of its decode
    steps and forwards (run last of all: a profiler session leaves launches slower for a while,
    which would distort any timing after it)."""
    from transformers import AutoTokenizer

    batches = [int(b) for b in args.batches.split(",")]
    max_len = args.context + args.decode_tokens + _EXTRA_TOKENS + 64
    max_b = max([*batches, args.prefill_batch, args.mixed + 32])  # --mixed: its prompts beside
    config = EngineConfig.from_options(
        str(path),
        device=str(device),
        dtype=args.dtype,
        max_total_tokens=max_b * (max_len + 16) + 4096,
        max_context_len=max_len,
        max_running_requests=max(max_b, 8),
        chunked_prefill_size=args.chunk,
        disable_radix_cache=True,
        disable_cuda_graph=args.no_graph,
        enable_overlap_schedule=not args.no_overlap,
        disable_split_mixed_steps=args.no_split_mixed_steps,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        disable_pdl=args.no_pdl,
        # Only when asked: bench/kernel_ab.sh runs this script on a base tree's shared/, which
        # may predate the option.
        **({"cuda_graph_prompt_tokens": args.prompt_graph_tokens} if args.prompt_graph_tokens else {}),
    )
    t0 = time.perf_counter()
    core = EngineCore(config, tokenizer=AutoTokenizer.from_pretrained(str(path)))
    result: dict[str, Any] = {
        "startup_s": time.perf_counter() - t0,
        "attention_backend": core.runner.backend.name,
        "cuda_graphs": core.runner.graph_runner is not None,
        "prompt_graphs": getattr(core.runner, "prompt_graphs", None) is not None,  # kernel_ab's base
        "decode": {},
    }
    tandem_decode(core, prompts_for(2, args.context, args.vocab, 99), 4)  # compile the extend kernels
    result |= (profile_runs if profile else timed_runs)(core, args, batches, device)
    core.check_idle()
    del core
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def timed_runs(
    core: EngineCore, args: argparse.Namespace, batches: list[int], device: torch.device
) -> dict[str, Any]:
    """Decode at each batch size (with host phases and the graph replay alone), then prefill."""
    phases = PhaseTimer(core)
    graphs = core.runner.graph_runner
    decode: dict[str, Any] = {}
    for b in batches:
        run = tandem_decode(core, prompts_for(b, args.context, args.vocab, b), args.decode_tokens, phases)
        run["host_ms_per_step"] = {k: 1e3 * v / max(run["decode_steps"], 1) for k, v in phases.totals.items()}
        if graphs is not None and graphs.can_run_size(b):
            # The static inputs still hold this run's last step: replay it alone (GPU time).
            padded = graphs.padded_size(b)
            run["graph_ms"] = 1e3 * time_fn(graphs.replay_fn(padded), device, iters=20)
            run["graph_tok_s"] = b / (run["graph_ms"] / 1e3)
        decode[str(b)] = run
        print(f"tandem batch {b}: {run['tok_s']:.1f} tok/s decode", flush=True)
    tandem_prefill(core, prompts_for(args.prefill_batch, args.context, args.vocab, 6))  # warm up
    phases.reset()
    phases.enabled = True
    repeat = args.prefill_repeat
    runs = [prompts_for(args.prefill_batch, args.context, args.vocab, 7 + i) for i in range(repeat)]
    seconds = sum(tandem_prefill(core, prompts) for prompts in runs) / repeat
    phases.enabled = False
    prefill = {
        "batch": args.prefill_batch,
        "tokens": args.prefill_batch * args.context,
        "seconds": seconds,  # the mean of --prefill-repeat runs
        "tok_s": args.prefill_batch * args.context / seconds,
        # The host's time building and launching the prompt steps' forwards (eager: one launch a
        # kernel) against the whole: near 1, the prompts wait on the host rather than the GPU.
        "host_ms": {k: 1e3 * v / repeat for k, v in phases.totals.items()},
        "forwards": phases.calls["forward"] // repeat,
    }
    mixed = {c: tandem_mixed(core, args, int(c)) for c in args.mixed_chunks.split(",")} if args.mixed else {}
    return {"decode": decode, "prefill": prefill} | ({"mixed": mixed} if mixed else {})


def profile_runs(
    core: EngineCore, args: argparse.Namespace, batches: list[int], device: torch.device
) -> dict[str, Any]:
    """GPU ops of whole decode steps at each batch size, and the kernels of eager forwards."""
    if device.type != "cuda":
        return {}
    decode = {}
    for b in batches:
        steps = tandem_decode(core, prompts_for(b, args.context, args.vocab, b), 2, profile_steps=8)
        decode[str(b)] = {"profile_steps": steps["profile_steps"]}
    graphs = core.runner.graph_runner
    forwards: dict[str, Any] = {}
    for b in (1, 128):
        if graphs is not None and graphs.can_run_size(b):
            forwards[str(b)] = profile_forward(graphs.eager_fn(graphs.padded_size(b)))
    mixed = {}
    if args.mixed:
        for c in args.mixed_chunks.split(","):
            mixed[c] = tandem_mixed(core, args, int(c), profile=True)
    prompts = prompts_for(args.prefill_batch, args.context, args.vocab, 8)
    prefill = profile_host_and_gpu(lambda: tandem_prefill(core, prompts), 3)
    return {"decode": decode, "profile": forwards, "prefill": prefill} | ({"mixed": mixed} if mixed else {})


def profile_forward(fn: Callable[[], object]) -> list[dict[str, Any]]:
    """Kernels of one eager decode forward by GPU time (a graph replay hides them)."""
    fn()
    torch.cuda.synchronize()
    return profile_fn(fn, 3)[:12]


def gpu_us(e: Any) -> float:
    """Device microseconds of a profiler event (torch's newer name, else its older one)."""
    return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))


def profile_fn(fn: Callable[[], object], calls: int) -> list[dict[str, Any]]:
    """GPU ops (kernels, copies) of `calls` calls of `fn` by GPU time, per call: the kernels of
    an eager forward, or of whole engine steps (graph replays included, with what runs around
    them)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    events = [e for e in prof.key_averages() if gpu_us(e) > 0]
    total = sum(gpu_us(e) for e in events)
    return [
        {
            "kernel": e.key[:90],
            "us_per_forward": gpu_us(e) / calls,
            "share": gpu_us(e) / total,
            "calls_per_forward": e.count / calls,
        }
        for e in sorted(events, key=lambda e: -gpu_us(e))
    ]


def profile_host_and_gpu(fn: Callable[[], object], calls: int) -> dict[str, Any]:
    """A call's wall time against its GPU ops' summed time (a sum well under the wall: the GPU
    waited for the host's launches), and the host ops with the most self time, per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / calls
    events = prof.key_averages()

    host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    # The device's own events (kernels, copies, memsets): a host op that launched a kernel (aten::mm
    # for cuBLAS's) also reports the kernel's time, which would count it twice.
    device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and gpu_us(e) > 0]
    gpu = sorted(device, key=lambda e: -gpu_us(e))[:10]
    return {
        "wall_us": 1e6 * wall,
        "gpu_busy_us": sum(gpu_us(e) for e in device) / calls,
        "gpu_ops": [{"op": e.key[:90], "us": gpu_us(e) / calls, "calls": e.count / calls} for e in gpu],
        "host_ops": [
            {"op": e.key[:90], "self_cpu_us": e.self_cpu_time_total / calls, "calls": e.count / calls}
            for e in host
        ],
    }


# ---- HF -------------------------------------------------------------------------------------


@torch.inference_mode()
def bench_hf(path: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(device)  # load straight onto the GPU
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).to(device).eval()
    result: dict[str, Any] = {"startup_s": time.perf_counter() - t0, "decode": {}}
    vocab = args.vocab

    def generate(ids: torch.Tensor, n: int) -> float:
        sync(device)
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=0,
        )  # fmt: skip
        sync(device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    warm = torch.tensor(prompts_for(1, 16, vocab, 5), device=device)
    generate(warm, 2)
    for b in [int(x) for x in args.batches.split(",")]:
        n = args.hf_decode_tokens
        ids = torch.tensor(prompts_for(b, args.context, vocab, b), device=device)
        try:
            short, long = generate(ids, 1), generate(ids, 1 + n)
        except torch.OutOfMemoryError:
            result["decode"][str(b)] = {"error": "out of memory"}
            continue
        finally:
            gc.collect()
        result["decode"][str(b)] = {"tok_s": b * n / (long - short), "step_ms": 1e3 * (long - short) / n}
        print(f"hf batch {b}: {result['decode'][str(b)]['tok_s']:.1f} tok/s decode", flush=True)
    ids = torch.tensor(prompts_for(args.prefill_batch, args.context, vocab, 7), device=device)
    seconds = generate(ids, 1)
    result["prefill"] = {"seconds": seconds, "tok_s": args.prefill_batch * args.context / seconds}
    return result


# ---- report ---------------------------------------------------------------------------------


def decode_roofline(
    result: dict[str, Any], args: argparse.Namespace, b: int, kv_bytes_scale: float = 1.0
) -> float:
    """Tokens/s of batch b if a step took its weight and KV bytes at copy bandwidth."""
    kv_per_token = result["model"]["kv_bytes_per_token"] * kv_bytes_scale
    avg_ctx = args.context + args.decode_tokens / 2  # about: the window starts a few tokens in
    step_bytes = step_weight_bytes(args, result["model"]["weight_bytes"], b) + b * avg_ctx * kv_per_token
    return b * result["roofline"]["copy_bytes_per_s"] / step_bytes


def summarize(result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        t = result["tandem"]["decode"][str(b)]
        roof = decode_roofline(result, args, b)
        hf = result.get("hf", {}).get("decode", {}).get(str(b), {}).get("tok_s")
        rows.append(
            {
                "what": f"decode batch {b}",
                "tandem": t["tok_s"],
                "graph_only": t.get("graph_tok_s"),
                "roofline": roof,
                "vs_roofline": t["tok_s"] / roof,
                "hf": hf,
                "vs_hf": t["tok_s"] / hf if hf else None,
            }
        )
    hf_pf = result.get("hf", {}).get("prefill", {}).get("tok_s")
    pf = result["tandem"]["prefill"]["tok_s"]
    pf_roof = result["roofline"].get("prefill_tok_s")
    rows.append(
        {
            "what": f"prefill {args.prefill_batch}x{args.context}",
            "tandem": pf,
            "graph_only": None,
            "roofline": pf_roof,
            "vs_roofline": pf / pf_roof if pf_roof else None,
            "hf": hf_pf,
            "vs_hf": pf / hf_pf if hf_pf else None,
        }
    )
    return rows


def mixed_line(m: dict[str, Any], costs: dict[str, float] | None, matmul: float) -> str:
    """One --mixed budget: a mixed step against a decode-only and a prefill-only one, and the
    mixed step's linear layers against the measured matmul (dense models)."""
    rows, tokens = m["decode_rows"], m["mixed_prompt_tokens"]
    # The prefill-only step's time for the mixed step's prompt tokens, pro rata.
    apart = m["decode_ms"] + m["prefill_ms"] * tokens / max(m["prefill_prompt_tokens"], 1)
    line = (
        f"budget {m['chunk']}: {rows} decoding alone {m['decode_ms']:.2f} ms; prompts alone "
        f"{m['prefill_prompt_tokens']:.0f} tok {m['prefill_ms']:.2f} ms; mixed {tokens:.0f} tok + {rows} "
        f"rows {m['mixed_ms']:.2f} ms ({m['mixed_ms'] / apart:.2f}x the two apart, pro rata)"
    )
    if costs:
        flops = tokens * costs["flops_per_prompt_token"] + rows * costs["flops_per_decode_row"]
        line += f"; linear layers {flops / (m['mixed_ms'] / 1e3) / matmul:.2f} of the matmul"
    if "mixed_flipped_ms" in m:
        flipped = m["mixed_flipped_ms"]
        line += (
            f"; decode rows' graph on a second stream {'off' if m['mixed_split'] else 'on'}: {flipped:.2f} ms"
            f" ({flipped / m['mixed_ms']:.3f}x)"
        )
    return line


def kernel_line(k: dict[str, Any]) -> str:
    """One kernel of a profile (`profile_forward`, `profile_fn`): time per forward, share, calls."""
    us, share, calls = k["us_per_forward"], 100 * k["share"], k["calls_per_forward"]
    return f"  {us:9.1f} us {share:5.1f}%  x{calls:<4.0f} {k['kernel']}"


def print_table(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    def f(x: float | None, width: int, prec: int) -> str:
        return ("-" if x is None else f"{x:.{prec}f}").rjust(width)

    r = result["roofline"]
    print(
        f"\ncopy bandwidth {r['copy_bytes_per_s'] / 1e12:.2f} TB/s, weights "
        f"{result['model']['weight_bytes'] / 1e9:.2f} GB: weights-only batch-1 roofline "
        f"{r['batch1_tok_s']:.1f} tok/s; Tandem batch 1 = {f(r['batch1_vs_weights_roofline'], 0, 3)}x of it"
    )
    if "matmul_flops" in r:
        print(f"matmul {rate(r['matmul_flops'], 'FLOP')} ({r['matmul']}): the prefill row's roofline")
    print(
        f"{'':22}{'tandem tok/s':>14}{'graph only':>12}{'roofline':>11}{'vs roof':>9}"
        f"{'hf tok/s':>11}{'vs hf':>8}"
    )
    for row in rows:
        print(
            f"{row['what']:22}{f(row['tandem'], 14, 1)}{f(row['graph_only'], 12, 1)}"
            f"{f(row['roofline'], 11, 1)}{f(row['vs_roofline'], 9, 3)}{f(row['hf'], 11, 1)}"
            f"{f(row['vs_hf'], 8, 2)}"
        )


def plot(rows: list[dict[str, Any]], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    decode = [r for r in rows if r["what"].startswith("decode")]
    labels = [r["what"].removeprefix("decode ") for r in decode]
    xs = range(len(decode))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    for k, (key, name) in enumerate(
        [("roofline", "roofline"), ("graph_only", "Tandem forward only"), ("tandem", "Tandem"), ("hf", "HF")]
    ):
        ax.bar([x + (k - 1.5) * width for x in xs], [r[key] or 0 for r in decode], width, label=name)
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s (log)")
    ax.legend()
    ax.set_title("Decode throughput vs copy-bandwidth roofline")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return True


def run_header(device: torch.device) -> dict[str, Any]:
    """What every result file records first: the command that made it and the machine."""
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "host": {
            "machine": platform.machine(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "context",
                 "decode_tokens", "prefill_batch"):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    parser.add_argument("--batches", help="comma-separated decode batch sizes")
    parser.add_argument("--dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chunk", type=int, default=8192, help="chunked_prefill_size")
    parser.add_argument("--hf-decode-tokens", type=int, default=16)
    parser.add_argument(
        "--prefill-repeat", type=int, default=1, help="time the prefill this many times (the mean; py-spy)"
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--no-graph", action="store_true", help="Tandem with CUDA graphs off")
    parser.add_argument("--profile", action="store_true", help="top kernels of a decode forward")
    parser.add_argument(
        "--mixed",
        type=int,
        default=0,
        metavar="B",
        help="also time steps with B requests decoding while prompts fill the step budget (a unified"
        " engine under load), against decode-only and prefill-only steps; with --profile their kernels",
    )
    parser.add_argument(
        "--mixed-chunks", default="2048,4096,8192", help="the step budgets (chunked_prefill_size) for --mixed"
    )
    parser.add_argument(
        "--compare-split-mixed",
        action="store_true",
        help="--mixed: also time the mixed steps with disable_split_mixed_steps flipped (the decode"
        " rows' CUDA graph on a second stream beside the prompts' forward, or one eager forward),"
        " windows alternating",
    )
    parser.add_argument(
        "--no-split-mixed-steps", action="store_true", help="Tandem with disable_split_mixed_steps"
    )
    parser.add_argument("--compare-eager", action="store_true", help="batch 1 again, CUDA graphs off")
    parser.add_argument("--no-overlap", action="store_true", help="Tandem with overlap scheduling off")
    parser.add_argument(
        "--compare-overlap", action="store_true", help="every batch again with overlap scheduling off"
    )
    parser.add_argument("--quantization", choices=["fp8"], help="Tandem's weights (default: the dtype)")
    parser.add_argument("--no-pdl", action="store_true", help="Tandem with disable_pdl (kernels/pdl.py)")
    parser.add_argument(
        "--compare-pdl",
        action="store_true",
        help="every batch again with disable_pdl flipped (with --compare-fp8: the FP8 run too)",
    )
    parser.add_argument(
        "--prompt-graph-tokens", type=int, help="Tandem's cuda_graph_prompt_tokens (default: prompts eager)"
    )
    parser.add_argument(
        "--compare-prompt-graphs",
        type=int,
        metavar="N",
        help="batch 1, the prefill (and --mixed) again with prompt steps of up to N tokens as CUDA graphs",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"])
    parser.add_argument(
        "--compare-fp8", action="store_true", help="every batch again with quantization=fp8 (W8A8)"
    )
    parser.add_argument(
        "--compare-kv-fp8", action="store_true", help="every batch again with kv_cache_dtype=fp8_e4m3"
    )
    parser.add_argument(
        "--compare-fp8-mma",
        type=int,
        default=None,
        metavar="M",
        help="every batch again with fp8 weights and kernels.fp8_gemm.MMA_GEMV_MAX_M = M: up to M"
        " tokens on the tensor-core GEMV (kernels.gemv.fp8_gemv mma=True); 0: the CUDA-core GEMV"
        " and the block GEMM only",
    )
    parser.add_argument(
        "--compare-fp8-fused-quant",
        action="store_true",
        help="every batch again with fp8 weights and kernels.fp8_quant.FUSE_INTO_PRODUCERS flipped: the"
        " norms and SiLU-and-mul quantize their outputs for the FP8 linears in their own launches",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    for key, value in {"arch": "llama", **PRESETS[args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = resolve_device(args.device)
    dtype_bytes = getattr(torch, args.dtype).itemsize
    if args.arch == "deepseek_v2":  # MLA: one latent vector per token and layer
        kv_per_token = args.layers * (args.kv_lora_rank + args.rope_dim) * dtype_bytes
    else:
        kv_per_token = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * dtype_bytes
    if args.kv_cache_dtype == "fp8_e4m3":
        kv_per_token //= dtype_bytes
    result = run_header(device) | {"args": vars(args) | {"json": str(args.json), "png": str(args.png)}}
    bw = copy_bandwidth(device)
    matmul, matmul_shape = matmul_flops(device)
    with tempfile.TemporaryDirectory(dir=model_dir_root()) as tmp:
        path = Path(tmp) / "model"
        t0 = time.perf_counter()
        weight_bytes = build_model(args, path, device)
        result["model"] = {
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_per_token,
            "build_s": time.perf_counter() - t0,
        }
        costs = checkpoint_costs(path)  # dense models only
        result["roofline"] = {
            "copy_bytes_per_s": bw,
            "batch1_tok_s": bw / step_weight_bytes(args, weight_bytes, 1),
            "matmul_flops": matmul,
            "matmul": matmul_shape,
            # Prefill tok/s if every linear layer ran at the measured matmul rate (attention aside).
            "prefill_tok_s": matmul / costs["flops_per_prompt_token"] if costs else None,
        }
        print(f"model built ({weight_bytes / 1e9:.2f} GB) in {result['model']['build_s']:.0f} s", flush=True)
        result["tandem"] = bench_tandem(path, args, device)
        fp8_args = argparse.Namespace(**vars(args) | {"quantization": "fp8"})
        if args.compare_fp8:
            result["tandem_fp8"] = bench_tandem(path, fp8_args, device)
        if args.compare_fp8_mma is not None:
            from kernels import fp8_gemm

            default = fp8_gemm.MMA_GEMV_MAX_M
            fp8_gemm.MMA_GEMV_MAX_M = args.compare_fp8_mma  # read at capture: graphs keep it
            try:
                result["tandem_fp8_mma"] = bench_tandem(path, fp8_args, device)
                result["tandem_fp8_mma"]["mma_gemv_max_m"] = {"run": args.compare_fp8_mma, "default": default}
            finally:
                fp8_gemm.MMA_GEMV_MAX_M = default
        if args.compare_fp8_fused_quant:
            from kernels import fp8_quant

            default_fused = fp8_quant.FUSE_INTO_PRODUCERS
            fp8_quant.FUSE_INTO_PRODUCERS = not default_fused  # read when the model loads
            try:
                result["tandem_fp8_fused_quant"] = bench_tandem(path, fp8_args, device)
                result["tandem_fp8_fused_quant"]["fuse_into_producers"] = not default_fused
            finally:
                fp8_quant.FUSE_INTO_PRODUCERS = default_fused
        if args.compare_pdl:
            result["tandem_pdl"] = bench_tandem(
                path, argparse.Namespace(**vars(args) | {"no_pdl": not args.no_pdl}), device
            )
            if args.compare_fp8:
                fp8_pdl = argparse.Namespace(**vars(fp8_args) | {"no_pdl": not args.no_pdl})
                result["tandem_fp8_pdl"] = bench_tandem(path, fp8_pdl, device)
        if args.compare_prompt_graphs:
            graphed = {"batches": "1", "prompt_graph_tokens": args.compare_prompt_graphs}
            graphed_args = argparse.Namespace(**vars(args) | graphed)
            result["tandem_prompt_graphs"] = bench_tandem(path, graphed_args, device)
        if args.compare_kv_fp8:
            kv_args = argparse.Namespace(**vars(args) | {"kv_cache_dtype": "fp8_e4m3"})
            result["tandem_kv_fp8"] = bench_tandem(path, kv_args, device)
        if args.compare_overlap:
            sync_args = argparse.Namespace(**vars(args) | {"no_overlap": True})
            result["tandem_no_overlap"] = bench_tandem(path, sync_args, device)
        if args.compare_eager:
            eager = {"batches": "1", "no_graph": True}
            eager_args = argparse.Namespace(**vars(args) | eager)
            result["tandem_eager"] = bench_tandem(path, eager_args, device)
        if not args.skip_hf:
            result["hf"] = bench_hf(path, args, device)
            gc.collect()
        if args.profile:
            result["tandem_profile"] = bench_tandem(path, args, device, profile=True)
    b1 = result["tandem"]["decode"].get("1")
    result["roofline"]["batch1_vs_weights_roofline"] = (
        b1["tok_s"] / result["roofline"]["batch1_tok_s"] if b1 else None
    )
    rows = summarize(result, args)
    result["table"] = rows
    for b, run in result["tandem"]["decode"].items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in run["host_ms_per_step"].items())
        print(f"tandem batch {b}: step {run['step_ms']:.2f} ms (host: {phases} ms), "
              f"graph replay {run.get('graph_ms', float('nan')):.2f} ms")  # fmt: skip
    pf = result["tandem"]["prefill"]
    if "host_ms" in pf:
        wall, host = 1e3 * pf["seconds"], pf["host_ms"]["forward"]
        print(f"tandem prefill {pf['batch']}x{args.context}: {wall:.2f} ms, {pf['forwards']} forward(s) "
              f"built and launched by the host in {host:.2f} ms ({host / wall:.2f} of the time)")  # fmt: skip
    for m in result["tandem"].get("mixed", {}).values():
        print(mixed_line(m, costs, result["roofline"]["matmul_flops"]))
    if (graphed := result.get("tandem_prompt_graphs")) and not graphed["prompt_graphs"]:
        print("no prompt graphs here (CUDA graphs off, or the model's layers take none)")
    elif graphed:
        g, e = graphed["prefill"], result["tandem"]["prefill"]
        print(f"tandem prefill {g['batch']}x{args.context}, prompt graphs up to {args.compare_prompt_graphs} "
              f"tokens: {1e3 * g['seconds']:.2f} ms (eager: {1e3 * e['seconds']:.2f} ms; "
              f"{e['seconds'] / g['seconds']:.3f}x faster)")  # fmt: skip
        for m in graphed.get("mixed", {}).values():
            print("  with prompt graphs: " + mixed_line(m, costs, result["roofline"]["matmul_flops"]))
    profiled = result.get("tandem_profile", {})
    for b, kernels in profiled.get("profile", {}).items():
        print(f"top kernels of one eager decode forward, batch {b}:")
        for k in kernels[:6]:
            print(kernel_line(k))
    for chunk, m in profiled.get("mixed", {}).items():
        ops = m["profile_steps"]
        print(f"GPU ops of a mixed step, {m['decode_rows']} decoding, budget {chunk}:")
        for k in ops[:10]:
            print(kernel_line(k))
    if pp := profiled.get("prefill"):
        wall, busy = pp["wall_us"] / 1e3, pp["gpu_busy_us"] / 1e3
        print(f"prefill {args.prefill_batch}x{args.context} under the profiler: {wall:.2f} ms, "
              f"GPU ops {busy:.2f} ms; host ops by self time:")  # fmt: skip
        for op in pp["host_ops"]:
            print(f"  {op['self_cpu_us']:9.1f} us  x{op['calls']:<5.0f} {op['op']}")
        print("  GPU ops by time:")
        for op in pp["gpu_ops"]:
            print(f"  {op['us']:9.1f} us  x{op['calls']:<5.0f} {op['op']}")
    for b, run in profiled.get("decode", {}).items():
        if "profile_steps" in run:
            ops = run["profile_steps"]
            busy = sum(k["us_per_forward"] for k in ops)
            step_us = 1e3 * result["tandem"]["decode"][b]["step_ms"]
            print(f"GPU ops of one engine step, batch {b}: {busy:.0f} us busy of a {step_us:.0f} us step")
            for k in ops:
                if k["calls_per_forward"] < 8:  # what runs around the graph, not in every layer
                    print(f"  {k['us_per_forward']:9.1f} us  x{k['calls_per_forward']:<4.1f} {k['kernel']}")
    for b, run in result.get("tandem_no_overlap", {}).get("decode", {}).items():
        with_overlap = result["tandem"]["decode"][b]["tok_s"]
        print(f"tandem batch {b}, overlap off: {run['tok_s']:.1f} tok/s (on: {with_overlap:.1f}, "
              f"{with_overlap / run['tok_s']:.3f}x)")  # fmt: skip
    for b, run in result.get("tandem_fp8", {}).get("decode", {}).items():
        bf16 = result["tandem"]["decode"][b]["tok_s"]
        print(
            f"tandem batch {b}, fp8 weights: {run['tok_s']:.1f} tok/s "
            f"(bf16: {bf16:.1f}, {run['tok_s'] / bf16:.3f}x)"
        )
    mma = result.get("tandem_fp8_mma", {})
    for b, run in mma.get("decode", {}).items():
        bf16 = result["tandem"]["decode"][b]["tok_s"]
        limits = mma["mma_gemv_max_m"]
        routing = result.get("tandem_fp8", {}).get("decode", {}).get(b, {}).get("tok_s")
        than = f", {run['tok_s'] / routing:.3f}x the default's {routing:.1f}" if routing else ""
        print(
            f"tandem batch {b}, fp8 weights, MMA_GEMV_MAX_M {limits['run']} (default {limits['default']}): "
            f"{run['tok_s']:.1f} tok/s ({run['tok_s'] / bf16:.3f}x bf16{than})"
        )
    fused = result.get("tandem_fp8_fused_quant", {})
    for b, run in fused.get("decode", {}).items():
        bf16 = result["tandem"]["decode"][b]["tok_s"]
        default = result.get("tandem_fp8", {}).get("decode", {}).get(b, {}).get("tok_s")
        than = f", {run['tok_s'] / default:.3f}x the default's {default:.1f}" if default else ""
        state = "on" if fused["fuse_into_producers"] else "off"
        print(
            f"tandem batch {b}, fp8 weights, producers quantizing {state}: "
            f"{run['tok_s']:.1f} tok/s ({run['tok_s'] / bf16:.3f}x bf16{than})"
        )
    if (run := fused.get("prefill")) and (default_prefill := result.get("tandem_fp8", {}).get("prefill")):
        print(
            f"tandem prefill, fp8 weights, producers quantizing flipped: {run['tok_s']:.0f} tok/s "
            f"(default {default_prefill['tok_s']:.0f}, {run['tok_s'] / default_prefill['tok_s']:.3f}x)"
        )
    for key, base_key in (("tandem_pdl", "tandem"), ("tandem_fp8_pdl", "tandem_fp8")):
        for b, run in result.get(key, {}).get("decode", {}).items():
            base = result[base_key]["decode"][b]["tok_s"]
            flipped, default = ("on", "off") if args.no_pdl else ("off", "on")
            print(
                f"{base_key} batch {b}, PDL {flipped}: {run['tok_s']:.1f} tok/s, "
                f"graph {run['graph_ms']:.3f} ms (PDL {default}: {base:.1f}, "
                f"{result[base_key]['decode'][b]['graph_ms']:.3f} ms; "
                f"{run['tok_s'] / base:.3f}x tok/s)"
            )
    for b, run in result.get("tandem_kv_fp8", {}).get("decode", {}).items():
        bf16 = result["tandem"]["decode"][b]["tok_s"]
        one_byte = 1 / getattr(torch, args.dtype).itemsize  # of the model dtype's KV bytes
        roof = decode_roofline(result, args, int(b), kv_bytes_scale=one_byte)
        print(
            f"tandem batch {b}, fp8 KV cache: {run['tok_s']:.1f} tok/s ({run['tok_s'] / bf16:.3f}x the "
            f"{bf16:.1f} of a bf16 cache; {run['tok_s'] / roof:.3f}x its roofline {roof:.0f})"
        )
    if "tandem_eager" in result:
        eager = result["tandem_eager"]["decode"]["1"]
        print(f"tandem batch 1, CUDA graphs off: {eager['tok_s']:.1f} tok/s, step {eager['step_ms']:.2f} ms")
    print_table(rows, result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
