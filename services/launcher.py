"""`tandem up`: the whole suite on this machine as processes: router, workers, gateway.

    router   python -m services.router  --model M --served-model-name N --port R --admin-port G
                 --admin-http-port A --metrics-port X
    workers  python -m services.{prefill,decode,worker} --model M --served-model-name N
                 --router 127.0.0.1:G --metrics-port X
    gateway  python -m services.gateway --router 127.0.0.1:R --tokenizer M --port 8000
                 (--gateways N > 1: N of them, each with --reuse-port --metrics-port X)

`--model` is resolved once, before any child starts (services/common/model_dir.py): M is a local
directory (a hub id's snapshot in the Hugging Face cache, downloaded if need be) and N the model
id clients use (the hub id, or the directory's name).

Secrets travel in the environment, never in argv (argv shows in `ps`): every launch makes a
fresh random cluster token (TANDEM_CLUSTER_TOKEN, router and workers only; it is in the
ready-file for tools and tests), and `--api-key` (or a TANDEM_API_KEY already set) becomes the
gateway's and the router's public API key (TANDEM_API_KEY). Without one, clients need no key.

Started at once (a worker waits for the router to register; a gateway loads its tokenizer and then
waits for the router to list the model), then waited for in that order (router health, workers
registered, each gateway's "listening" line and /health), then the endpoints are printed (and
written as JSON to --ready-file, by default ready.json in the log directory, with a `metrics` map:
process name -> its Prometheus URL). Each process gets its own OTEL_SERVICE_NAME (tandem-router,
tandem-prefill, ...); traces are exported when the environment sets OTEL_EXPORTER_OTLP_ENDPOINT.
Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL after a grace period). A process that
exits is reported with the tail of its run's log and started again with the same command line
and log file (a worker whose engine died exits 1 for this), after 1 s, doubling up to 30 s while
it keeps exiting within a minute of its start; the ready-file's pids (of live processes only)
and metrics URLs follow. The router and the gateways keep their ports; a worker binds a new one
and registers it. The router routes around a worker while it is down, and workers register again
with a restarted router. With --no-restart the rest serve on while a router, a gateway and a
unified worker or a prefill/decode pair live, else all stop and the launcher exits 1. The ready-
file is removed on exit. Children die with the launcher (PR_SET_PDEATHSIG, which each child sets
itself: services/common/parent.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common.argtypes import non_negative_int, port_number, positive_float, positive_int
from services.common.auth import API_KEY_ENV, CLUSTER_TOKEN_ENV, bearer
from services.common.model_dir import Model, ModelError, resolve_model
from services.common.parent import PARENT_ENV
from services.mps import (
    CONTROL,
    SM_PERCENT_ENV,
    MpsError,
    mps_daemon,
    parse_sm_percent,
    shared_gpu_args,
    shares_a_gpu,
)
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.router.policies import POLICIES
from shared.config import KvTransport


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # exits in a row, each within RESTART_RESET_S of its start
    run_offset: int = 0  # where this run's output starts in the log (earlier runs' come before)

    @classmethod
    def launch(cls, name: str, cmd: list[str], env: dict[str, str], log: Path) -> Child:
        log.write_bytes(b"")
        return cls(name, _popen(cmd, env, log), log, cmd, env)

    def restart(self) -> None:
        """Start the process again, with the same command line and environment, its output
        appended to the same log."""
        with open(self.log, "ab") as out:
            out.write(f"\n--- tandem up: {self.name} started again ---\n".encode())
            self.run_offset = out.tell()
        self.process = _popen(self.cmd, self.env, self.log)
        self.started = time.monotonic()

    def run_output(self) -> bytes:
        """What this run wrote to the log (not an earlier run's)."""
        with open(self.log, "rb") as f:
            f.seek(self.run_offset)
            return f.read()


def _popen(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


# A service that exits is started again after RESTART_DELAYS_S[k] (k: its quick exits in a row,
# the last delay repeating), the count reset once a run outlasts RESTART_RESET_S: a service
# that keeps failing at start is retried every half minute instead of in a tight loop.
RESTART_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
RESTART_RESET_S = 60.0


def restart_delay(child: Child, now: float) -> float:
    """The wait before `child`, which exited at `now`, is started again; counts its exit."""
    child.quick_exits = child.quick_exits + 1 if now - child.started < RESTART_RESET_S else 1
    return RESTART_DELAYS_S[min(child.quick_exits, len(RESTART_DELAYS_S)) - 1]


def free_port() -> int:
    """A TCP port free on this host now, for a process to bind a little later. Picked below the
    kernel's ephemeral range where the host has one (Linux's ip_local_port_range), because a port
    from that range can be taken in the meantime by any port-0 bind or any connection's source
    port; a port from under it only by another process that chose it the same way."""
    low = _ephemeral_low()
    if low is not None and low >= 4096:
        rng = random.SystemRandom()
        for _ in range(64):
            port = rng.randrange(low // 2, low)
            if _bind_error("0.0.0.0", port) is None:
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int | None:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bind_error(host: str, port: int, reuse_addr: bool = False) -> str | None:
    """Why a socket of ours could not bind host:port alone now (None: it can). A plain bind,
    without SO_REUSEPORT, also fails on a port another process shares out that way; with
    `reuse_addr`, as servers bind (uvicorn), a port in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


_METRICS_LINE = re.compile(rb"metrics on (http://\S+/metrics)")
_GATEWAY_LISTENS = b"tandem gateway listening on "  # services/gateway/__main__.py


def _metrics_url(child: Child) -> str:
    """The /metrics URL a router or worker printed: each binds a free port itself, because a port
    chosen here could be taken (by any connection's source port) before the child, after loading
    its model, binds it. After a restart, the new run's, once it has printed it."""
    match = _METRICS_LINE.search(child.run_output())
    return match.group(1).decode() if match else ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a local HF model directory or a hub id ORG/NAME[@REVISION], from the Hugging Face cache or"
        " downloaded (default: a tiny local model, built once)",
    )
    p.add_argument(
        "--served-model-name",
        help="the model id clients send (default: the hub id, or the model directory's name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="where the gateway listens (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="gateway HTTP port (default 8000)")
    p.add_argument(
        "--gateways",
        type=positive_int,
        default=1,
        help="gateway processes sharing --port (SO_REUSEPORT), each its own event loop: under many"
        " streams one gateway's loop delays every request's start and end (docs/benchmarks.md, 'Where"
        " TTFT goes'). Each keeps its own /v1/responses store: a previous_response_id can miss on"
        " another process (default 1)",
    )
    p.add_argument("--prefill", type=non_negative_int, default=1, help="prefill workers (default 1)")
    p.add_argument("--decode", type=non_negative_int, default=1, help="decode workers (default 1)")
    p.add_argument(
        "--unified", type=non_negative_int, default=0, help="unified workers (default 0; 1 when no PD pair)"
    )
    p.add_argument("--router-port", type=port_number, help="router public gRPC port (default: a free port)")
    p.add_argument("--admin-port", type=port_number, help="router admin gRPC port (default: a free port)")
    p.add_argument(
        "--admin-http-port", type=port_number, help="router admin HTTP port (default: a free port)"
    )
    p.add_argument(
        "--api-key",
        help=f"clients of the gateway and the router must send this key (default: ${API_KEY_ENV}, or none)",
    )
    policies = sorted(POLICIES)
    p.add_argument(
        "--prefill-policy",
        default="cache_aware",
        choices=policies,
        help="how the router picks a prefill worker (default cache_aware: where the prompt's prefix"
        " probably sits in KV cache, unless the load is lopsided)",
    )
    p.add_argument(
        "--decode-policy", default="least_load", choices=policies, help="how it picks a decode worker"
    )
    p.add_argument(
        "--kv-transport",
        choices=typing.get_args(KvTransport),
        help="KV transfer between prefill and decode workers (default: the workers' own, auto)",
    )
    p.add_argument(
        "--log-dir", help="one log file per service (default: a fresh directory under $TANDEM_HOME)"
    )
    p.add_argument(
        "--ready-file",
        help="write the endpoints (with the cluster token the router's admin API wants) here as JSON once"
        " everything is up, readable by this user only, removed on exit (default: ready.json in the"
        " log directory)",
    )
    p.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=300.0,
        help="seconds each stage (the router, the workers' model loads, the gateways) may take to come up"
        " (default 300)",
    )
    p.add_argument(
        "--router-args",
        default="",
        help='extra router flags, e.g. "--stall-timeout 20 --max-in-flight 1024"',
    )
    p.add_argument(
        "--worker-args", default="", help='extra worker flags, e.g. "--max-total-tokens 8192 --device cpu"'
    )
    p.add_argument(
        "--prefill-args",
        default="",
        help='the prefill workers\' own flags, after --worker-args, e.g. "--forget-decode-after 120"',
    )
    p.add_argument(
        "--decode-args",
        default="",
        help='the decode workers\' own flags, after --worker-args, e.g. "--kv-transfer-timeout 60"',
    )
    p.add_argument(
        "--gateway-args",
        default="",
        help='extra gateway flags, e.g. "--reasoning-parser qwen3 --tool-call-parser qwen3_coder"',
    )
    p.add_argument(
        "--mps",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="run the workers under NVIDIA MPS, so that prefill and decode workers sharing one GPU run side"
        " by side instead of time-slicing it (auto, the default: when they share a GPU and the NVIDIA"
        " utilities are installed; --mps alone: on)",
    )
    p.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        help="leave a service that exits down (default: start it again, after 1 s, doubling to 30 s"
        " while it keeps exiting within a minute); the rest serve on while they can, else all stop",
    )
    p.add_argument(
        "--mps-sm-percent",
        default="",
        metavar="ROLE=PERCENT[,...]",
        help="with --mps, the share of the GPU's SMs each role's workers may use, e.g. decode=40"
        " (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; roles: prefill, decode, worker; default: the whole GPU)",
    )


# PD workers whose KV goes over the gRPC transport: payload-sized buffers (a prompt's KV) come
# from the heap and stay there when freed, instead of being mapped afresh and faulted in for
# every prompt; 0.43 -> 1.49 GB/s for 1k tokens of Llama-3-8B on the CPU machines
# (docs/kv_transfer.md, "gRPC"), for up to 4 GiB of freed heap kept mapped per process. A
# GLIBC_TUNABLES of the user's own wins.
GRPC_KV_MALLOC = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def kv_transport_of(kv_transport: str | None, worker_flags: list[str]) -> str:
    """The KV transport PD workers will use: `--kv-transport` (up's, else the workers' own
    flag), auto resolving as the engine does (NIXL where it is installed, else gRPC)."""
    own = None  # the workers' flag; the last one counts, as in their parser
    for i, flag in enumerate(worker_flags):
        if flag == "--kv-transport" and i + 1 < len(worker_flags):
            own = worker_flags[i + 1]
        elif flag.startswith("--kv-transport="):
            own = flag.partition("=")[2]
    chosen = kv_transport or own  # up's comes after the worker flags on their command line
    if chosen in (None, "auto"):
        from shared.transfer import nixl_available

        return "nixl" if nixl_available() else "grpc"
    return chosen


def up(args: argparse.Namespace) -> int:
    from services.cli import default_model_path, tandem_home

    if (args.prefill > 0) != (args.decode > 0):
        raise SystemExit(
            "tandem up: error: PD needs both --prefill and --decode workers (or neither, for unified workers)"
        )
    unified = args.unified or (0 if args.prefill else 1)
    if (args.prefill_args or args.decode_args) and not args.prefill:
        raise SystemExit("tandem up: error: --prefill-args and --decode-args need --prefill and --decode")
    try:
        sm_percent = parse_sm_percent(args.mps_sm_percent)
    except ValueError as e:
        raise SystemExit(f"tandem up: error: {e}") from None
    extra = shlex.split(args.worker_args)
    own_args = {"prefill": shlex.split(args.prefill_args), "decode": shlex.split(args.decode_args)}
    shared_gpu = shares_a_gpu(args.prefill, args.decode, extra)
    mps_wanted = args.mps == "on" or (args.mps == "auto" and shared_gpu and shutil.which(CONTROL) is not None)
    if sm_percent and not mps_wanted:
        raise SystemExit("tandem up: error: --mps-sm-percent needs --mps")
    try:  # before any child starts: one clear line, not a child's traceback
        resolved = resolve_model(args.model) if args.model else None
    except ModelError as e:
        raise SystemExit(f"tandem up: error: {e}") from None
    if resolved is not None and (problem := _architecture_problem(resolved.path)):
        raise SystemExit(f"tandem up: error: {resolved.path}: {problem}")
    # Also before: a held port would otherwise show only once every worker had started (and
    # several gateways' SO_REUSEPORT would share it with whatever holds it, same user).
    if problem := _bind_error(args.host, args.port, reuse_addr=True):
        where = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
        raise SystemExit(f"tandem up: error: the gateway's port {where} is taken ({problem})")
    if resolved is None:
        path = default_model_path()
        resolved = Model(path, path.name)
    if args.served_model_name:
        resolved = Model(resolved.path, args.served_model_name)
    model, model_flags = str(resolved.path), ["--served-model-name", resolved.name]
    try:
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="logs-", dir=tandem_home()))
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"tandem up: error: cannot make the log directory: {e}") from None
    ready_file = Path(args.ready_file) if args.ready_file else log_dir / "ready.json"
    router_port = args.router_port or free_port()
    admin_grpc_port = args.admin_port or free_port()
    admin_port = args.admin_http_port or free_port()
    router = f"127.0.0.1:{router_port}"
    router_admin = f"127.0.0.1:{admin_grpc_port}"
    cluster_token = secrets.token_urlsafe(32)
    cluster_env = {CLUSTER_TOKEN_ENV: cluster_token}
    api_env = {API_KEY_ENV: args.api_key} if args.api_key else {}
    children: list[Child] = []
    py = [sys.executable, "-m"]
    stopping = False

    def stop(signum: int = 0, frame: Any = None) -> None:
        nonlocal stopping
        stopping = True

    def wait(ready: Any, what: str) -> None:
        """Until `ready()`, the start-up's bound; stops on SIGINT or SIGTERM (`_wait`)."""
        _wait(ready, children, args.startup_timeout, what, lambda: stopping)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    child_env: dict[str, str] = {}

    def start(
        name: str,
        cmd: list[str],
        service: str,
        secret_env: dict[str, str],
        own_env: dict[str, str] | None = None,
    ) -> Child:
        log = log_dir / f"{name}.log"
        # The child dies with us (services/common/parent.py), and no preexec_fn: see there.
        env = {**os.environ, **child_env, **secret_env, **(own_env or {})}
        env |= {"OTEL_SERVICE_NAME": service, PARENT_ENV: str(os.getpid())}
        if CLUSTER_TOKEN_ENV not in secret_env:
            env.pop(CLUSTER_TOKEN_ENV, None)
        child = Child.launch(name, cmd, env, log)
        children.append(child)
        return child

    mps = contextlib.ExitStack()
    try:
        shown = model if resolved.name == resolved.path.name else f"{resolved.name} ({model})"
        print(f"model: {shown}\nlogs:  {log_dir}", flush=True)
        if mps_wanted:
            try:
                child_env.update(mps.enter_context(mps_daemon(log_dir / "mps")))
                print(f"NVIDIA MPS: {child_env['CUDA_MPS_PIPE_DIRECTORY']}", flush=True)
            except MpsError as e:
                if args.mps == "on":
                    raise
                print(f"NVIDIA MPS did not start ({e}); prefill and decode time-slice the GPU", flush=True)
        shared = {}  # a role's own flags win over these as --worker-args do
        if shared_gpu:
            shared = {role: shared_gpu_args(role, extra + flags) for role, flags in own_args.items()}
        for role, flags in shared.items():
            if flags:
                print(f"{role} workers share the GPU: {shlex.join(flags)}", flush=True)
        start(
            "router",
            [
                *py,
                "services.router",
                "--model",
                model,
                *model_flags,
                "--port",
                str(router_port),
                "--admin-port",
                str(admin_grpc_port),
                "--admin-http-port",
                str(admin_port),
                "--prefill-policy",
                args.prefill_policy,
                "--decode-policy",
                args.decode_policy,
                *("--metrics-port", "0"),  # a port of its own choosing: see _metrics_url
                *shlex.split(args.router_args),
            ],
            "tandem-router",
            cluster_env | api_env,
        )
        roles = [("prefill", args.prefill), ("decode", args.decode), ("worker", unified)]
        prefill_flags = extra + own_args["prefill"]
        grpc_kv = args.prefill > 0 and kv_transport_of(args.kv_transport, prefill_flags) == "grpc"
        malloc = {"GLIBC_TUNABLES": GRPC_KV_MALLOC} if grpc_kv and "GLIBC_TUNABLES" not in os.environ else {}
        for module, count in roles:
            for i in range(count):
                cmd = [*py, f"services.{module}", "--model", model, *model_flags, "--router", router_admin]
                cmd += ["--metrics-port", "0", *extra, *shared.get(module, []), *own_args.get(module, [])]
                if module != "worker" and args.kv_transport:
                    cmd += ["--kv-transport", args.kv_transport]
                own = {SM_PERCENT_ENV: str(sm_percent[module])} if module in sm_percent else {}
                if module != "worker":
                    own |= malloc
                start(f"{module}-{i}", cmd, f"tandem-{module}", cluster_env, own)
        gateway_url = f"http://{args.host}:{args.port}"
        shared_port = ["--reuse-port", "--metrics-port", "0"] if args.gateways > 1 else []
        gateways = [
            start(
                f"gateway-{i}" if args.gateways > 1 else "gateway",
                [
                    *py,
                    "services.gateway",
                    "--host",
                    args.host,
                    "--port",
                    str(args.port),
                    *shared_port,
                    "--router",
                    router,
                    "--tokenizer",
                    model,
                    # It waits for the router to list the model: through all three stages.
                    *("--startup-timeout", str(3 * args.startup_timeout)),
                    *shlex.split(args.gateway_args),
                ],
                "tandem-gateway",
                api_env,
            )
            for i in range(args.gateways)
        ]

        # All started at once, waited for in order: the workers register with the router once it
        # answers, the gateways load their tokenizers meanwhile and listen once it lists the model.
        workers_up = functools.partial(_router_workers, router_admin, cluster_token)
        wait(lambda: workers_up() is not None, "the router")
        expected = args.prefill + args.decode + unified
        wait(lambda: (workers_up() or 0) >= expected, "the workers")

        # Each gateway says when it listens: a /health answer alone could come from another
        # process on the port (another suite's gateway, bound first: ours then fails to bind).
        def gateways_listen() -> bool:
            listening = all(_GATEWAY_LISTENS in g.run_output() for g in gateways)
            return listening and _http_ok(f"{gateway_url}/health")

        wait(gateways_listen, "the gateway")
        services = children[: -args.gateways] + (gateways if args.gateways > 1 else [])
        wait(lambda: all(_metrics_url(c) for c in services), "the metrics endpoints")
        metrics = {c.name: _metrics_url(c) for c in services}
        if args.gateways == 1:
            metrics["gateway"] = f"{gateway_url}/metrics"
        pids = {c.name: c.process.pid for c in children}  # kept current across restarts
        endpoints = {
            "openai": f"{gateway_url}/v1",
            "router_grpc": router,
            "router_admin_grpc": router_admin,
            "router_admin": f"http://127.0.0.1:{admin_port}/workers",
            "cluster_token": cluster_token,
            "model": resolved.name,
            "logs": str(log_dir),
            "pids": pids,
            "metrics": metrics,
        }
        print(
            f"\nTandem is up ({args.prefill} prefill + {args.decode} decode + {unified} unified workers"
            + (f", {args.gateways} gateways" if args.gateways > 1 else "")
            + ")\n"
            f"  OpenAI API     {endpoints['openai']}\n"
            f"  router gRPC    {router}  (proto/tandem/router/v1/router.proto)\n"
            f"  router admin   {endpoints['router_admin']}  (gRPC {router_admin};"
            f" both want 'Authorization: Bearer <cluster_token>', in {ready_file})\n"
            f"  model id       {endpoints['model']}\n"
            + "".join(f"  metrics        {url}  ({name})\n" for name, url in metrics.items())
            + "Ctrl-C stops everything.",
            flush=True,
        )
        _write_private(ready_file, json.dumps(endpoints))
        restarts: list[tuple[float, Child]] = []  # (when, child): exited, to be started again
        awaited: set[str] = set()  # restarted services whose new metrics URL is not read yet
        while not stopping:
            now, changed = time.monotonic(), False
            for dead in [c for c in children if c.process.poll() is not None]:
                if stopping:  # Ctrl-C reaches the children too: theirs are no deaths to report
                    break
                _report_death(dead)
                children.remove(dead)
                del pids[dead.name]  # the ready-file lists live processes only
                changed = True
                if args.restart:
                    delay = restart_delay(dead, now)
                    print(f"tandem up: starting {dead.name} again in {delay:g} s", file=sys.stderr)
                    restarts.append((now + delay, dead))
                    continue
                if not _still_serves([c.name for c in children]):
                    print("tandem up: no way left to serve; stopping everything", file=sys.stderr)
                    return 1
                print(f"tandem up: serving on without {dead.name}", file=sys.stderr, flush=True)
            for due in [r for r in restarts if r[0] <= now]:
                restarts.remove(due)
                child = due[1]
                if any(child is c for c in services):  # it prints a new metrics URL once it serves
                    awaited.add(child.name)
                child.restart()
                children.append(child)
                pids[child.name] = child.process.pid
                changed = True
                print(f"tandem up: {child.name} started again (pid {child.process.pid})", flush=True)
            for child in [c for c in children if c.name in awaited]:
                if url := _metrics_url(child):
                    metrics[child.name] = url  # endpoints["metrics"] is this dict
                    awaited.discard(child.name)
                    changed = True
            if changed:
                _write_private(ready_file, json.dumps(endpoints))
            time.sleep(0.2)
        print("\ntandem up: stopping every service", flush=True)
        return 0
    except _Stopped:
        return 0
    except (_StartupFailed, MpsError) as e:
        print(f"tandem up failed: {e}", file=sys.stderr)
        return 1
    finally:
        _stop_all(children)
        mps.close()
        if stopping:
            print("tandem up: stopped", flush=True)
        # Its pids and addresses are gone: a tool watching it must not wait on them.
        with contextlib.suppress(FileNotFoundError):
            ready_file.unlink()


