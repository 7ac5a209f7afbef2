"""bench/serving_limits.py: a served model's cost per token and step from its config.json, the
device's limits measured in a child process, and a level set against them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serving_limits

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "dtype": "bfloat16",
}


def test_llama3_8b_costs_what_its_linear_layers_hold() -> None:
    costs = serving_limits.model_costs(LLAMA3_8B)
    assert costs is not None
    # Per layer q + o (4096 x 4096 each), k + v (1024 x 4096 each), gate + up + down (14336 x 4096).
    layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    assert costs["flops_per_prompt_token"] == 2 * 32 * layer == pytest.approx(13.96e9, rel=1e-3)
    assert costs["flops_per_decode_row"] == 2 * (32 * layer + 4096 * 128256)  # the lm head too
    assert costs["step_weight_bytes"] == pytest.approx(15.0e9, rel=1e-2)  # bf16, the lm head included
    fp8 = serving_limits.model_costs(LLAMA3_8B | {"quantization_config": {"quant_method": "fp8"}})
    assert fp8 is not None and fp8["flops_per_prompt_token"] == costs["flops_per_prompt_token"]
    # One byte a linear weight; the lm head stays bf16.
    assert fp8["step_weight_bytes"] == 32 * layer + 2 * 4096 * 128256


def test_models_that_are_not_dense_decoders_have_no_costs(tmp_path: Path) -> None:
    assert serving_limits.model_costs(LLAMA3_8B | {"model_type": "deepseek_v3"}) is None
    assert serving_limits.model_costs(LLAMA3_8B | {"model_type": "qwen3", "num_experts": 8}) is None
    (tmp_path / "config.json").write_text("{not json")
    assert serving_limits.checkpoint_costs(tmp_path) is None  # a broken checkpoint: no limits line
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert serving_limits.checkpoint_costs(tmp_path) == serving_limits.model_costs(LLAMA3_8B)


def test_a_level_against_known_limits() -> None:
    costs = {"flops_per_prompt_token": 10.0, "flops_per_decode_row": 12.0, "step_weight_bytes": 100.0}
    limits = {"matmul_flops": 1000.0, "copy_bytes_per_s": 10_000.0, "device": "x", "matmul": "y"}
    engines = {  # PD: both workers' steps count
        "prefill-0": {"prompt_tokens": 100.0, "decode_rows": 0.0, "steps": 10.0},
        "decode-0": {"prompt_tokens": 0.0, "decode_rows": 50.0, "steps": 40.0},
    }
    r = serving_limits.level(engines, costs, limits, duration_s=2.0)
    assert r == {
        "matmul_flops": (100 * 10 + 50 * 12) / 2,
        "matmul_share": 800 / 1000,
        "weight_bytes_per_s": 50 * 100 / 2,
        "bandwidth_share": 2500 / 10_000,
    }
    assert "= 0.800 of measured" in serving_limits.line(r) and "= 0.250 of copy" in serving_limits.line(r)
    assert serving_limits.rate(4.1e12, "B") == "4.10 TB/s"
    assert serving_limits.rate(2.5e7, "FLOP") == "25.00 MFLOP/s"
    assert serving_limits.level({}, costs, limits, 2.0) is None
    # Measured held as well as in a burst: the held rate is the limit.
    held = serving_limits.level(engines, costs, limits | {"matmul_held_flops": 500.0}, duration_s=2.0)
    assert held is not None and held["matmul_share"] == 800 / 500


def test_this_machine_is_measured_in_a_child_process() -> None:
    limits = serving_limits.measure()
    assert limits is not None and limits["device"] == "cpu" and limits["matmul"] == "float32 1024^3"
    assert limits["matmul_flops"] > 1e8 and limits["copy_bytes_per_s"] > 1e8
    assert limits["matmul_held_flops"] > 1e8 and limits["matmul_held_s"] == 0.4
    text = serving_limits.header(limits)
    assert "FLOP/s (float32 1024^3), held " in text and "over 0.4 s" in text and ", copy " in text
    assert "held" not in serving_limits.header({k: v for k, v in limits.items() if "held" not in k})


def test_llama3_8b_attention_and_kv_costs() -> None:
    costs = serving_limits.model_costs(LLAMA3_8B)
    assert costs is not None
    assert costs["attention_flops_per_pair"] == 4 * 32 * 32 * 128  # 32 layers x 32 heads x 128
    assert costs["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2 == 131072  # 128 KiB a token in bf16


def test_the_roofline_of_a_workload_by_hand() -> None:
    costs = {
        "flops_per_prompt_token": 10.0,
        "flops_per_decode_row": 12.0,
        "step_weight_bytes": 1000.0,
        "attention_flops_per_pair": 1.0,
        "kv_bytes_per_token": 2.0,
    }
    limits = {"matmul_flops": 100.0, "copy_bytes_per_s": 1000.0}
    # 4 prompt tokens: 40 linear FLOPs + 1+2+3+4 pairs = 50 FLOPs = 0.5 s. 3 output tokens: 2
    # decode rows, each 1000/4 weight bytes and 5, then 6 tokens of KV x 2 bytes: 522 B = 0.522 s.
    r = serving_limits.roofline(costs, limits, serving_limits.Requests(4, 3), decode_batch=4.0)
    assert r is not None
    assert r["roofline_prefill_ms"] == pytest.approx(500.0)
    assert r["roofline_decode_ms"] == pytest.approx(522.0)
    assert r["roofline_out_tok_s"] == pytest.approx(3 / 1.022)
    # A cached prefix of 2: 2 linear tokens (20 FLOPs) and pairs 3 + 4; decode unchanged.
    cached = serving_limits.roofline(costs, limits, serving_limits.Requests(4, 3, cached_len=2), 4.0)
    assert cached is not None and cached["roofline_prefill_ms"] == pytest.approx(270.0)
    assert cached["roofline_decode_ms"] == pytest.approx(522.0)
    # One output token: no decode rows, no batch needed; decode rows without a batch: none.
    one = serving_limits.roofline(costs, limits, serving_limits.Requests(4, 1), None)
    assert one is not None and one["roofline_decode_ms"] == 0.0 and one["roofline_out_tok_s"] == 2.0
    assert serving_limits.roofline(costs, limits, serving_limits.Requests(4, 3), None) is None
    # The held matmul rate, where measured, is the prompt side's limit: half the rate, twice the time.
    slow = serving_limits.roofline(
        costs, limits | {"matmul_held_flops": 50.0}, serving_limits.Requests(4, 3), 4.0
    )
    assert slow is not None and slow["roofline_prefill_ms"] == pytest.approx(1000.0)
    old = {k: costs[k] for k in ("flops_per_prompt_token", "flops_per_decode_row", "step_weight_bytes")}
    assert serving_limits.roofline(old, limits, serving_limits.Requests(4, 3), 4.0) is None


def test_a_level_against_its_workloads_roofline() -> None:
    costs = serving_limits.model_costs(LLAMA3_8B)
    assert costs is not None
    limits = {"matmul_flops": 780e12, "copy_bytes_per_s": 4.15e12, "device": "x", "matmul": "y"}
    # Two workers, 100 rows a decode step in one and 300 rows over 2 steps in the other: 400 / 5.
    engines = {
        "a": {"prompt_tokens": 1e5, "decode_rows": 100.0, "steps": 10.0, "decode_batch": 100.0},
        "b": {"prompt_tokens": 0.0, "decode_rows": 300.0, "steps": 2.0, "decode_batch": 150.0},
    }
    assert serving_limits.mean_decode_batch(engines) == pytest.approx(400 / 3)
    req = serving_limits.Requests(1024, 128)
    r = serving_limits.level(engines, costs, limits, 1.0, req, output_tok_s=3000.0)
    assert r is not None
    roof = serving_limits.roofline(costs, limits, req, 400 / 3)
    assert roof is not None and r["roofline_out_tok_s"] == roof["roofline_out_tok_s"]
    assert r["roofline_share"] == pytest.approx(3000.0 / roof["roofline_out_tok_s"])
    # The H200 figures of docs/benchmarks.md r23: a 1k prompt at 780 TFLOP/s is ~18.7 ms.
    assert roof["roofline_prefill_ms"] == pytest.approx(18.7, abs=0.2)
    assert "this level" in serving_limits.line(r) and "roofline" in serving_limits.line(r)
    assert "roofline" not in serving_limits.line(serving_limits.level(engines, costs, limits, 1.0) or {})


def test_the_workers_engine_flags_change_the_costs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    plain = serving_limits.checkpoint_costs(tmp_path, ["--device cuda:0 --max-total-tokens 150000"])
    assert plain == serving_limits.model_costs(LLAMA3_8B)
    options = serving_limits.engine_options(
        ["--device cuda:0", "--kv-cache-dtype fp8_e4m3 --quantization fp8"]
    )
    assert (options["kv_cache_dtype"], options["quantization"], options["device"]) == (
        "fp8_e4m3",
        "fp8",
        "cuda:0",
    )
    kv8 = serving_limits.checkpoint_costs(tmp_path, ["--kv-cache-dtype", "fp8_e4m3"])
    assert plain is not None and kv8 is not None
    assert kv8["kv_bytes_per_token"] == plain["kv_bytes_per_token"] / 2  # one byte a value
    assert kv8["step_weight_bytes"] == plain["step_weight_bytes"]
    w8 = serving_limits.checkpoint_costs(tmp_path, ["--quantization fp8"])
    fp8_checkpoint = serving_limits.model_costs(LLAMA3_8B | {"quantization_config": {"quant_method": "fp8"}})
    assert w8 == fp8_checkpoint and w8 is not None and w8["kv_bytes_per_token"] == plain["kv_bytes_per_token"]
    # A value the workers would refuse: no costs (and no limits line), not an exit from here.
    assert serving_limits.checkpoint_costs(tmp_path, ["--kv-cache-dtype int3"]) is None
