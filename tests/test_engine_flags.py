"""Worker engine flags are generated from `EngineConfig` (shared/config_cli.py): every field is a
flag or says why not, old spellings keep working, defaults are the dataclass's, and a bad value
exits like argparse does (status 2, a message, no traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from services import cli, launcher
from services.worker.args import build_parser, engine_config, parse_args
from shared import config_cli
from shared.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("unified", "prefill", "decode")
# The fields that are deliberately not worker flags; a new field must be added to one side.
NOT_FLAGS = {"model_path", "disaggregation_mode", "debug_invariants"}
PD_ONLY = {"kv_transport", "kv_transfer_timeout_s", "decode_step_interval_ms", "decode_pacing_backlog"}
# Engine flags spelled this way before they were generated; scripts, manifests and docs pass them.
OLD_FLAGS = {
    "--dtype": "float32",
    "--device": "cpu",
    "--quantization": "fp8",
    "--kv-cache-dtype": "fp8_e4m3",
    "--page-size": "32",
    "--max-total-tokens": "4096",
    "--max-running-requests": "8",
    "--chunked-prefill-size": "64",
    "--schedule-policy": "lpm",
    "--disable-radix-cache": None,
    "--attention-backend": "torch",
    "--cuda-graph-max-bs": "8",
    "--disable-cuda-graph": None,
    "--mem-fraction-static": "0.5",
    "--random-seed": "7",
    "--grammar-compile-timeout": "3",
    "--grammar-cache-size": "16",
    "--grammar-compile-threads": "1",
    "--json-any-whitespace": None,
    "--kv-transport": "grpc",
    "--kv-transfer-timeout": "2.5",
    "--decode-step-interval-ms": "20",
}


def engine_dests(role: str) -> set[str]:
    parser = build_parser(role)
    (group,) = [g for g in parser._action_groups if g.title == "engine"]
    return {a.dest for a in group._group_actions}


def test_every_field_is_a_flag_or_listed_as_not_one() -> None:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    for role in ROLES:
        expected = fields - NOT_FLAGS - (PD_ONLY if role == "unified" else set())
        assert engine_dests(role) == expected, role
    not_flags = {
        f.name for f in dataclasses.fields(EngineConfig) if isinstance(f.metadata["cli"], config_cli.NotAFlag)
    }
    assert not_flags == NOT_FLAGS


def test_a_field_without_flag_metadata_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Options:
        size: int = dataclasses.field(default=1, metadata=config_cli.flag("a size"))
        forgotten: int = 2

    with pytest.raises(TypeError, match=r"Options\.forgotten"):
        config_cli.add_arguments(argparse.ArgumentParser(), Options, "unified")


@pytest.mark.parametrize("role", ROLES)
def test_help_renders(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(role, ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("--max-context-len", "--no-enable-overlap-schedule", "--grammar-compile-timeout"):
        assert name in out
    assert ("--kv-transfer-timeout" in out) == (role != "unified")
    assert "(default: 16384)" in out  # --max-prefill-tokens, from the dataclass


def test_defaults_are_the_dataclass_defaults() -> None:
    for role in ROLES:
        config = engine_config(parse_args(role, ["--model", "m"]), role)
        mode = "null" if role == "unified" else role
        assert config == EngineConfig.from_options("m", disaggregation_mode=mode)


def test_flags_build_the_engine_config() -> None:
    args = parse_args(
        "decode",
        [
            *("--model", "m", "--tokenizer-path", "tok"),
            *("--kv-transfer-timeout", "2.5"),  # alias of kv_transfer_timeout_s
            *("--grammar-compile-timeout-s", "3"),  # the field's own name works too
            *("--max-context-len", "512", "--max-prefill-tokens", "1024"),  # optional int, new flag
            "--no-enable-overlap-schedule",  # a tri-state bool
            "--disable-radix-cache",
            *("--quantization", "fp8", "--schedule-policy", "lpm"),
        ],
    )
    assert engine_config(args, "decode") == dataclasses.replace(
        EngineConfig.from_options("m"),
        tokenizer_path="tok",
        disaggregation_mode="decode",
        kv_transfer_timeout_s=2.5,
        grammar_compile_timeout_s=3.0,
        max_context_len=512,
        max_prefill_tokens=1024,
        enable_overlap_schedule=False,
        disable_radix_cache=True,
        quantization="fp8",
        schedule_policy="lpm",
    )
    on = parse_args("unified", ["--model", "m", "--enable-overlap-schedule"])
    assert engine_config(on, "unified").enable_overlap_schedule is True


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_old_flag_spellings_still_parse(role: str) -> None:
    argv = ["--model", "m"]
    for name, value in OLD_FLAGS.items():
        argv += [name] if value is None else [name, value]
    config = engine_config(parse_args(role, argv), role)
    assert (config.kv_transfer_timeout_s, config.grammar_compile_timeout_s) == (2.5, 3.0)
    assert config.disable_radix_cache and config.json_any_whitespace and config.page_size == 32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--max-context-len", "lots"], "argument --max-context-len: invalid int value: 'lots'"),
        (["--page-size", "0"], "page_size must be a positive integer, got 0"),
        (["--mem-fraction-static", "1.5"], "mem_fraction_static must be in (0, 1), got 1.5"),
        (["--kv-transport", "grpc"], "unrecognized arguments: --kv-transport grpc"),  # unified only
    ],
)
def test_bad_values_exit_like_argparse(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args("unified", ["--model", "m", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_worker_entry_point_exits_cleanly_on_a_bad_value() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.prefill", "--model", "m", "--max-prefill-tokens", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "max_prefill_tokens must be a positive integer, got -1" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_takes_the_engine_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")  # a model directory, as far as the CLI checks
    assert cli.main(["demo", "--model", str(tmp_path), "--device", "cpu", "--page-size", "0"]) == 2
    assert "page_size must be a positive integer" in capsys.readouterr().err


def test_launcher_leaves_the_kv_transport_to_the_workers_unless_given() -> None:
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    assert parser.parse_args([]).kv_transport is None
    assert parser.parse_args(["--kv-transport", "nixl"]).kv_transport == "nixl"