def _architecture_problem(model: Path) -> str | None:
    """The workers' refusal of the checkpoint's architecture, read here before anything starts
    (they would say it after the router had started, at the end of a traceback); None when the
    architecture is served or config.json cannot be read (the workers then say what is wrong)."""
    from shared.models.registry import architecture_problem

    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    first = architectures[0] if isinstance(architectures, list) and architectures else ""
    return architecture_problem(first) if isinstance(first, str) else None


def _still_serves(names: list[str]) -> bool:
    """Whether the suite's live processes (by name) can still serve: the router, a gateway, and
    a unified worker or a prefill and a decode worker. A worker that dies leaves the others
    serving (the router routes around it), as the failure tests of docs/reliability.md show."""

    def has(prefix: str) -> bool:
        return any(n == prefix or n.startswith(f"{prefix}-") for n in names)

    return has("router") and has("gateway") and (has("worker") or (has("prefill") and has("decode")))


def _write_private(path: Path, text: str) -> None:
    """Write `text` readable by this user only (it holds the cluster token), all at once: a
    reader waiting for the file never sees it half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class _StartupFailed(Exception):
    pass


class _Stopped(Exception):
    """SIGINT or SIGTERM while the suite was starting."""


def _wait(ready: Any, children: list[Child], timeout: float, what: str, stopped: Any) -> None:
    """Until `ready()`; raises `_Stopped` once `stopped()` (checked first: a Ctrl-C in a terminal
    reaches the children too, whose exits are then no failure to report), `_StartupFailed` when
    a child exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if stopped():
            raise _Stopped
        for child in children:
            if child.process.poll() is not None:
                _report_death(child)
                raise _StartupFailed(f"{child.name} exited during start-up")
        if time.monotonic() > deadline:
            raise _StartupFailed(f"{what} did not come up within {timeout:.0f}s")
        time.sleep(0.2)


