"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

The tensor-parallel split is expressed where it belongs, in each weight loader: a column-parallel
layer keeps rows `[tp_rank * n, (tp_rank + 1) * n)` of the output dimension, a row-parallel layer
the same slice of the input dimension and all-reduces its partial sums (then adds its bias once).
Rank and size come from `shared.distributed.parallel_state`, read when the layer is built; at
`tp_size == 1` the slices are the whole tensor and no collective runs.

FP8 (`quant` set, see shared/quant/fp8.py): the weight is E4M3 with one float32 multiplier per
128 x 128 block (`weight_scale_inv`), and activations are quantized per token in groups of 128
as the matmul runs (block-wise W8A8). An FP8 checkpoint's tensors load as they are: each
loader slices the scale in block units, so a fused shard must start on a block boundary. A
bf16 checkpoint loads into a weight of the model dtype and `process_weights_after_loading`
converts it once every shard has arrived (fused projections quantize as one matrix). On CPU the same
quantization runs in torch (`kernels.fp8_gemm.fp8_linear_ref`: exact E4M3 rounding, float32
products), on CUDA the Triton kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shared.distributed import parallel_state
from shared.models.layers.activation import silu_and_mul, silu_and_mul_fp8
from shared.models.layers.fused import use_kernels
from shared.models.weights import set_weight_loader
from shared.quant.fp8 import FP8_DTYPE, Fp8Config

if TYPE_CHECKING:
    from kernels.fp8_quant import Fp8Activation


def check_fp8_shard(quant: Fp8Config | None, size: int, dim: int, what: str) -> None:
    """With FP8 and `tp_size > 1`: a `ValueError` unless this rank's `size` rows (`dim` 0) or
    columns (`dim` 1) of a weight are whole 128-wide blocks, so that its block scales can be
    split between ranks. A no-op without FP8 or tensor parallelism."""
    tp = parallel_state.tp_size()
    if quant is None or tp == 1:
        return
    block = quant.weight_block[dim]
    if size % block:
        side = "rows" if dim == 0 else "columns"
        raise ValueError(
            f"tp_size={tp} with FP8 weights: {what} has {size} {side} per rank, not a multiple of"
            f" the {block}-wide weight block; FP8 block scales split only on block boundaries"
            " (use a tp_size that keeps every shard block-aligned, or unquantized weights)"
        )


