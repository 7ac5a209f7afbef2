"""Command-line flags of every worker (`python -m services.{worker,prefill,decode} --help`).

The service's own flags are written here; the engine flags are generated from `EngineConfig`'s
fields (`shared/config_cli.py`), so every engine option is a flag with the dataclass's default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from services.common.argtypes import positive_float
from services.common.auth import CLUSTER_TOKEN_ENV, add_secret_args
from services.common.model_dir import ModelError, resolve_model
from shared import config_cli
from shared.config import EngineConfig


def build_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m services.{role if role != 'unified' else 'worker'}",
        description=f"Tandem {role} worker: a gRPC server over one engine (in its own process).",
    )
    p.add_argument(
        "--model",
        required=True,
        help="HF model directory (config.json, safetensors, tokenizer) or hub id ORG/NAME[@REVISION]",
    )
    p.add_argument(
        "--served-model-name", help="model id clients use (default: the hub id, or the directory name)"
    )
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
    if role == "prefill":
        p.add_argument(
            "--forget-decode-after",
            type=positive_float,
            default=600.0,
            metavar="SECONDS",
            help="a decode worker sent no prompt for this long is forgotten: its channel closed and"
            " its NIXL agent removed, learnt again when it is next chosen (default 600)",
        )
    engine = p.add_argument_group("engine", "options of the engine (shared/config.py:EngineConfig)")
    config_cli.add_arguments(engine, EngineConfig, role)
    return p


def parse_args(role: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a worker's flags; an engine option `EngineConfig` rejects exits like a bad flag."""
    parser = build_parser(role)
    args = parser.parse_args(argv)
    try:
        engine_config(args, role)
    except ValueError as e:
        parser.error(str(e))
    return args


def command_line(role: str) -> argparse.Namespace:
    """`parse_args` of the process's own command line, with `--model` resolved to a model
    directory (a hub id: its snapshot, served under the id; else exit 2 with what to do, before
    anything loads)."""
    args = parse_args(role)
    try:
        model = resolve_model(args.model)
    except ModelError as e:
        print(f"{build_parser(role).prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.model, args.served_model_name = str(model.path), args.served_model_name or model.name
    return args


def engine_config(args: argparse.Namespace, role: str) -> EngineConfig:
    options: dict[str, Any] = config_cli.options(args, EngineConfig, role)
    if role in ("prefill", "decode"):
        options["disaggregation_mode"] = role
    return EngineConfig.from_options(args.model, **options)


def served_model_name(args: argparse.Namespace) -> str:
    return args.served_model_name or Path(args.model).resolve().name