def _router_workers(admin: str, cluster_token: str) -> int | None:
    """Healthy workers the router knows (asked on its admin port), or None if it does not answer."""
    try:
        with grpc.insecure_channel(admin) as channel:
            reply = router_pb2_grpc.RouterAdminServiceStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=1, metadata=[bearer(cluster_token)]
            )
    except grpc.RpcError:
        return None
    return sum(w.state == router_pb2.WORKER_STATE_HEALTHY for w in reply.workers)


def _http_ok(url: str) -> bool:
    """Whether `url` answers 200. Anything else, a server that is not HTTP on that port
    included (another process's gRPC server, say), is not yet: `_wait` then finds the child
    that exited, or times out, and says which."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, http.client.HTTPException):
        return False


def _report_death(child: Child) -> None:
    """Say that `child` exited, with the last lines of its run's output (not an earlier run's:
    a service failing at every start would repeat them in every report)."""
    tail = child.run_output().decode(errors="replace").splitlines()[-20:]
    print(
        f"\n{child.name} exited with code {child.process.returncode}; last lines of {child.log}:",
        file=sys.stderr,
    )
    print("\n".join(f"  {line}" for line in tail), file=sys.stderr)


def _stop_all(children: list[Child], grace: float = 10.0) -> None:
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in reversed(children):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(max(0.0, deadline - time.monotonic()))
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
