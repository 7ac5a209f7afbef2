"""`python -m services.router`: the router. Two gRPC listeners (docs/security.md):

    public  --host:--port              RouterService (+ health, reflection); an API key when one
                                       is set
    admin   --admin-host:--admin-port  RouterAdminService (+ health, reflection), the admin HTTP
                                       API with --admin-http-port; the cluster token when one is set

Prometheus /metrics with --metrics-port; OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Iterator

import grpc
import uvicorn

from services.common import event_loop
from services.common.auth import (
    API_KEY_ENV,
    CLUSTER_TOKEN_ENV,
    Secrets,
    secret_interceptors,
    secrets_from_args,
)
from services.common.decoding import add_servicer
from services.common.health import Health
from services.common.listen import EXCLUSIVE_PORT, listen
from services.common.metrics import serve_metrics
from services.common.model_dir import TOKENIZER_FILES, ModelError, resolve_model
from services.common.multiplex import drain_sessions
from services.common.parent import die_with_launcher
from services.common.reflection import add_reflection
from services.common.tracing import setup_tracing
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.router.args import build_parser
from services.router.limits import PromptLimits
from services.router.metrics import RouterMetrics
from services.router.orchestrator import Orchestrator
from services.router.policies import create_policy
from services.router.registry import Registry
from services.router.server import RouterAdminServicer, RouterServicer
from services.router.tokenizer import RouterTokenizer

logger = logging.getLogger("services.router")
# Above gRPC's 4 MiB default: a prompt the gateway accepts (16 characters per context token, up
# to 4 UTF-8 bytes each, plus its token ids) must reach the router's own checks, which answer
# INVALID_ARGUMENT naming the field instead of a RESOURCE_EXHAUSTED that reads as "retry later".
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SERVICES = router_pb2.DESCRIPTOR.services_by_name


async def serve() -> None:
    parser = build_parser()
    args = parser.parse_args()
    try:
        model = resolve_model(args.model, TOKENIZER_FILES)  # the router needs only the tokenizer
    except ModelError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # no usage: the flags were fine
    api_keys = secrets_from_args(args, "api-key", API_KEY_ENV)
    cluster_token = secrets_from_args(args, "cluster-token", CLUSTER_TOKEN_ENV)
    _check_admin_exposure(args.admin_host, cluster_token)
    die_with_launcher()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    tracing = setup_tracing("tandem-router")
    tokenizer = RouterTokenizer(model.path, args.tokenizer_load)
    registry = Registry(
        args.served_model_name or model.name,
        args.heartbeat_interval,
        args.heartbeat_timeout,
        args.remove_unhealthy_after,
        cluster_token=cluster_token.first,
        multiplexed=args.worker_streams == "multiplexed",
    )
    cache_aware = dict(
        cache_threshold=args.cache_threshold,
        balance_abs_threshold=args.balance_abs_threshold,
        balance_rel_threshold=args.balance_rel_threshold,
        max_tree_size=args.max_tree_size,
    )

    def policy(name: str) -> object:
        return create_policy(name, **(cache_aware if name == "cache_aware" else {}))

    metrics = RouterMetrics(registry)
    orchestrator = Orchestrator(
        registry,
        policy(args.prefill_policy),  # type: ignore[arg-type]
        policy(args.decode_policy),  # type: ignore[arg-type]
        policy(args.unified_policy),  # type: ignore[arg-type]
        max_attempts=args.max_attempts,
        kv_lease_ms=args.kv_lease_ms,
        metrics=metrics,
        max_in_flight=args.max_in_flight,
        stall_timeout_s=args.stall_timeout,
    )
    health_status = Health([_SERVICES["RouterService"], _SERVICES["RouterAdminService"]])
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), EXCLUSIVE_PORT],
        interceptors=secret_interceptors(api_keys, "API key"),
    )
    limits = PromptLimits(args.max_prompt_chars, args.max_prompt_tokens)
    # add_servicer: an undecodable request is INVALID_ARGUMENT (grpc.aio's own answer is UNKNOWN).
    add_servicer(
        server,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        RouterServicer(orchestrator, registry, tokenizer, limits),
    )
    health_status.add_to(server)
    add_reflection(server, [_SERVICES["RouterService"]])
    port = listen(server, f"{args.host}:{args.port}", "python -m services.router")
    admin = grpc.aio.server(
        options=[EXCLUSIVE_PORT], interceptors=secret_interceptors(cluster_token, "cluster token")
    )
    add_servicer(
        admin, router_pb2_grpc.add_RouterAdminServiceServicer_to_server, RouterAdminServicer(registry)
    )
    health_status.add_to(admin)
    add_reflection(admin, [_SERVICES["RouterAdminService"]])
    admin_port = listen(admin, f"{args.admin_host}:{args.admin_port}", "python -m services.router")
    await server.start()
    await admin.start()
    await health_status.set(True)
    for address in args.worker:
        try:
            await registry.register(address)
        except Exception as e:  # it may come up later and register itself
            logger.warning("could not add worker %s: %s", address, e)
    tasks = [asyncio.create_task(registry.monitor())]
    admin_http: tuple[uvicorn.Server, asyncio.Task[None]] | None = None
    if args.admin_http_port is not None:
        from services.router.admin_http import create_admin_app

        config = uvicorn.Config(
            create_admin_app(registry, cluster_token),
            host=args.admin_host,
            port=args.admin_http_port,
            log_level="warning",
        )
        http = _QuietServer(config)
        admin_http = http, asyncio.create_task(http.serve())
        print(
            f"tandem router admin HTTP on http://{args.admin_host}:{args.admin_http_port}/workers",
            flush=True,
        )
    metrics_url, stop_metrics = serve_metrics(metrics.registry, args.host, args.metrics_port)
    if metrics_url:
        print(f"tandem router metrics on {metrics_url}", flush=True)
    print(f"tandem router admin gRPC on {args.admin_host}:{admin_port}", flush=True)
    print(f"tandem router serving on {args.host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stop_if_unloadable(loaded: asyncio.Future[object]) -> None:
        if loaded.exception() is not None:
            stop.set()

    asyncio.wrap_future(tokenizer.loaded).add_done_callback(stop_if_unloadable)
    await stop.wait()
    await health_status.enter_graceful_shutdown()
    if admin_http is not None:  # its own shutdown (cancelling it logs a lifespan traceback)
        admin_http[0].should_exit = True
        await admin_http[1]
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    drain_sessions("the router is shutting down")  # the gateways' calls end once their streams have
    await asyncio.gather(server.stop(grace=5), admin.stop(grace=1))
    stop_metrics()
    tracing.shutdown()
    if tokenizer.loaded.done() and (error := tokenizer.loaded.exception()) is not None:
        raise SystemExit(f"python -m services.router: cannot load the tokenizer of {model.path}: {error}")


def _check_admin_exposure(host: str, cluster_token: Secrets) -> None:
    """The admin listener registers workers (and so makes the router dial them): beyond loopback
    it must be guarded by the cluster token."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not cluster_token.enabled:
        raise SystemExit(
            f"--admin-host {host} is reachable from other machines: set a cluster token"
            f" (${CLUSTER_TOKEN_ENV}, --cluster-token-file or --cluster-token)"
        )


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers (the router's own handle SIGTERM/SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main() -> None:
    event_loop.run(serve())


if __name__ == "__main__":
    main()
