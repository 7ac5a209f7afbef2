"""The hardware limit of a served load level, for bench/serving.py: what the level's engine steps
asked of the device against what the device was measured to do in the same run.

Two limits, measured (`measure`) in a child process before the suite starts, on the device
it will use: a dense matmul's FLOP/s (bf16 8192 x 8192 x 8192 on a GPU, float32 1024^3 on the
CPU: the dtype each serves in) and device-to-device copy bandwidth (bytes read + written,
bench/gpu_bench.py's `copy_bandwidth`). The matmul rate is taken twice: a short burst
(`matmul_flops`) and held for seconds (`matmul_held_flops`, bench/matmul_hold.py's last window),
and the held one is the limit: a served level runs GEMMs for minutes, and an H100 at its 700 W
cap held 0.87 of its burst (docs/benchmarks.md r25). Against them, from the workers' step
counters over the level (`tandem_worker_engine_prefill_tokens_total`, `..._decode_rows_total`,
`..._steps_total`) and the checkpoint's config.json with the workers' engine flags
(`model_costs`, dense decoders only; FP8 weights or an FP8 KV cache set by flag count as such):

- matmul FLOP/s: 2 FLOPs per weight of every linear layer a computed prompt token or a decode
  row passes (the lm head for decode rows only; attention's own FLOPs left out, a few percent
  at 1k-token contexts), over the level's wall time, and its share of the held matmul rate;
- weight bandwidth: every step reads every weight once (KV reads left out), over the level's
  wall time, and its share of the measured copy bandwidth.

A level near 1.0 on either is at that limit; the matmul share is the serving counterpart of MFU
against what this device's GEMM reaches, not its datasheet peak. For PD the workers' steps are
summed (both engines share the one device in the single-GPU runs).

The workload's roofline (`roofline`): the output tokens a second the measured device allows for
the level's requests, each taking its prompt's FLOPs at the held matmul rate (linear layers
and causal attention over the tokens not cached: a shared prefix counts as cached) plus its
decode rows' bytes at the copy bandwidth (its share of every decode step's weight read at the
level's decode batch, and its KV cache read at each row's context), the two summed. Summed,
not overlapped: a mixed step does both at once, which measured 0.95-0.96x of the two apart on
the H200 (docs/benchmarks.md r23), so a level can pass 1.0 by that little. It is the yardstick
for a prompt-heavy load, where the matmul share alone hides the decode side's bytes. With FP8
weights the prompt side is still set against the bf16 matmul measured (FP8 GEMMs can pass it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import config_cli
from shared.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
DENSE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}  # config.json model_type
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

_MEASURE = """
import json, sys, torch
sys.path.insert(0, {root!r})
from bench.gpu_bench import copy_bandwidth, matmul_flops
from bench.matmul_hold import held_rates
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
flops, shape = matmul_flops(device)
seconds, window = {hold!r} if device.type == "cuda" else (0.4, 0.2)
held = held_rates(device, seconds, window)[-1]
print(json.dumps({{"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "copy_bytes_per_s": copy_bandwidth(device), "matmul_flops": flops, "matmul": shape,
                  "matmul_held_flops": held, "matmul_held_s": seconds}}))
