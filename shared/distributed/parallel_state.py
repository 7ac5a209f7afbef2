"""This process's tensor-parallel rank and group, and the collectives the model layers call.

Set once per process, before the model is built (`init_tensor_parallel`); layers read
`tp_rank()`/`tp_size()` in their constructors and keep them. A process that never calls it is
rank 0 of 1, and no collective runs: every caller guards its collective behind `tp_size > 1`.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # the layers import this module: keep it free of model imports
    from shared.models.config import ModelConfig

_HOST = "127.0.0.1"  # the ranks of one node meet rank 0's store on loopback
# While serving, a follower waits in a broadcast for rank 0's next step however long the engine
# idles. A dead peer is noticed by its closed connection, not by this timeout.
SERVING_TIMEOUT = datetime.timedelta(days=30)

# Architectures whose layers are sharded (attention heads, MLP or experts, vocabulary).
TP_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "DeepseekV2ForCausalLM",
        "DeepseekV3ForCausalLM",
    }
)


@dataclass(frozen=True)
class _State:
    rank: int = 0
    size: int = 1
    ep_size: int = 1  # MoE experts partitioned over this many of the ranks (1 or size)


_state = _State()


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def ep_size() -> int:
    """Ranks the routed experts are partitioned over (1: every rank holds a slice of each)."""
    return _state.ep_size


@contextlib.contextmanager
def replicated() -> Iterator[None]:
    """Layers built inside hold whole weights and run no collective: meanwhile this process
    reads as rank 0 of 1 (DP attention's attention blocks, embedding and lm head,
    shared/distributed/dp_attention.py). Layers keep what they read when built."""
    global _state
    saved, _state = _state, _State()
    try:
        yield
    finally:
        _state = saved


def open_rendezvous(size: int, port: int, timeout_s: int) -> dist.TCPStore:
    """Rank 0: the group's store, listening on `port` of every interface (other nodes reach it at
    `dist_init_addr`); 0 lets the OS pick one (`.port`), so concurrent engines never race for one.
    Start-up (every rank joining, then loading its shard) must finish within `timeout_s`."""
    return dist.TCPStore(
        _HOST, port, size, is_master=True, timeout=_seconds(timeout_s), wait_for_workers=False
    )


def join_rendezvous(port: int, size: int, host: str, timeout_s: int) -> dist.TCPStore:
    """A follower: rank 0's store at `host:port`."""
    return dist.TCPStore(host, port, size, is_master=False, timeout=_seconds(timeout_s))


def init_tensor_parallel(
    rank: int, size: int, store: dist.Store, device: torch.device, ep_size: int, timeout_s: int
) -> None:
    """Join the group of `size` ranks meeting at `store`: gloo on CPU, nccl on CUDA; MoE layers
    partition their experts over `ep_size` of them (1 or `size`). Collectives until
    `serving_started` time out after `timeout_s` (a rank that never finished loading)."""
    global _state
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.PrefixStore("tandem_tp", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=_seconds(timeout_s))
    _state = _State(rank, size, ep_size)


def serving_started() -> None:
    """Every rank built its model and pool: from now on waits may be as long as an idle engine."""
    dist.barrier()
    # Private but stable since torch 2.2; without it an idle follower would time out.
    dist.distributed_c10d._set_pg_timeout(SERVING_TIMEOUT)


def _seconds(s: int) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def destroy_tensor_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = _State()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the ranks, in place (the row-parallel and vocab-parallel partial sums)."""
    dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Rank 0: the ranks' `x` [N, n] concatenated along the last dim [N, n * size]; other ranks
    get their own `x` back (they discard logits)."""
    if _state.rank != 0:
        dist.gather(x, None, dst=0)
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1)


def min_across_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. KV pool tokens that fit on each device)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def check_tp_support(model: ModelConfig, size: int, ep_size: int = 1) -> None:
    """A `ValueError` naming what tensor parallelism cannot shard for `model` at `size` ranks
    (routed experts partitioned over `ep_size` of them when it is not 1).

    FP8 weights are checked where they are sharded, as each layer is built
    (`shared.models.layers.linear.check_fp8_shard`: every shard must be whole weight blocks).
    """
    if size == 1:
        return
    if model.architecture not in TP_ARCHITECTURES:
        raise ValueError(
            f"tp_size={size}: {model.architecture or 'this model'} is not supported with tensor"
            f" parallelism (supported: {', '.join(sorted(TP_ARCHITECTURES))})"
        )
    c = model.hf_config
    sizes = [
        ("num_attention_heads", model.num_attention_heads),
        ("intermediate_size", model.intermediate_size),
    ]
    if c.get("n_routed_experts"):
        shared = int(c["moe_intermediate_size"]) * int(c.get("n_shared_experts") or 0)
        if ep_size > 1:
            sizes += [("n_routed_experts", int(c["n_routed_experts"]))]
        else:
            sizes += [("moe_intermediate_size", int(c["moe_intermediate_size"]))]
        sizes += [("moe_intermediate_size * n_shared_experts", shared)] if shared else []
    elif ep_size > 1:
        raise ValueError(f"ep_size={ep_size}: {model.architecture} has no routed experts to partition")
    for name, value in sizes:
        if value % size:
            raise ValueError(f"tp_size={size} must divide the model's {name} ({value})")
    if model.mla is not None:
        return  # one latent "head", replicated on every rank
    kv = model.num_key_value_heads
    if kv % size and size % kv:
        raise ValueError(
            f"tp_size={size} and the model's num_key_value_heads ({kv}): one must divide the other"
        )


def kv_heads_per_rank(model: ModelConfig, size: int) -> int:
    """KV heads each rank stores: its share, or one replicated head when there are fewer than ranks."""
    return max(1, model.num_key_value_heads // size)
