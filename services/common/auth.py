"""Shared secrets on the wire: API keys (clients -> gateway / router) and the cluster token
(router <-> workers, prefill -> decode, operators -> the router's admin listener).

Both travel as `authorization: Bearer <secret>` (HTTP header or gRPC metadata). Where they are
checked (docs/security.md has the whole map):

    gateway /v1/*                     an API key        (services/gateway/auth.py)
    router public gRPC (RouterService) an API key        (SecretInterceptor)
    router admin gRPC + admin HTTP    the cluster token (SecretInterceptor, admin_http.py)
    workers (every RPC)               the cluster token (SecretInterceptor)

`grpc.health.v1` stays open everywhere (probes carry no secret), and so does server reflection
(`services/common/reflection.py`: schemas only, the ones `proto/` publishes). A listener with no
secret configured checks nothing: local use needs no keys.

    secrets = load_secrets(ns.api_key, ns.api_key_file, API_KEY_ENV)   # flags + env + files
    server = grpc.aio.server(interceptors=secret_interceptors(secrets, "API key"))
    channel = dial("router:50051", secrets.first)                      # outgoing calls carry it
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.reflection import REFLECTION_SERVICE

API_KEY_ENV = "TANDEM_API_KEY"
ROUTER_API_KEY_ENV = "TANDEM_ROUTER_API_KEY"
CLUSTER_TOKEN_ENV = "TANDEM_CLUSTER_TOKEN"
METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
# Probes (kubelet, the router, load balancers) and schema discovery (grpcurl).
OPEN_METHODS = ("/grpc.health.v1.Health/", f"/{REFLECTION_SERVICE}/")


@dataclass(frozen=True)
class Secrets:
    """The secrets one listener accepts (any of them); empty: the listener checks nothing."""

    values: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.values)

    @property
    def first(self) -> str | None:
        """The secret this process sends on its own outgoing calls."""
        return self.values[0] if self.values else None

    def check(self, presented: str | None) -> bool:
        """True if `presented` is one of the secrets. Constant time in the secret's content: every
        secret is compared, with `hmac.compare_digest`, whatever matched before."""
        if presented is None:
            return False
        given = presented.encode()
        ok = False
        for value in self.values:
            ok |= hmac.compare_digest(value.encode(), given)
        return ok

    def check_bearer(self, header: str | None) -> bool:
        """True if an `authorization` value is `Bearer <one of the secrets>`."""
        return self.check(bearer_token(header))


def bearer_token(header: str | None) -> str | None:
    """The secret in an `authorization` value `Bearer <secret>` (None if it is not one)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def bearer(secret: str) -> tuple[str, str]:
    """The metadata entry that carries `secret`."""
    return (METADATA_KEY, f"Bearer {secret}")


def load_secrets(flags: Iterable[str] | None, files: Iterable[str] | None, env: str) -> Secrets:
    """Flag values, then the environment variable `env`, then files of one secret a line (blank
    lines and `#` comments skipped). ValueError for an empty secret flag or an empty file."""
    values: list[str] = []
    for flag in flags or ():
        if not flag.strip():
            raise ValueError("an empty secret was given")
        values.append(flag.strip())
    if os.environ.get(env, "").strip():
        values.append(os.environ[env].strip())
    for path in files or ():
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise ValueError(f"{path} holds no secret")
        values += found
    return Secrets(tuple(dict.fromkeys(values)))


def add_secret_args(parser: argparse.ArgumentParser, name: str, env: str, what: str, purpose: str) -> None:
    """`--NAME SECRET` and `--NAME-file PATH` (both repeatable; the variable `env` adds one)."""
    dest = name.replace("-", "_")
    parser.add_argument(
        f"--{name}",
        action="append",
        default=[],
        dest=dest,
        metavar="SECRET",
        help=f"{what}: {purpose} (repeatable; also ${env}; a flag shows in `ps`, the variable or a"
        " file does not)",
    )
    parser.add_argument(
        f"--{name}-file",
        action="append",
        default=[],
        dest=f"{dest}_file",
        metavar="PATH",
        help=f"a file of {what}s, one a line (repeatable)",
    )


def secrets_from_args(ns: argparse.Namespace, name: str, env: str) -> Secrets:
    """The secrets `add_secret_args(parser, name, env, ...)` parsed into `ns`."""
    dest = name.replace("-", "_")
    try:
        return load_secrets(getattr(ns, dest), getattr(ns, f"{dest}_file"), env)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--{name}: {e}") from None


# ---- servers ----------------------------------------------------------------------------------


class SecretInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <secret>` with UNAUTHENTICATED, except
    `OPEN_METHODS`. A refused call's request is never parsed (its handler takes raw bytes)."""

    def __init__(self, secrets: Secrets, what: str) -> None:  # what: a noun ("API key")
        self._secrets = secrets
        article = "an" if what[:1].lower() in "aeiou" else "a"
        self._missing = (
            f"this endpoint needs {article} {what}: send metadata 'authorization: Bearer <{what}>'"
        )
        self._wrong = f"the {what} sent in 'authorization' is not valid here"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        header = _metadata_value(details.invocation_metadata)
        if self._secrets.check_bearer(header):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without the interceptor
            return handler
        return _refusal(handler, self._wrong if header else self._missing)


def secret_interceptors(secrets: Secrets, what: str) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for `grpc.aio.server(interceptors=...)`: none when no secret is set."""
    return [SecretInterceptor(secrets, what)] if secrets.enabled else []


def _metadata_value(metadata: Sequence[Any] | None) -> str | None:
    for key, value in metadata or ():
        if key == METADATA_KEY:
            return str(value)
    return None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


# ---- clients ----------------------------------------------------------------------------------


class _Bearer:
    """Adds `authorization: Bearer <secret>` to a call's metadata."""

    def __init__(self, secret: str) -> None:
        self._entry = bearer(secret)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per call kind: a channel files each interceptor under the first kind it implements.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


# A peer inside the suite that went away (a restarted router or worker) is usually back within
# seconds: gRPC's default reconnect backoff (1 s growing 1.6x to 120 s) would leave its callers
# failing fast for up to a minute after it is. Tried again every 2 s at most, it is found at once.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def dial(
    address: str, secret: str | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An insecure (plaintext) channel whose calls all carry `secret` when one is given (with no
    secret, a plain channel: no interceptor cost), reconnecting within `RECONNECT_OPTIONS`."""
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    interceptors = [kind(secret) for kind in kinds] if secret else None
    options = [*RECONNECT_OPTIONS, *(options or ())]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