"""


def model_costs(config: dict[str, Any], engine: dict[str, Any] | None = None) -> dict[str, float] | None:
    """FLOPs a computed prompt token and a decode row cost in linear layers, and the weight bytes
    a step reads, from an HF config.json and the engine's options (`engine_options`: FP8 weights
    quantized while loading, an FP8 KV cache); None where the model is not a dense decoder."""
    engine = engine or {}
    if config.get("model_type") not in DENSE or config.get("num_experts") or config.get("n_routed_experts"):
        return None
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    layer = h * head_dim * (2 * heads + 2 * kv_heads) + 3 * h * i  # q, k, v, o; gate, up, down
    lm_head = h * config["vocab_size"]
    dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    size = _BYTES.get(str(dtype), 2)
    quant = config.get("quantization_config") or {}
    fp8 = quant.get("quant_method") == "fp8" or engine.get("quantization") == "fp8"
    linear_size = 1 if fp8 else size  # scales left out
    kv_size = 1 if str(engine.get("kv_cache_dtype", "auto")).startswith("fp8") else size
    return {
        "flops_per_prompt_token": 2.0 * layers * layer,
        "flops_per_decode_row": 2.0 * (layers * layer + lm_head),
        "step_weight_bytes": float(layers * layer * linear_size + lm_head * size),
        # a query against one key: q.k and p.v, 2 FLOPs a multiply-add, every head and layer
        "attention_flops_per_pair": 4.0 * layers * heads * head_dim,
        "kv_bytes_per_token": 2.0 * layers * kv_heads * head_dim * kv_size,  # K and V
    }


def engine_options(worker_args: Sequence[str]) -> dict[str, Any]:
    """The engine options (`EngineConfig`'s generated flags) that the workers' flags set,
    e.g. ["--device cuda:0 --kv-cache-dtype fp8_e4m3"]; the workers' other flags are ignored."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)  # a bad value: ArgumentError
    config_cli.add_arguments(parser, EngineConfig, "unified")
    known, _ = parser.parse_known_args(shlex.split(" ".join(worker_args)))
    return config_cli.options(known, EngineConfig, "unified")


def checkpoint_costs(path: Path, worker_args: Sequence[str] = ()) -> dict[str, float] | None:
    """`model_costs` of the checkpoint at `path` served with `worker_args`; None where its
    config.json is unreadable or an engine flag's value is not one (the workers then refuse it
    with their own message)."""
    try:
        return model_costs(json.loads((path / "config.json").read_text()), engine_options(worker_args))
    except (OSError, ValueError, KeyError, TypeError, argparse.ArgumentError):
        return None


def measure(timeout_s: float = 300.0, hold: tuple[float, float] = (2.0, 1.0)) -> dict[str, Any] | None:
    """The device's matmul FLOP/s (burst, and held on a GPU for `hold`'s seconds, the rate of
    its last window of `hold[1]` s; 0.4 s by 0.2 on the CPU) and copy bandwidth, in a child
    process (so that this one holds no device memory while the suite runs); None if it fails
    (the reason printed)."""
    code = _MEASURE.format(root=str(ROOT), hold=hold)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s, check=True
        )
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"hardware limits not measured: {e} {detail[-500:]}", flush=True)
        return None


@dataclass(frozen=True)
class Requests:
    """What each request of a level asks: prompt tokens, the leading ones of them cached (a
    shared prefix), and output tokens (the first from the prompt's step, the rest decode rows)."""

    input_len: int
    output_len: int
    cached_len: int = 0


def roofline(
    costs: dict[str, float], limits: dict[str, Any], req: Requests, decode_batch: float | None
) -> dict[str, float] | None:
    """The output tokens a second the measured device allows for requests `req` when every decode
    step carries `decode_batch` rows (module docstring); None where it cannot be set: a model
    without attention costs, or decode rows with no batch to share the weights over."""
    if "attention_flops_per_pair" not in costs:
        return None
    rows = max(req.output_len - 1, 0)
    if rows and not decode_batch:
        return None
    p, c = req.input_len, min(req.cached_len, req.input_len)
    # Query position q (1-based) attends q keys: sum over the uncached q in (c, p].
    pairs = (p * (p + 1) - c * (c + 1)) / 2
    prefill_flops = (p - c) * costs["flops_per_prompt_token"] + pairs * costs["attention_flops_per_pair"]
    # Row t (1..rows) attends the prompt and t tokens after it.
    contexts = rows * p + rows * (rows + 1) / 2
    decode_bytes = (rows * costs["step_weight_bytes"] / decode_batch if rows and decode_batch else 0.0) + (
        contexts * costs["kv_bytes_per_token"]
    )
    prefill_s = prefill_flops / matmul_limit(limits)
    decode_s = decode_bytes / limits["copy_bytes_per_s"]
    return {
        "roofline_out_tok_s": req.output_len / (prefill_s + decode_s),
        "roofline_prefill_ms": 1e3 * prefill_s,
        "roofline_decode_ms": 1e3 * decode_s,
        "roofline_decode_batch": float(decode_batch or 0.0),
    }


