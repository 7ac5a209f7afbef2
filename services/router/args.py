"""Command-line flags of the router (`python -m services.router --help`)."""

from __future__ import annotations

import argparse

from services.common.auth import API_KEY_ENV, CLUSTER_TOKEN_ENV, add_secret_args
from services.router.policies import POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.router",
        description="Tandem router: picks prefill/decode (or unified) workers, orchestrates the KV hand-off.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory or hub id ORG/NAME[@REVISION] (its tokenizer serves text-only requests)",
    )
    p.add_argument(
        "--tokenizer-load",
        choices=("background", "on-demand"),
        default="background",
        help="background (default): load the tokenizer on a thread at start, serving meanwhile;"
        " on-demand: at the first text request (a router behind gateways, which send token ids,"
        " then never imports transformers and torch: seconds of CPU and hundreds of MB less)",
    )
    p.add_argument(
        "--served-model-name",
        help="model id (default: the hub id, or the directory name); workers must match",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="public gRPC port (RouterService; default: free port)")
    p.add_argument(
        "--admin-host",
        default="127.0.0.1",
        help="where the admin listeners bind (default 127.0.0.1; another address needs a cluster token)",
    )
    p.add_argument(
        "--admin-port",
        type=int,
        default=0,
        help="admin gRPC port (RouterAdminService: workers register here; default: free port, printed)",
    )
    p.add_argument(
        "--admin-http-port", type=int, help="also serve the admin API over HTTP on --admin-host:this port"
    )
    add_secret_args(
        p, "api-key", API_KEY_ENV, "API key", "clients of the public port must send one (default: none)"
    )
    add_secret_args(
        p, "cluster-token", CLUSTER_TOKEN_ENV, "cluster token", "the admin port wants it; sent to workers"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port (0: a free one, printed; default: off)",
    )
    p.add_argument(
        "--worker", action="append", default=[], help="a worker host:port to add at start (repeatable)"
    )
    policies = sorted(POLICIES)
    p.add_argument("--prefill-policy", default="cache_aware", choices=policies)
    p.add_argument("--decode-policy", default="least_load", choices=policies)
    p.add_argument("--unified-policy", default="cache_aware", choices=policies)
    p.add_argument("--cache-threshold", type=float, default=0.5, help="cache_aware: min prefix match rate")
    p.add_argument(
        "--balance-abs-threshold", type=int, default=32, help="cache_aware: load gap that overrides"
    )
    p.add_argument("--balance-rel-threshold", type=float, default=1.0001, help="cache_aware: load ratio")
    p.add_argument("--max-tree-size", type=int, default=2**24, help="cache_aware: per worker, chars/tokens")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between worker heartbeats")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="probe a worker silent this long")
    p.add_argument(
        "--remove-unhealthy-after", type=float, default=60.0, help="seconds; then forget the worker"
    )
    p.add_argument("--max-attempts", type=int, default=3, help="tries per request before its first token")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=10.0,
        help="seconds a worker stream may send nothing (not even a keepalive) before it fails UNAVAILABLE",
    )
    p.add_argument("--kv-lease-ms", type=int, default=0, help="decode reservation lease (0: the worker's)")
    p.add_argument(
        "--worker-streams",
        default="multiplexed",
        choices=("multiplexed", "per-request"),
        help="how generations travel to a worker: multiplexed over one GenerateMany call per worker (a "
        "gRPC message per engine step) or a Generate call each (a message per token) (default: %(default)s)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="samples in flight before new requests get RESOURCE_EXHAUSTED (HTTP 429); 0: no bound",
    )
    p.add_argument(
        "--max-prompt-chars",
        type=int,
        default=0,
        help="Generate/Tokenize text longer than this is INVALID_ARGUMENT, checked before tokenizing "
        "(default 0: 16 per context token, at least 65536; 4194304 while the context is unknown)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=0,
        help="Generate token_ids longer than this are INVALID_ARGUMENT (default 0: the context length; "
        "1048576 while it is unknown)",
    )
    return p
