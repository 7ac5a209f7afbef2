"""The gateway's options: one frozen `GatewayConfig` and the argparse front end that builds it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from services.common.auth import API_KEY_ENV, ROUTER_API_KEY_ENV, add_secret_args, secrets_from_args
from services.gateway.tool_calls.formats import TOOL_CALL_PARSERS


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `create_app` needs; built by `parse_args` or directly in tests."""

    router: str  # host:port of the router's gRPC server
    tokenizer: str  # HF model (or tokenizer-only) directory
    host: str = "0.0.0.0"
    port: int = 8000
    # None: ask the router's ListModels at startup and serve its first model under its id.
    served_model_name: str | None = None
    # None: take the router's `max_context_len` (0 there means unknown: no context checks).
    max_model_len: int | None = None
    # gRPC deadline of one generation in seconds; None: no deadline.
    request_timeout: float | None = 600.0
    # How long startup waits for the router to answer ListModels when the model name is not given.
    startup_timeout: float = 60.0
    # Deadline of the router probe behind GET /health.
    health_timeout: float = 2.0
    log_level: str = "info"
    # How the model writes tool calls: a name in TOOL_CALL_PARSERS; "auto" reads the chat template.
    tool_call_parser: str = "auto"
    # Keys clients must send as `Authorization: Bearer <key>` on /v1/*; empty: no check.
    api_keys: tuple[str, ...] = ()
    # The key the gateway sends to the router (`authorization` metadata); None: none.
    router_api_key: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """The `python -m services.gateway` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="Tandem's OpenAI-compatible HTTP gateway: validates and tokenizes OpenAI requests "
        "and streams generations from the router over gRPC.",
    )
    parser.add_argument(
        "--host", default=GatewayConfig.host, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=GatewayConfig.port, help="HTTP port (default: %(default)s)"
    )
    parser.add_argument("--router", required=True, help="the router's gRPC address, host:port")
    parser.add_argument(
        "--tokenizer", required=True, help="the served model's directory (its tokenizer and chat template)"
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model id clients must send (default: the first model the router's ListModels reports)",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="context length in tokens for prompt-length checks (default: the router's max_context_len)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=GatewayConfig.request_timeout,
        help="deadline of one generation in seconds, 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=GatewayConfig.startup_timeout,
        help="seconds to wait for the router at startup (default: %(default)s)",
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=GatewayConfig.health_timeout,
        help="deadline of the router probe behind GET /health in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--tool-call-parser",
        default=GatewayConfig.tool_call_parser,
        choices=TOOL_CALL_PARSERS,
        help="how the model writes tool calls; auto picks from the chat template (default: %(default)s)",
    )
    add_secret_args(
        parser, "api-key", API_KEY_ENV, "API key", "clients must send one on /v1/* (default: none)"
    )
    parser.add_argument(
        "--router-api-key",
        default=None,
        metavar="SECRET",
        help=f"the key sent to the router (also ${ROUTER_API_KEY_ENV}; default: the first --api-key)",
    )
    parser.add_argument(
        "--log-level",
        default=GatewayConfig.log_level,
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    """Parse the command line into a `GatewayConfig`."""
    ns = build_parser().parse_args(argv)
    api_keys = secrets_from_args(ns, "api-key", API_KEY_ENV)
    router_key = ns.router_api_key or os.environ.get(ROUTER_API_KEY_ENV) or api_keys.first
    return GatewayConfig(
        router=ns.router,
        tokenizer=ns.tokenizer,
        host=ns.host,
        port=ns.port,
        served_model_name=ns.served_model_name,
        max_model_len=ns.max_model_len,
        request_timeout=ns.request_timeout if ns.request_timeout > 0 else None,
        startup_timeout=ns.startup_timeout,
        health_timeout=ns.health_timeout,
        log_level=ns.log_level,
        tool_call_parser=ns.tool_call_parser,
        api_keys=api_keys.values,
        router_api_key=router_key,
    )


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number
