"""A worker started with `--node-rank N`, N > 0: this node only hosts tensor-parallel ranks.

Multi-node tensor parallelism runs the same worker command on every node with its own
`--node-rank` (as SGLang does). Node 0 serves: its engine process is rank 0 and holds the
scheduler, and its worker answers gRPC, registers with the router and heartbeats. On every other
node the worker takes no requests: it starts the node's `tp_size / nnodes` ranks
(shared/distributed/launch.py), which join rank 0's group at `--dist-init-addr`, answers only
`grpc.health.v1` on `--host:--port` (SERVING while its ranks run, so one pod template with gRPC
probes fits every node), serves Prometheus /metrics on `--metrics-port` (its ranks still running,
and the process series: so one scrape config fits every node too), and watches its ranks until
they exit:

- rank 0 stopped them (node 0 shut down): exit 0;
- one of them failed (a rank anywhere died, so the group is broken; node 0's engine exits and
  its worker stops serving): the others are killed, exit 1;
- SIGTERM or SIGINT: the ranks are killed (breaking the group), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from services.common.listen import EXCLUSIVE_PORT, listen
from services.common.metrics import new_registry, serve_metrics
from shared.config import EngineConfig
from shared.distributed.launch import start_node_ranks

logger = logging.getLogger(__name__)

_WATCH_S = 0.5  # how often the ranks' processes are looked at


async def host_ranks(config: EngineConfig, host: str, port: int, metrics_port: int | None) -> int:
    """Run this node's ranks until they exit or a signal comes; the process's exit status."""
    followers = start_node_ranks(config)
    ranks = config.node_ranks
    running = len(ranks)  # read by the metrics thread; updated by the watch loop below
    registry = new_registry()
    Gauge(
        "tandem_node_ranks_running",
        "Tensor-parallel rank processes of this node still running (a worker with --node-rank > 0)",
        ["node_rank"],
        registry=registry,
    ).labels(str(config.node_rank)).set_function(lambda: running)
    metrics_url, stop_metrics = serve_metrics(registry, host, metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(options=[EXCLUSIVE_PORT])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = listen(server, f"{host}:{port}", "python -m services.worker")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(
        f"tandem worker: node {config.node_rank} of {config.nnodes} runs tensor-parallel ranks"
        f" {ranks.start}-{ranks.stop - 1} of {config.tp_size}, following node 0 at {config.dist_init_addr};"
        f" health checks on {host}:{port}{f', metrics on {metrics_url}' if metrics_url else ''},"
        " requests go to node 0's worker",
        flush=True,
    )
    exited: dict[int, int] = {}
    while not stop.is_set() and not (exited := followers.exit_codes()):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), _WATCH_S)
    running = len(ranks) - len(exited)
    failed = {rank: code for rank, code in exited.items() if code != 0}
    if stop.is_set():
        logger.info("stopping: killing this node's ranks")
    elif failed:
        logger.error("tensor-parallel ranks failed (rank: exit status) %s: the group is broken", failed)
    else:
        logger.info("node 0 stopped the group")
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    followers.stop(graceful=not (stop.is_set() or failed))
    running = 0
    stop_metrics()
    await server.stop(grace=None)
    return 1 if failed else 0
