"""Command-line flags of every worker (`python -m services.{worker,prefill,decode} --help`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.common.auth import CLUSTER_TOKEN_ENV, add_secret_args
from shared.config import EngineConfig


def build_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m services.{role if role != 'unified' else 'worker'}",
        description=f"Tandem {role} worker: a gRPC server over one engine (in its own process).",
    )
    p.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--served-model-name", help="model id clients use (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="gRPC port (default: a free port, printed at start)")
    p.add_argument(
        "--advertise-address",
        help="host:port the router and peers use to reach this worker (default: --host:port)",
    )
    p.add_argument("--router", help="router admin address host:port to register with and heartbeat to")
    add_secret_args(
        p,
        "cluster-token",
        CLUSTER_TOKEN_ENV,
        "cluster token",
        "every RPC but health checks wants it; sent to the router and to decode workers",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port (0: a free one, printed; default: off)",
    )
    p.add_argument(
        "--max-open-requests",
        type=int,
        default=1024,
        help="calls open at once before new ones get RESOURCE_EXHAUSTED (0: no bound)",
    )
    e = p.add_argument_group("engine")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    e.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    e.add_argument(
        "--quantization",
        choices=["fp8"],
        help="fp8: block-wise FP8 weights, quantized while loading (FP8 checkpoints load as FP8 anyway)",
    )
    e.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8_e4m3"],
        help="KV cache storage (auto: the model dtype; fp8_e4m3 halves it)",
    )
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--max-total-tokens", type=int, help="KV pool size in tokens (default: from memory)")
    e.add_argument("--max-running-requests", type=int, default=256)
    e.add_argument("--chunked-prefill-size", type=int, default=2048, help="<= 0 disables chunking")
    e.add_argument("--schedule-policy", default="fcfs", choices=["fcfs", "lpm"])
    e.add_argument("--disable-radix-cache", action="store_true")
    e.add_argument("--attention-backend", default="auto", help="auto: triton on CUDA, torch on CPU")
    e.add_argument(
        "--cuda-graph-max-bs", type=int, default=160, help="largest decode batch run as a CUDA graph"
    )
    e.add_argument("--disable-cuda-graph", action="store_true")
    e.add_argument("--mem-fraction-static", type=float, default=0.85)
    e.add_argument("--random-seed", type=int, default=0)
    g = p.add_argument_group("constrained decoding")
    g.add_argument(
        "--grammar-compile-timeout", type=float, default=10.0, help="seconds before a request is refused"
    )
    g.add_argument("--grammar-cache-size", type=int, default=256, help="compiled grammars kept (LRU)")
    g.add_argument("--grammar-compile-threads", type=int, default=2)
    g.add_argument(
        "--json-any-whitespace",
        action="store_true",
        help="JSON schemas allow any whitespace (default: compact)",
    )
    if role in ("prefill", "decode"):
        e.add_argument("--kv-transport", default="auto", choices=["auto", "nixl", "grpc"])
        e.add_argument("--kv-transfer-timeout", type=float, default=30.0, help="seconds (decode: the lease)")
        e.add_argument(
            "--decode-step-interval-ms",
            type=float,
            default=0.0,
            help="decode sharing a GPU with prefill: space steps while prompts back up there (0: off)",
        )
    return p


def engine_config(args: argparse.Namespace, role: str) -> EngineConfig:
    options: dict[str, Any] = dict(
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        schedule_policy=args.schedule_policy,
        disable_radix_cache=args.disable_radix_cache,
        attention_backend=args.attention_backend,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        disable_cuda_graph=args.disable_cuda_graph,
        mem_fraction_static=args.mem_fraction_static,
        random_seed=args.random_seed,
        grammar_compile_timeout_s=args.grammar_compile_timeout,
        grammar_cache_size=args.grammar_cache_size,
        grammar_compile_threads=args.grammar_compile_threads,
        json_any_whitespace=args.json_any_whitespace,
    )
    if role in ("prefill", "decode"):
        options.update(
            disaggregation_mode=role,
            kv_transport=args.kv_transport,
            kv_transfer_timeout_s=args.kv_transfer_timeout,
            decode_step_interval_ms=args.decode_step_interval_ms,
        )
    return EngineConfig.from_options(args.model, **options)


def served_model_name(args: argparse.Namespace) -> str:
    return args.served_model_name or Path(args.model).resolve().name