def mean_decode_batch(engines: dict[str, dict[str, Any]]) -> float | None:
    """Decode rows a step with decode rows, over all the workers' engine profiles."""
    rows = sum(p.get("decode_rows", 0.0) for p in engines.values())
    steps = sum(p["decode_rows"] / p["decode_batch"] for p in engines.values() if p.get("decode_batch"))
    return rows / steps if steps else None


def level(
    engines: dict[str, dict[str, Any]],
    costs: dict[str, float],
    limits: dict[str, Any],
    duration_s: float,
    req: Requests | None = None,
    output_tok_s: float | None = None,
) -> dict[str, float] | None:
    """A level's matmul FLOP/s and weight bandwidth (summed over the workers' engine profiles,
    bench/serving.py's `engine_profile`) and their shares of the measured limits; with `req`
    and the level's `output_tok_s`, also its requests' `roofline` at the level's decode batch
    and the share of it the level reached."""
    if duration_s <= 0 or not engines:
        return None
    tokens = sum(p.get("prompt_tokens", 0.0) for p in engines.values())
    rows = sum(p.get("decode_rows", 0.0) for p in engines.values())
    steps = sum(p.get("steps", 0.0) for p in engines.values())
    flops = (tokens * costs["flops_per_prompt_token"] + rows * costs["flops_per_decode_row"]) / duration_s
    weights = steps * costs["step_weight_bytes"] / duration_s
    out = {
        "matmul_flops": flops,
        "matmul_share": flops / matmul_limit(limits),
        "weight_bytes_per_s": weights,
        "bandwidth_share": weights / limits["copy_bytes_per_s"],
    }
    roof = roofline(costs, limits, req, mean_decode_batch(engines)) if req is not None else None
    if roof is not None and output_tok_s is not None:
        out |= roof | {"roofline_share": output_tok_s / roof["roofline_out_tok_s"]}
    return out


def matmul_limit(limits: dict[str, Any]) -> float:
    """The matmul FLOP/s a level is set against: the held rate where it was measured (runs
    before it had the burst alone)."""
    return float(limits.get("matmul_held_flops") or limits["matmul_flops"])


def rate(x: float, unit: str) -> str:
    """`x` per second with an SI prefix: rate(4.1e12, "B") == "4.10 TB/s"."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}/s"
    return f"{x:.0f} {unit}/s"


def header(limits: dict[str, Any]) -> str:
    held = ""
    if limits.get("matmul_held_flops"):
        held = (
            f", held {rate(limits['matmul_held_flops'], 'FLOP')} over {limits['matmul_held_s']:g} s"
            f" ({limits['matmul_held_flops'] / limits['matmul_flops']:.2f} of the burst: the limit used)"
        )
    return (
        f"hardware ({limits['device']}, measured now): matmul {rate(limits['matmul_flops'], 'FLOP')}"
        f" ({limits['matmul']}){held}, copy {rate(limits['copy_bytes_per_s'], 'B')}"
    )


def line(r: dict[str, float]) -> str:
    text = (
        f"limits: matmuls {rate(r['matmul_flops'], 'FLOP')} = {r['matmul_share']:.3f} of measured, "
        f"weights read {rate(r['weight_bytes_per_s'], 'B')} = {r['bandwidth_share']:.3f} of copy"
    )
    if "roofline_share" in r:
        text += (
            f"; roofline {r['roofline_out_tok_s']:.0f} out tok/s at decode batch"
            f" {r['roofline_decode_batch']:.1f} (a request: prefill {r['roofline_prefill_ms']:.2f} ms"
            f" + decode {r['roofline_decode_ms']:.2f} ms), this level {r['roofline_share']:.3f} of it"
        )
    return text
