"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

The tensor-parallel split is expressed where it belongs, in each weight loader: a column-parallel
layer keeps rows `[tp_rank * n, (tp_rank + 1) * n)` of the output dimension, a row-parallel layer
the same slice of the input dimension. Tandem runs with `tp_size == 1` for now, so the slices are
the whole tensor and no collective runs after a row-parallel matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.weights import set_weight_loader
from shared.quant.fp8 import Fp8Config

# Until tensor parallelism lands every rank holds everything.
TP_RANK = 0
TP_SIZE = 1


class LinearBase(nn.Module):
    """y = x @ W^T (+ b) with W: [output_size, input_size] (this rank's part)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        super().__init__()
        self.quant = quant
        self.tp_rank = TP_RANK
        self.tp_size = TP_SIZE
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch: parameter slice {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}"
        )
    dst.copy_(src)


def _check_full_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    # Checked before slicing out this rank's part, so a wrong tensor never half-loads.
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch: expected checkpoint tensor {expected}, got {tuple(loaded.shape)}")


class ReplicatedLinear(LinearBase):
    """Every rank holds the full weight."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        super().__init__(input_size, output_size, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _copy_checked(param.data, loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks (dim 0 of the weight, the bias likewise)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        assert output_size % TP_SIZE == 0, (output_size, TP_SIZE)
        super().__init__(input_size, output_size // TP_SIZE, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        _check_full_shape(loaded, (rows * self.tp_size, *param.shape[1:]))
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * rows, rows))


class RowParallelLinear(LinearBase):
    """Input features split across ranks (dim 1 of the weight); partial sums would be all-reduced.

    The bias is not split: with tensor parallelism it is added once, after the all-reduce.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        assert input_size % TP_SIZE == 0, (input_size, TP_SIZE)
        super().__init__(input_size // TP_SIZE, output_size, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias
            _copy_checked(param.data, loaded)
            return
        cols = param.shape[1]
        _check_full_shape(loaded, (param.shape[0], cols * self.tp_size))
        _copy_checked(param.data, loaded.narrow(1, self.tp_rank * cols, cols))


class MergedLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up_proj).

    Output layout per rank: [proj 0 | proj 1 | ...], each its own `output_sizes[i] / tp_size` rows;
    checkpoint tensor `i` is loaded with shard id `i`.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader, shard_ids=range(len(output_sizes)))

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int
    ) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _check_full_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVLinear(ColumnParallelLinear):
    """q, k and v projections fused into one matmul (qkv_proj), shard ids "q", "k", "v".

    Output layout per rank: [q: num_heads * head_dim | k: num_kv_heads * head_dim | v: same],
    with this rank's heads. When there are fewer KV heads than ranks, each KV head is
    replicated on `tp_size / num_kv_heads` ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        quant: Fp8Config | None = None,
    ) -> None:
        assert num_heads % TP_SIZE == 0, (num_heads, TP_SIZE)
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // TP_SIZE  # this rank's heads
        self.num_kv_heads = max(1, num_kv_heads // TP_SIZE)
        self.kv_replicas = max(1, TP_SIZE // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * TP_SIZE, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader, shard_ids=("q", "k", "v"))

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str
    ) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
            full_rows = self.total_num_heads * self.head_dim
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
            full_rows = self.total_num_kv_heads * self.head_dim
        else:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        _check_full_shape(loaded, (full_rows, *param.shape[1:]))
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))
