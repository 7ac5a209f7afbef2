"""Engine options: one typed, validated place for every knob (and the environment variables).

Each field's metadata says how it is set from the command line (`shared/config_cli.py` turns
them into the workers' engine flags): `flag(help)`, or `not_a_flag(reason)`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.config_cli import flag, not_a_flag

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
SchedulePolicy = Literal["fcfs", "lpm"]
DisaggregationMode = Literal["null", "prefill", "decode"]
KvTransport = Literal["auto", "nixl", "grpc"]
DpDispatch = Literal["cache_aware", "round_robin"]
Quantization = Literal["fp8"]
KvCacheDtype = Literal["auto", "fp8_e4m3"]
_DTYPES = typing.get_args(Dtype)
_POLICIES = typing.get_args(SchedulePolicy)
_DP_DISPATCH = typing.get_args(DpDispatch)
_MODES = typing.get_args(DisaggregationMode)
_TRANSPORTS = typing.get_args(KvTransport)
_QUANTIZATIONS = (None, *typing.get_args(Quantization))
_KV_CACHE_DTYPES = typing.get_args(KvCacheDtype)
_PD = ("prefill", "decode")  # the roles that take the disaggregation flags


@dataclass(frozen=True)
class EngineConfig:
    """Options of one engine (scheduler + model runner). Names follow SGLang's server args."""

    model_path: str = field(metadata=not_a_flag("the worker's --model"))
    tokenizer_path: str | None = field(
        default=None, metadata=flag("tokenizer directory (default: the model's)", metavar="DIR")
    )
    dtype: Dtype = field(default="auto", metadata=flag("weights and activations (auto: the checkpoint's)"))
    # An FP8 checkpoint (a `quantization_config` in config.json, DeepSeek-V3's layout) is FP8
    # with or without it.
    quantization: Quantization | None = field(
        default=None, metadata=flag("fp8: block-wise FP8 weights (W8A8), quantized while loading")
    )
    # "fp8_e4m3" stores E4M3 with scale 1.0.
    kv_cache_dtype: KvCacheDtype = field(
        default="auto", metadata=flag("KV cache storage (auto: the model dtype; fp8_e4m3 halves it)")
    )
    device: str = field(
        default="auto",
        metadata=flag("auto (cuda when available, else cpu), cpu or cuda[:N]", metavar="DEVICE"),
    )
    # Tensor parallelism (shared/distributed/): the engine process is rank 0 and starts the other
    # ranks of its node as follower processes (other nodes start theirs: nnodes); Llama, Mistral,
    # Qwen2, Qwen3 and DeepSeek-V2/V3 shard their heads, MLP (or experts) and vocabulary.
    tp_size: int = field(default=1, metadata=flag("tensor-parallel ranks (one process and device each)"))
    # MoE layers: 1 splits every expert across the tp_size ranks; tp_size partitions the experts
    # instead (each rank holds n_routed_experts / tp_size whole experts).
    ep_size: int = field(
        default=1, metadata=flag("expert-parallel ranks for MoE layers: 1 or tp-size", metavar="N")
    )
    # DP attention (shared/distributed/dp_attention.py): DeepSeek's attention and KV data-parallel
    # over the tp_size ranks (each rank its own requests and radix cache), its dense and MoE MLPs
    # tensor- (or expert-) parallel across all of them.
    enable_dp_attention: bool = field(
        default=False,
        metadata=flag(
            "DeepSeek (MLA + MoE): attention data-parallel across the tp-size ranks, each with its own"
            " requests and KV cache; the MLP and MoE layers stay sharded across all of them"
        ),
    )
    # How rank 0 picks a rank for each request under DP attention (shared/distributed/dp_engine.py).
    dp_dispatch: DpDispatch = field(
        default="cache_aware",
        metadata=flag(
            "DP attention: the rank for each request (cache_aware: where its prefix probably is"
            " cached, unless the ranks' loads are lopsided; round_robin)"
        ),
    )
    base_gpu_id: int = field(
        default=0,
        metadata=flag("CUDA: a node's k-th tensor-parallel rank uses GPU base-gpu-id + k", metavar="N"),
    )
    # Multi-node tensor parallelism: tp_size / nnodes ranks on each node. Every node runs the same
    # command but for node_rank; node 0's engine process is rank 0 and serves, the other nodes
    # only run their ranks. The ranks meet at a store on node 0 (dist_init_addr), which must be
    # reachable from every node.
    nnodes: int = field(
        default=1, metadata=flag("nodes the tensor-parallel ranks span (tp-size / nnodes ranks each)")
    )
    node_rank: int = field(
        default=0,
        metadata=flag(
            "this node's index (0: the node that serves; others only run their ranks)", metavar="N"
        ),
    )
    dist_init_addr: str | None = field(
        default=None,
        metadata=flag(
            "host:port of node 0's rendezvous store (required with --nnodes > 1; default: a port"
            " the OS picks)",
            metavar="HOST:PORT",
        ),
    )
    # Tensor parallelism: every rank must have joined the group and loaded its shard within this
    # (a 671B checkpoint on slow storage can take longer than the default); a rank that never
    # shows up fails start-up rather than hanging it.
    dist_timeout: int = field(
        default=300,
        metadata=flag("seconds for every tensor-parallel rank to join and load the model", metavar="S"),
    )
    page_size: int = field(
        default=16, metadata=flag("tokens per KV page; the radix cache shares whole pages only")
    )
    max_total_tokens: int | None = field(
        default=None, metadata=flag("KV pool size in tokens (default: sized from free memory)")
    )
    mem_fraction_static: float = field(
        default=0.85, metadata=flag("GPU: share of free memory for weights + KV pool")
    )
    max_running_requests: int = field(default=256, metadata=flag("requests running at once at most"))
    max_context_len: int | None = field(
        default=None, metadata=flag("longest prompt + output (default: the model's max_position_embeddings)")
    )
    chunked_prefill_size: int = field(
        default=2048, metadata=flag("per-step token budget of prefills; <= 0 disables chunking")
    )
    max_prefill_tokens: int = field(
        default=16384, metadata=flag("per-step token budget of prefills when chunking is disabled")
    )
    schedule_policy: SchedulePolicy = field(
        default="fcfs", metadata=flag("waiting queue order (lpm: longest cached prefix first)")
    )
    disable_radix_cache: bool = field(default=False, metadata=flag("do not share KV between prompts"))
    # Or any registered backend name.
    attention_backend: str = field(
        default="auto", metadata=flag("auto: triton on CUDA when importable, else torch", metavar="NAME")
    )
    # Larger decode batches run eagerly.
    cuda_graph_max_bs: int = field(default=160, metadata=flag("largest decode batch run as a CUDA graph"))
    disable_cuda_graph: bool = field(default=False, metadata=flag("run every step eagerly"))
    # Prompt chunks as CUDA graphs (shared/cuda_graph.py `PromptGraphRunner`): off until measured
    # on a GPU against the eager forward (docs/benchmarks.md r28).
    cuda_graph_prompt_tokens: int | None = field(
        default=None,
        metadata=flag(
            "prompt steps of up to this many tokens run as CUDA graphs (default: eagerly; experimental)"
        ),
    )
    # Overlap scheduling: the host prepares step N+1 while the device runs step N. Tests force it
    # on CPU to check it changes no output. A prefill engine streams a chunk's KV pages once the
    # step that computed it has been read, in the next step (shared/inflight.py).
    enable_overlap_schedule: bool | None = field(
        default=None, metadata=flag("overlap scheduling (default: on for CUDA)")
    )
    # A mixed step (decoding requests beside prompt chunks) runs its decode rows as a CUDA graph
    # on a second stream while the prompts' rows run eagerly on the first (shared/model_runner.py;
    # 1.16-1.17x unified serving at 128 clients on an H200, docs/benchmarks.md r20). Disabled:
    # every row in one eager forward.
    disable_split_mixed_steps: bool = field(
        default=False,
        metadata=flag("run mixed steps as one eager forward, not the decode rows' graph beside the prompts'"),
    )
    # Programmatic dependent launch for the decode step's Triton kernels (kernels/pdl.py; Hopper
    # and later, CUDA only): each is launched while the one before it finishes. On an H100 the
    # decode graph's replay takes 0.972x the time at batch 1 in bf16, 0.937x with FP8 weights
    # (docs/benchmarks.md r26). Disabled: every kernel starts once the one before has ended.
    disable_pdl: bool = field(
        default=False, metadata=flag("launch the decode step's kernels without programmatic dependent launch")
    )
    random_seed: int = field(
        default=0, metadata=flag("seed of the sampler (requests without a seed of their own)")
    )
    # Prefill/decode disaggregation: "null" runs whole requests; "prefill" sends each prompt's KV
    # to a decode engine's reserved pages; "decode" reserves pages and continues from the KV.
    disaggregation_mode: DisaggregationMode = field(
        default="null", metadata=not_a_flag("set by the role: python -m services.{prefill,decode}")
    )
    kv_transport: KvTransport = field(
        default="auto",
        metadata=flag("KV transfer (auto: nixl when installed, else bytes over gRPC)", roles=_PD),
    )
    kv_transfer_timeout_s: float = field(
        default=30.0,
        metadata=flag(
            "prefill: give up a KV write after this; decode: the reservation lease",
            aliases=("--kv-transfer-timeout",),
            metavar="SECONDS",
            roles=_PD,
        ),
    )
    # See shared/disagg/pacing.py.
    decode_step_interval_ms: float = field(
        default=0.0,
        metadata=flag(
            "decode sharing a GPU with prefill: steps at least this far apart while more prompts wait"
            " there than run here (0: off)",
            roles=_PD,
            metavar="MS",
        ),
    )
    decode_pacing_backlog: float = field(
        default=1.0,
        metadata=flag(
            "with --decode-step-interval-ms: pace while the prompts waiting on prefill exceed this"
            " many times the requests decoding (lower paces earlier, trading decode speed for"
            " prefill's share of the GPU)",
            roles=_PD,
            metavar="RATIO",
        ),
    )
    # Constrained decoding (xgrammar).
    grammar_cache_size: int = field(default=256, metadata=flag("compiled grammars kept (LRU)"))
    grammar_compile_threads: int = field(default=2, metadata=flag("threads compiling grammars"))
    grammar_compile_timeout_s: float = field(
        default=10.0,
        metadata=flag(
            "how long a request waits for its grammar before it is refused",
            aliases=("--grammar-compile-timeout",),
            metavar="SECONDS",
        ),
    )
    # Compact separators keep outputs short and are what models fine-tuned for JSON mostly emit.
    json_any_whitespace: bool = field(
        default=False, metadata=flag("JSON schemas allow any whitespace (default: compact separators)")
    )
    # shared/step_stats.py: the GPU time of every step's forward, for the workers' /metrics.
    step_gpu_timing: bool = field(
        default=False,
        metadata=flag(
            "time each step's forward on the GPU (CUDA events) for tandem_worker_engine_step_gpu_seconds"
        ),
    )
    # Check `free + evictable + locked == total` after every step (tests turn it on).
    debug_invariants: bool = field(
        default_factory=lambda: os.environ.get("TANDEM_DEBUG_INVARIANTS", "") not in ("", "0"),
        metadata=not_a_flag("the environment: TANDEM_DEBUG_INVARIANTS=1"),
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

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    @property
    def node_ranks(self) -> range:
        """The tensor-parallel ranks that run on this node."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    def local_rank(self, rank: int) -> int:
        """`rank`'s index among its node's ranks (its GPU is `base_gpu_id` + this)."""
        return rank % self.ranks_per_node

    @property
    def rendezvous(self) -> tuple[str, int]:
        """(host, port) where this node's ranks reach rank 0's store: node 0 on loopback (the store
        listens on every interface), other nodes at `dist_init_addr`. Port 0 without
        `dist_init_addr`: rank 0 lets the OS pick one and hands it to its followers."""
        if self.dist_init_addr is None:
            return "127.0.0.1", 0
        host, _, port = self.dist_init_addr.rpartition(":")
        return "127.0.0.1" if self.node_rank == 0 else host.strip("[]"), int(port)

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
        positive("tp_size", self.tp_size)
        if type(self.base_gpu_id) is not int or self.base_gpu_id < 0:
            raise ValueError(f"base_gpu_id must be an integer >= 0, got {self.base_gpu_id!r}")
        positive("ep_size", self.ep_size)
        positive("dist_timeout", self.dist_timeout)
        self._validate_nodes()
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(
                f"ep_size={self.ep_size} with tp_size={self.tp_size}: expert parallelism runs over the"
                " tensor-parallel ranks, so ep_size must be 1 or equal tp_size"
            )
        if self.enable_dp_attention:
            self._validate_dp_attention()
        positive("page_size", self.page_size)
        positive("max_total_tokens", self.max_total_tokens)
        positive("max_running_requests", self.max_running_requests)
        positive("max_context_len", self.max_context_len)
        positive("max_prefill_tokens", self.max_prefill_tokens)
        positive("cuda_graph_max_bs", self.cuda_graph_max_bs)
        positive("cuda_graph_prompt_tokens", self.cuda_graph_prompt_tokens)
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
        if not self.decode_pacing_backlog >= 0:
            raise ValueError(f"decode_pacing_backlog must be >= 0, got {self.decode_pacing_backlog!r}")
        if not self.kv_transfer_timeout_s > 0:
            raise ValueError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s!r}")
        positive("grammar_cache_size", self.grammar_cache_size)
        positive("grammar_compile_threads", self.grammar_compile_threads)
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s!r}")
        if self.dp_dispatch not in _DP_DISPATCH:
            raise ValueError(f"dp_dispatch must be one of {_DP_DISPATCH}, got {self.dp_dispatch!r}")
        if self.schedule_policy not in _POLICIES:
            raise ValueError(f"schedule_policy must be one of {_POLICIES}, got {self.schedule_policy!r}")

    def _validate_nodes(self) -> None:
        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.nnodes) or self.nnodes <= 0:
            raise ValueError(f"nnodes must be a positive integer, got {self.nnodes!r}")
        if not integer(self.node_rank) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in [0, nnodes - 1] = [0, {self.nnodes - 1}], got {self.node_rank!r}"
            )
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"tp_size={self.tp_size} with nnodes={self.nnodes}: every node runs tp_size / nnodes"
                " ranks, so nnodes must divide tp_size"
            )
        if self.dist_init_addr is not None:
            host, _, port = str(self.dist_init_addr).rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")
        elif self.nnodes > 1:
            raise ValueError(
                f"nnodes={self.nnodes} needs dist_init_addr: host:port of node 0, where the ranks"
                " of every node meet (e.g. --dist-init-addr 10.0.0.1:29500)"
            )

    def _validate_dp_attention(self) -> None:
        # The model (MLA + MoE) is checked when it loads (shared/distributed/dp_attention.py).
        if self.tp_size == 1:
            raise ValueError(
                "enable_dp_attention needs tp_size > 1: attention runs data-parallel across the"
                " tensor-parallel ranks (tp_size=1 is one rank: plain serving)"
            )
        if self.disaggregation_mode != "null":
            raise ValueError(
                f"enable_dp_attention with disaggregation_mode={self.disaggregation_mode!r}: DP attention"
                " on prefill/decode workers is not supported yet"
            )
        if self.nnodes > 1:
            raise ValueError(
                f"enable_dp_attention with nnodes={self.nnodes}: DP attention runs on one node for now"
            )