class LinearBase(nn.Module):
    """y = x @ W^T (+ b) with W: [output_size, input_size] (this rank's part)."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        super().__init__()
        self.quant = quant
        self.tp_rank = parallel_state.tp_rank()
        self.tp_size = parallel_state.tp_size()
        self.input_size = input_size
        self.output_size = output_size
        fp8_checkpoint = quant is not None and quant.checkpoint_is_fp8
        dtype = FP8_DTYPE if fp8_checkpoint else None
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        self.weight_scale_inv: nn.Parameter | None = None
        if fp8_checkpoint:
            assert quant is not None
            bn, bk = quant.weight_block
            blocks = (-(-output_size // bn), -(-input_size // bk))
            scale = torch.empty(blocks, dtype=torch.float32)
            self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        # Set after loading (FP8 weights, `kernels.fp8_quant.FUSE_INTO_PRODUCERS`): the input of
        # `forward_silu_mul` is quantized in the SiLU-and-mul launch.
        self.silu_mul_quantizes = False

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:  # [T, in] -> [T, out]
        """x, or with FP8 weights also the codes its producer made of it (`Fp8Activation`)."""
        if self.weight_scale_inv is None:
            assert isinstance(x, torch.Tensor)
            if use_kernels(x):  # a single token streams the weight through the GEMV kernel
                from kernels.gemv import linear as gemv_linear

                return gemv_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        return self._fp8(x, self.bias)

    def _fp8(self, x: torch.Tensor | Fp8Activation, bias: torch.Tensor | None) -> torch.Tensor:
        from kernels.fp8_gemm import Fp8Activation, fp8_linear, fp8_linear_ref

        assert self.quant is not None and self.weight_scale_inv is not None
        on_gpu = (x.codes if isinstance(x, Fp8Activation) else x).is_cuda
        linear = fp8_linear if on_gpu else fp8_linear_ref
        return linear(x, self.weight, self.weight_scale_inv, bias, self.quant.weight_block)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2 * in] -> [T, out]
        """`self(silu(gate) * up)` for a fused gate/up output, as a gated MLP's down projection.
        On a GPU, unquantized: one kernel call (`kernels.gemv.silu_mul_linear`), which at one
        token applies the activation inside the GEMV."""
        if self.weight_scale_inv is None and use_kernels(gate_up):
            from kernels.gemv import silu_mul_linear

            return silu_mul_linear(gate_up, self.weight, self.bias)
        return self(self._silu_mul(gate_up))

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | Fp8Activation:
        """silu(gate) * up, or its codes where `silu_mul_quantizes`."""
        if not self.silu_mul_quantizes:
            return silu_and_mul(gate_up)
        assert self.quant is not None
        return silu_and_mul_fp8(gate_up, self.quant.weight_block[1])

    def process_weights_after_loading(self) -> None:
        """`quantization="fp8"` on an unquantized checkpoint: replace the loaded weight by its
        block-wise E4M3 form and scales. A no-op otherwise (unquantized, or already FP8)."""
        if self.quant is None or self.weight_scale_inv is not None:
            return
        from kernels.fp8_quant import block_quant_fp8

        w_q, scale_inv = block_quant_fp8(self.weight.data, self.quant.weight_block)
        self.weight = nn.Parameter(w_q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)

    def keep_unquantized(self) -> None:
        """Drop FP8 for this layer (a checkpoint's `modules_to_not_convert`), before loading."""
        loader, shard_ids = self.weight.weight_loader, self.weight.shard_ids  # type: ignore[attr-defined]
        self.quant = None
        self.weight = nn.Parameter(torch.empty(self.output_size, self.input_size), requires_grad=False)
        set_weight_loader(self.weight, loader, shard_ids)
        self.weight_scale_inv = None

    def _rows(self, param: nn.Parameter, offset: int, size: int) -> tuple[int, int]:
        """Rows [offset, offset + size) of the weight, as rows of `param` (the weight itself, or
        its block scale, where one row covers a block of weight rows)."""
        if param is not self.weight_scale_inv:
            return offset, size
        assert self.quant is not None
        bn = self.quant.weight_block[0]
        if offset % bn:
            raise ValueError(
                f"FP8 checkpoint: a fused shard starts at row {offset}, not on a {bn}-row block boundary"
            )
        return offset // bn, -(-size // bn)


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
        tp_size = parallel_state.tp_size()
        assert output_size % tp_size == 0, (output_size, tp_size)
        check_fp8_shard(
            quant, output_size // tp_size, 0, f"a column-parallel linear of {output_size} outputs"
        )
        super().__init__(input_size, output_size // tp_size, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        _check_full_shape(loaded, (rows * self.tp_size, *param.shape[1:]))
        _copy_checked(param.data, loaded.narrow(0, self.tp_rank * rows, rows))


class RowParallelLinear(LinearBase):
    """Input features split across ranks (dim 1 of the weight); the partial sums are all-reduced.

    The bias is not split: with tensor parallelism it is added once, after the all-reduce.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, quant: Fp8Config | None = None
    ) -> None:
        tp_size = parallel_state.tp_size()
        assert input_size % tp_size == 0, (input_size, tp_size)
        check_fp8_shard(quant, input_size // tp_size, 1, f"a row-parallel linear of {input_size} inputs")
        super().__init__(input_size // tp_size, output_size, bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader)

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        if self.tp_size == 1:
            return super().forward(x)
        out = parallel_state.all_reduce(self.partial(x))  # partial sums -> [T, out]
        return out if self.bias is None else out + self.bias

    def partial(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        """This rank's partial sum, neither all-reduced nor biased: for a caller that adds
        several partial sums before one all-reduce of its own (a MoE block's shared experts)."""
        if self.weight_scale_inv is None:
            assert isinstance(x, torch.Tensor)
            return F.linear(x, self.weight)
        return self._fp8(x, None)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward_silu_mul(gate_up)
        return self(self._silu_mul(gate_up))

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
        for size in output_sizes:
            check_fp8_shard(
                quant, size // parallel_state.tp_size(), 0, f"a fused projection of {size} outputs"
            )
        super().__init__(input_size, sum(output_sizes), bias, quant)
        for param in self.parameters():
            set_weight_loader(param, self.weight_loader, shard_ids=range(len(output_sizes)))

    def weight_loader(  # type: ignore[override]
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int
    ) -> None:
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        offset, size = self._rows(param, offset, self.output_sizes[shard_id] // self.tp_size)
        _check_full_shape(loaded, (size * self.tp_size, *param.shape[1:]))
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
        tp_size = parallel_state.tp_size()
        assert num_heads % tp_size == 0, (num_heads, tp_size)
        assert num_kv_heads % tp_size == 0 or tp_size % num_kv_heads == 0, (num_kv_heads, tp_size)
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // tp_size  # this rank's heads
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        check_fp8_shard(quant, self.q_size, 0, "q_proj")
        check_fp8_shard(quant, self.kv_size, 0, "k_proj/v_proj")
        super().__init__(hidden_size, (self.q_size + 2 * self.kv_size) * tp_size, bias, quant)
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
        if param is self.weight_scale_inv:
            assert self.quant is not None
            offset, size = self._rows(param, offset, size)
            full_rows = -(-full_rows // self.quant.weight_block[0])
        _check_full_shape(loaded, (full_rows, *param.shape[1:]))
        _copy_checked(param.data.narrow(0, offset, size), loaded.narrow(0, rank * size, size))
