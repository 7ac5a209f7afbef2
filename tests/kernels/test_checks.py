"""The wrappers' argument checks (a clear ValueError) and the switch that routes every op to its
torch reference."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

import kernels.activation
import kernels.checks
import kernels.config
import kernels.decode_attention
import kernels.extend_attention
import kernels.kv_store
import kernels.rmsnorm
import kernels.rotary
from kernels.config import reference_enabled, reference_mode, use_reference

pytestmark = pytest.mark.kernels

Call = Callable[[torch.device], Any]


def _attention_inputs(device: torch.device, num_heads: int = 4) -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(2, num_heads, 16, device=device),
        "k_buffer": torch.randn(32, 2, 16, device=device),
        "v_buffer": torch.randn(32, 2, 16, device=device),
        "req_to_token": torch.arange(32, device=device).view(2, 16),
        "req_rows": torch.tensor([1, 0], device=device),
    }


def _decode(device: torch.device, **overrides: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        **_attention_inputs(device),
        "seq_lens": torch.tensor([5, 16], device=device),
        "scaling": 0.25,
    }
    args.update(overrides)
    return kernels.decode_attention.decode_attention(**args)


def _extend(device: torch.device, **overrides: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        **_attention_inputs(device),
        "q": torch.randn(7, 4, 16, device=device),
        "prefix_lens": torch.tensor([2, 9], device=device),
        "extend_lens": torch.tensor([3, 4], device=device),
        "scaling": 0.25,
    }
    args.update(overrides)
    return kernels.extend_attention.extend_attention(**args)


def _store_kv(device: torch.device, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    args: dict[str, Any] = {
        "k": torch.randn(3, 2, 16, device=device),
        "v": torch.randn(3, 2, 16, device=device),
        "k_buffer": torch.zeros(8, 2, 16, device=device),
        "v_buffer": torch.zeros(8, 2, 16, device=device),
        "slots": torch.tensor([5, 1, 7], device=device),
    }
    args.update(overrides)
    kernels.kv_store.store_kv(**args)
    return args["k_buffer"], args["v_buffer"]


def _rmsnorm(device: torch.device, **overrides: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        "x": torch.randn(3, 24, device=device),
        "weight": torch.randn(24, device=device),
        "eps": 1e-6,
    }
    args.update(overrides)
    return kernels.rmsnorm.rmsnorm(**args)


def _fused_add_rmsnorm(device: torch.device, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    args: dict[str, Any] = {
        "x": torch.randn(3, 24, device=device),
        "residual": torch.randn(3, 24, device=device),
        "weight": torch.randn(24, device=device),
        "eps": 1e-6,
    }
    args.update(overrides)
    return kernels.rmsnorm.fused_add_rmsnorm(**args)


def _silu_and_mul(device: torch.device, **overrides: Any) -> torch.Tensor:
    args: dict[str, Any] = {"x": torch.randn(3, 32, device=device)}
    args.update(overrides)
    return kernels.activation.silu_and_mul(**args)


def _rotary(device: torch.device, **overrides: Any) -> tuple[torch.Tensor, torch.Tensor]:
    args: dict[str, Any] = {
        "positions": torch.tensor([0, 3, 1], device=device),
        "q": torch.randn(3, 4 * 16, device=device),
        "k": torch.randn(3, 2, 16, device=device),
        "cos_sin_cache": torch.randn(8, 16, device=device),
        "head_dim": 16,
    }
    args.update(overrides)
    return kernels.rotary.apply_rotary(**args)


BAD_CALLS: list[tuple[str, Call, str]] = [
    ("q 2-D", lambda d: _decode(d, q=torch.randn(2, 64, device=d)), "q must be"),
    ("heads not a multiple", lambda d: _decode(d, q=torch.randn(2, 3, 16, device=d)), "not a multiple"),
    (
        "q dtype != pool dtype",
        lambda d: _decode(d, q=torch.randn(2, 4, 16, device=d).half()),
        "share a dtype",
    ),
    ("head_dim mismatch", lambda d: _decode(d, q=torch.randn(2, 4, 32, device=d)), "head_dim"),
    ("batch mismatch", lambda d: _decode(d, seq_lens=torch.tensor([5], device=d)), "batch sizes disagree"),
    ("float seq_lens", lambda d: _decode(d, seq_lens=torch.tensor([5.0, 6.0], device=d)), "dtype"),
    ("strided table", lambda d: _decode(d, req_to_token=torch.arange(64, device=d).view(16, 4).t()), "rows"),
    ("window 0", lambda d: _decode(d, sliding_window=0), "sliding_window"),
    ("no splits", lambda d: _decode(d, num_kv_splits=0), "num_kv_splits"),
    ("scaling 0", lambda d: _decode(d, scaling=0.0), "scaling"),
    ("extend batch", lambda d: _extend(d, prefix_lens=torch.tensor([1], device=d)), "batch sizes disagree"),
    ("k vs v", lambda d: _store_kv(d, v=torch.randn(3, 2, 8, device=d)), "differ"),
    ("slots count", lambda d: _store_kv(d, slots=torch.tensor([1, 2], device=d)), "slots for"),
    ("k vs pool", lambda d: _store_kv(d, k_buffer=torch.zeros(8, 1, 16, device=d)), "differ"),
    ("weight size", lambda d: _rmsnorm(d, weight=torch.randn(25, device=d)), "weight's size"),
    (
        "residual dtype",
        lambda d: _fused_add_rmsnorm(d, residual=torch.randn(3, 24, device=d).half()),
        "residual",
    ),
    ("odd width", lambda d: _silu_and_mul(d, x=torch.randn(3, 31, device=d)), "even"),
    ("integer x", lambda d: _silu_and_mul(d, x=torch.ones(3, 32, dtype=torch.int32, device=d)), "dtype"),
    ("cache width", lambda d: _rotary(d, cos_sin_cache=torch.randn(8, 32, device=d)), "head_dim"),
    ("rotary tokens", lambda d: _rotary(d, positions=torch.tensor([0, 1], device=d)), "tokens"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_value_error(device: torch.device, call: Call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
    with reference_mode(), pytest.raises(ValueError, match=message):  # checked on both paths
        call(device)


def test_tensors_on_different_devices_are_rejected() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="one device"):
        _rmsnorm(torch.device("cuda"), weight=torch.randn(24))


def test_cpu_tensors_need_the_interpreter_or_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels.checks, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _silu_and_mul(torch.device("cpu"))
    with reference_mode():
        _silu_and_mul(torch.device("cpu"))


# Each op with the Triton kernels its wrapper launches.
OPS: list[tuple[str, Call, list[tuple[Any, str]]]] = [
    ("decode", _decode, [(kernels.decode_attention, "_decode_stage1_kernel")]),
    ("extend", _extend, [(kernels.extend_attention, "_extend_kernel")]),
    ("store_kv", _store_kv, [(kernels.kv_store, "_store_kv_kernel")]),
    ("rmsnorm", _rmsnorm, [(kernels.rmsnorm, "_rmsnorm_kernel")]),
    ("fused_add_rmsnorm", _fused_add_rmsnorm, [(kernels.rmsnorm, "_rmsnorm_kernel")]),
    ("silu_and_mul", _silu_and_mul, [(kernels.activation, "_silu_and_mul_kernel")]),
    ("rotary", _rotary, [(kernels.rotary, "_rotary_kernel")]),
]


class _KernelLaunched(Exception):
    pass


class _NoLaunch:
    def __getitem__(self, grid: object) -> Callable[..., None]:
        raise _KernelLaunched


@pytest.mark.parametrize(("call", "launched"), [op[1:] for op in OPS], ids=[op[0] for op in OPS])
def test_reference_switch_routes_every_op_to_torch(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, call: Call, launched: list[tuple[Any, str]]
) -> None:
    for module, name in launched:
        monkeypatch.setattr(module, name, _NoLaunch())
    with pytest.raises(_KernelLaunched):
        call(device)
    assert not reference_enabled()
    with reference_mode():
        assert reference_enabled()
        call(device)  # no kernel launched
    assert not reference_enabled()
    use_reference(True)
    try:
        call(device)
    finally:
        use_reference(False)


def test_environment_variable_turns_the_switch_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_KERNELS_REFERENCE", "1")
    try:
        importlib.reload(kernels.config)
        assert kernels.config.reference_enabled()
    finally:
        monkeypatch.delenv("TANDEM_KERNELS_REFERENCE")
        importlib.reload(kernels.config)
    assert not kernels.config.reference_enabled()
