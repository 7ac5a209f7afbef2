"""Engine options: one typed, validated place for every knob (and the environment variables)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

SchedulePolicy = Literal["fcfs", "lpm"]
DisaggregationMode = Literal["null", "prefill", "decode"]
KvTransport = Literal["auto", "nixl", "grpc"]
Quantization = Literal["fp8"]
KvCacheDtype = Literal["auto", "fp8_e4m3"]
_MODES = ("null", "prefill", "decode")
_TRANSPORTS = ("auto", "nixl", "grpc")
_POLICIES = ("fcfs", "lpm")
_DTYPES = ("auto", "bfloat16", "float16", "float32")
_QUANTIZATIONS = (None, "fp8")
_KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine (scheduler + model runner). Names follow SGLang's server args."""

    model_path: str
    tokenizer_path: str | None = None  # defaults to model_path
    dtype: str = "auto"  # "auto" takes the checkpoint's dtype
    # "fp8": block-wise FP8 weights (W8A8), quantized while loading; an FP8 checkpoint (a
    # `quantization_config` in config.json, DeepSeek-V3's layout) is FP8 with or without it.
    quantization: Quantization | None = None
    # KV pool storage: "auto" = the model dtype; "fp8_e4m3" halves it (E4M3, scale 1.0).
    kv_cache_dtype: KvCacheDtype = "auto"
    device: str = "auto"  # "auto": cuda when available, else cpu
    page_size: int = 16  # tokens per KV page; the radix cache shares whole pages only
    max_total_tokens: int | None = None  # KV pool size in tokens; None sizes it from memory
    mem_fraction_static: float = 0.85  # GPU: share of free memory for weights + KV pool
    max_running_requests: int = 256
    max_context_len: int | None = None  # None: the model's max_position_embeddings
    chunked_prefill_size: int = 2048  # per-step token budget; <= 0 disables chunking
    max_prefill_tokens: int = 16384  # per-step budget when chunking is disabled
    schedule_policy: SchedulePolicy = "fcfs"
    disable_radix_cache: bool = False
    # "auto": "triton" on CUDA when Triton is importable, else "torch"; or a registered name.
    attention_backend: str = "auto"
    # CUDA graphs for decode-only steps, captured at batch sizes up to this (larger run eagerly).
    cuda_graph_max_bs: int = 160
    disable_cuda_graph: bool = False
    # Overlap scheduling: the host prepares step N+1 while the device runs step N. None: on for
    # CUDA (except prefill engines); tests force it on CPU to check it changes no output.
    enable_overlap_schedule: bool | None = None
    random_seed: int = 0
    # Prefill/decode disaggregation: "null" runs whole requests; "prefill" sends each prompt's KV
    # to a decode engine's reserved pages; "decode" reserves pages and continues from the KV.
    disaggregation_mode: DisaggregationMode = "null"
    kv_transport: KvTransport = "auto"  # auto: nixl when installed, else bytes over gRPC
    kv_transfer_timeout_s: float = 30.0  # prefill: give up a write; decode: reservation lease
    # Decode engine sharing its GPU with a prefill engine: while more prompts wait on the prefill
    # side than run here, steps are at least this far apart (shared/disagg/pacing.py); 0: off.
    decode_step_interval_ms: float = 0.0
    # Constrained decoding (xgrammar): compiled grammars kept (LRU), compile threads, and how long a
    # request waits for its grammar before it is refused.
    grammar_cache_size: int = 256
    grammar_compile_threads: int = 2
    grammar_compile_timeout_s: float = 10.0
    # JSON schemas: allow any whitespace between tokens (True) or xgrammar's compact separators;
    # compact keeps outputs short and is what models fine-tuned for JSON mostly emit.
    json_any_whitespace: bool = False
    # Check `free + evictable + locked == total` after every step (tests turn it on).
    debug_invariants: bool = dataclasses.field(
        default_factory=lambda: os.environ.get("TANDEM_DEBUG_INVARIANTS", "") not in ("", "0")
    )

    @classmethod
    def from_options(cls, model_path: str, **options: Any) -> EngineConfig:
        """Build from keyword options; an unknown option or a bad value is a `ValueError`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"model_path"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid options: {sorted(known)}")
        config = cls(model_path=str(model_path), **options)
        config.validate()
        return config

    @property
    def chunked_prefill(self) -> bool:
        return self.chunked_prefill_size > 0

    def validate(self) -> None:
        def positive(name: str, value: int | None) -> None:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.quantization not in _QUANTIZATIONS:
            raise ValueError(f"quantization must be None or 'fp8', got {self.quantization!r}")
        if self.kv_cache_dtype not in _KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        positive("page_size", self.page_size)
        positive("max_total_tokens", self.max_total_tokens)
        positive("max_running_requests", self.max_running_requests)
        positive("max_context_len", self.max_context_len)
        positive("max_prefill_tokens", self.max_prefill_tokens)
        positive("cuda_graph_max_bs", self.cuda_graph_max_bs)
        if not isinstance(self.attention_backend, str) or not self.attention_backend:
            raise ValueError(
                f"attention_backend must be a backend name or 'auto', got {self.attention_backend!r}"
            )
        if not isinstance(self.chunked_prefill_size, int):
            raise ValueError(f"chunked_prefill_size must be an integer, got {self.chunked_prefill_size!r}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static!r}")
        if self.disaggregation_mode not in _MODES:
            raise ValueError(f"disaggregation_mode must be one of {_MODES}, got {self.disaggregation_mode!r}")
        if self.kv_transport not in _TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {_TRANSPORTS}, got {self.kv_transport!r}")
        if not self.decode_step_interval_ms >= 0:
            raise ValueError(f"decode_step_interval_ms must be >= 0, got {self.decode_step_interval_ms!r}")
        if not self.kv_transfer_timeout_s > 0:
            raise ValueError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s!r}")
        positive("grammar_cache_size", self.grammar_cache_size)
        positive("grammar_compile_threads", self.grammar_compile_threads)
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s!r}")
        if self.schedule_policy not in _POLICIES:
            raise ValueError(f"schedule_policy must be one of {_POLICIES}, got {self.schedule_policy!r}")
