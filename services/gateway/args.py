"""The gateway's options: one frozen `GatewayConfig` and the argparse front end that builds it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

from services.common.argtypes import non_negative_int, positive_float, positive_int
from services.common.auth import API_KEY_ENV, ROUTER_API_KEY_ENV, add_secret_args, secrets_from_args
from services.gateway.reasoning import REASONING_PARSERS
from services.gateway.tool_calls.formats import TOOL_CALL_PARSERS
from services.version import tandem_version

# A prompt's default character cap (see `services/gateway/limits.py` for why 16 per token).
CHARS_PER_CONTEXT_TOKEN = 16
MIN_AUTO_PROMPT_CHARS = 64 * 1024
UNKNOWN_CONTEXT_PROMPT_CHARS = 4 * 1024 * 1024
RouterStreams = Literal["multiplexed", "per-request"]


@dataclass(frozen=True)
class RequestLimits:
    """Every bound on one request's size, each checked before the work it bounds (`limits.py`).

    The stop and constraint defaults are the engine's own (`shared.sampling.params`, not imported
    here: it pulls in torch); checking them here answers before templating and tokenizing."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 32 * 1024  # the whole header block (h11 counts it as one event)
    body_read_timeout: float = 30.0  # seconds from the request's start to its body's last byte
    header_read_timeout: float = 30.0  # seconds from a connection's opening to its request's headers
    # Seconds a response may wait on a client that takes none of it (the socket's buffers full);
    # then the connection is cut and its generations cancelled (nginx's send_timeout, also 60 s).
    stream_write_timeout: float = 60.0
    # Characters of one prompt (chat: all messages and tools); None: derived from the context.
    max_prompt_chars: int | None = None
    max_samples: int = 128  # prompts x n of one request
    max_stop: int = 16  # MAX_STOP_STRINGS
    max_stop_chars: int = 256  # MAX_STOP_STRING_LEN
    max_tools: int = 128  # OpenAI's own limit
    max_tools_chars: int = 1024 * 1024  # the JSON of all tool definitions together
    max_constraint_chars: int = 256 * 1024  # MAX_CONSTRAINT_CHARS: regex, ebnf, a response schema
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings request (OpenAI's own limit)

    def prompt_chars(self, context: int | None) -> int:
        """The prompt-character cap for a model of `context` tokens (None: unknown)."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        if not context:
            return UNKNOWN_CONTEXT_PROMPT_CHARS
        return max(MIN_AUTO_PROMPT_CHARS, CHARS_PER_CONTEXT_TOKEN * context)


# Flag help of each limit (the flag is the field's name in dashes).
_LIMIT_HELP = {
    "max_body_bytes": "request bodies larger than this get 413",
    "max_header_bytes": "a request whose header block is larger gets 431",
    "body_read_timeout": "seconds a request's body may take to arrive; then 408 and the connection closes",
    "header_read_timeout": "seconds a new connection may take to send its first request's headers; then 408"
    " and it closes (an idle or half-sent connection holds no socket longer)",
    "stream_write_timeout": "seconds a response may wait on a client that takes none of it; then the "
    "connection is cut and its generations cancelled",
    "max_prompt_chars": "characters of one prompt (chat: messages and tools), checked before tokenizing; "
    f"auto: {CHARS_PER_CONTEXT_TOKEN} per context token, at least {MIN_AUTO_PROMPT_CHARS}, "
    f"{UNKNOWN_CONTEXT_PROMPT_CHARS} if the context is unknown",
    "max_samples": "prompts x n of one request",
    "max_stop": "stop strings of one request",
    "max_stop_chars": "characters of one stop string",
    "max_tools": "tools of one chat request",
    "max_tools_chars": "characters of the JSON of a request's tool definitions together",
    "max_constraint_chars": "characters of a regex, ebnf grammar or response_format schema",
    "max_embedding_inputs": "inputs of one /v1/embeddings request",
}


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `create_app` needs; built by `parse_args` or directly in tests."""

    router: str  # host:port of the router's gRPC server
    tokenizer: str  # HF model (or tokenizer-only) directory
    host: str = "0.0.0.0"
    port: int = 8000
    # Share `port` with other gateway processes (SO_REUSEPORT): the kernel spreads connections
    # over them, each process its own event loop (`tandem up --gateways N`).
    reuse_port: bool = False
    # Also serve /metrics on this port (0: any free one; None: only on `port`). With a shared
    # port, /metrics there is whichever process took the connection: scrape these instead.
    metrics_port: int | None = None
    # None: ask the router's ListModels at startup and serve its first model under its id.
    served_model_name: str | None = None
    # None: take the router's `max_context_len` (0 there means unknown: no context checks).
    max_model_len: int | None = None
    # gRPC deadline of one generation in seconds; None: no deadline.
    request_timeout: float | None = 600.0
    # How generations travel to the router: "multiplexed", all over one GenerateMany call (gRPC
    # costs a message per batch of tokens, not per token), or "per-request", a Generate call each.
    router_streams: RouterStreams = "multiplexed"
    # How long startup waits for the router to answer ListModels when the model name is not given.
    startup_timeout: float = 60.0
    # Deadline of the router probe behind GET /health.
    health_timeout: float = 2.0
    log_level: str = "info"
    # How the model writes tool calls: a name in TOOL_CALL_PARSERS; "auto" reads the chat template.
    tool_call_parser: str = "auto"
    # Where the model writes its reasoning: a name in REASONING_PARSERS; "off": all is content.
    reasoning_parser: str = "off"
    # Keys clients must send as `Authorization: Bearer <key>` on /v1/*; empty: no check.
    api_keys: tuple[str, ...] = ()
    # The key the gateway sends to the router (`authorization` metadata); None: none.
    router_api_key: str | None = None
    # Origins browsers may call from (CORS); empty: no CORS headers; ("*",): any origin.
    allowed_origins: tuple[str, ...] = ()
    # Responses kept for /v1/responses' `previous_response_id` and GET (least recently used
    # dropped first); 0: none are kept.
    responses_store_size: int = 1024
    limits: RequestLimits = field(default_factory=RequestLimits)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m services.gateway` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway",
        description="Tandem's OpenAI-compatible HTTP gateway: validates and tokenizes OpenAI requests "
        "and streams generations from the router over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"tandem {tandem_version()}")
    parser.add_argument(
        "--host", default=GatewayConfig.host, help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=GatewayConfig.port, help="HTTP port (default: %(default)s)"
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share --port with other gateway processes (SO_REUSEPORT; the kernel spreads new connections)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="also serve this process's /metrics on this port (0: a free one; default: only on --port)",
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
        type=positive_int,
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
        "--router-streams",
        default=GatewayConfig.router_streams,
        choices=get_args(RouterStreams),
        help="how generations travel to the router: multiplexed over one GenerateMany call (a gRPC "
        "message per batch of tokens) or per-request Generate calls (a message per token) "
        "(default: %(default)s)",
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
    parser.add_argument(
        "--reasoning-parser",
        default=GatewayConfig.reasoning_parser,
        choices=REASONING_PARSERS,
        help="split <think> reasoning into reasoning_content: deepseek_r1, qwen3, auto (from the chat "
        "template) or off (default: %(default)s)",
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
        "--allowed-origins",
        default="",
        metavar="ORIGINS",
        help="comma-separated origins browsers may call the API from (CORS), e.g. "
        "'https://app.example.com,http://localhost:3000', or '*' for any (default: none, CORS off)",
    )
    parser.add_argument(
        "--responses-store-size",
        type=non_negative_int,
        default=GatewayConfig.responses_store_size,
        help="responses kept in this gateway's memory for /v1/responses' previous_response_id and GET "
        "(least recently used dropped first; 0: none; not shared between replicas) (default: %(default)s)",
    )
    limits = parser.add_argument_group("request limits (each answered with a 4xx, never a reset)")
    for f in fields(RequestLimits):
        kind = positive_float if f.name.endswith("_timeout") else positive_int
        default = f.default if f.default is not None else "auto"
        limits.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=f.default,
            help=f"{_LIMIT_HELP[f.name]} (default: {default})",
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
        reuse_port=ns.reuse_port,
        metrics_port=ns.metrics_port,
        served_model_name=ns.served_model_name,
        max_model_len=ns.max_model_len,
        request_timeout=ns.request_timeout if ns.request_timeout > 0 else None,
        router_streams=ns.router_streams,
        startup_timeout=ns.startup_timeout,
        health_timeout=ns.health_timeout,
        log_level=ns.log_level,
        tool_call_parser=ns.tool_call_parser,
        reasoning_parser=ns.reasoning_parser,
        api_keys=api_keys.values,
        router_api_key=router_key,
        allowed_origins=tuple(o.strip() for o in ns.allowed_origins.split(",") if o.strip()),
        responses_store_size=ns.responses_store_size,
        limits=RequestLimits(**{f.name: getattr(ns, f.name) for f in fields(RequestLimits)}),
    )
