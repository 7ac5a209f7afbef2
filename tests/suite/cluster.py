"""Real services as subprocesses on loopback, for the suite's end-to-end tests.

    with Cluster(model, tmp_path) as c:
        c.start_router("--prefill-policy", "round_robin")   # public c.router, admin c.admin_address
        p = c.start_worker("prefill", "--kv-transport", "nixl")
        d = c.start_worker("decode", "--kv-transport", "nixl")
        responses = c.generate(token_ids=[...], max_new_tokens=8, temperature=0.0)

Every service logs to a file under tmp_path; a failed wait prints the tail of the logs. With
`Cluster(..., cluster_token=T)` router and workers get T (TANDEM_CLUSTER_TOKEN) and the
cluster's own admin and worker calls carry it.
`tandem_up` runs the whole suite as a user does (`tandem up`) and yields its ready-file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.startup import children, engine_pid
from services.common.auth import CLUSTER_TOKEN_ENV, bearer
from services.launcher import free_port
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.protos.tandem.worker.v1 import worker_pb2, worker_pb2_grpc

# Engines in tests use a small KV pool and check their invariants after every step.
ENGINE_FLAGS = ["--max-total-tokens", "4096", "--device", "cpu"]


@contextlib.contextmanager
def tandem_up(
    model: Path | str, tmp: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """`tandem up` (by default a router, a prefill and a decode worker, the gateway; `args` adds
    launcher flags) on free ports; yields the ready-file's endpoints plus "process" (the
    launcher), stopped with SIGTERM on exit."""
    ready = tmp / "ready.json"
    proc = launch_up(model, tmp, free_port(), ("--ready-file", str(ready), *args), env)
    try:
        info = wait_ready(proc, ready)
        info["process"] = proc
        yield info
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def launch_up(
    model: Path | str,
    tmp: Path,
    port: int,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """`tandem up` on `port` with its logs under `tmp` (`args` adds launcher flags), output piped,
    not waited for (`new_session`: in a process group of its own, as a terminal's job)."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "services.cli", "up", "--model", str(model)),
            *("--port", str(port), "--log-dir", str(tmp / "logs"), "--worker-args", " ".join(ENGINE_FLAGS)),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TANDEM_HOME": str(tmp), **(env or {})},
        start_new_session=new_session,
    )


def started_services(
    launcher: subprocess.Popen[Any], modules: tuple[str, ...], timeout: float = 60
) -> dict[str, int]:
    """The pids of a `tandem up`'s services by module ("router", "prefill", "decode", "worker",
    "gateway": one of each) once each runs its module: their flags and environment are then the
    ones the launcher gave them (it starts them all at once, long before they are ready)."""
    deadline = time.monotonic() + timeout
    pids: dict[str, int] = {}
    while len(pids) < len(modules):
        assert launcher.poll() is None, f"tandem up exited (code {launcher.returncode}) with {pids}"
        assert time.monotonic() < deadline, f"tandem up started only {pids}"
        for child in children(launcher.pid):
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                pids |= {name: child for name in modules if f"services.{name}".encode() in argv}
        time.sleep(0.05)
    return pids


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float = 120) -> dict[str, Any]:
    """The ready-file of a `launch_up`, once written; its output in the failure if it exits or
    times out first."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.stdout.read().decode() if proc.stdout else "tandem up failed")
        time.sleep(0.2)
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger where PID 1 does not reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def admin_auth(up: dict[str, Any]) -> dict[str, str]:
    """HTTP headers for the router's admin API of a `tandem_up` (its launch's cluster token)."""
    return {"Authorization": f"Bearer {up['cluster_token']}"}


def token_metadata(up: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a `tandem_up`'s admin port and workers (its launch's cluster token)."""
    return (bearer(up["cluster_token"]),)


@dataclass
class Service:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path
    metadata: tuple[tuple[str, str], ...] = ()  # the cluster token, when the cluster has one

    def load(self) -> worker_pb2.GetLoadResponse:
        with grpc.insecure_channel(self.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            return stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5, metadata=self.metadata)

    def wait_released(self, timeout: float = 5.0) -> None:
        """Nothing running and no KV held beyond the prefix cache (a PD request's prefill leg can
        end a little after its client got the last token: wait, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.load()
            held = load.running_requests + load.kv_used_tokens + load.counters["parked_requests"]
            if held == 0:
                return
            assert time.monotonic() < deadline, f"{self.name} still holds a request: {load}"
            time.sleep(0.05)

    def engine_pid(self) -> int:
        """The worker's engine process (a multiprocessing spawn child)."""
        return engine_pid(self.process.pid, self.name)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        self.process.wait(10)


class Cluster:
    def __init__(self, model: Path, log_dir: Path, cluster_token: str | None = None) -> None:
        self.model = str(model)
        self.log_dir = log_dir
        self.services: list[Service] = []
        self.router = ""  # the public port
        self.admin_address = ""  # the admin port: workers register here
        self.env = {**os.environ, CLUSTER_TOKEN_ENV: cluster_token} if cluster_token else None
        self.metadata = (bearer(cluster_token),) if cluster_token else ()
        self._channel: grpc.Channel | None = None
        self._admin_channel: grpc.Channel | None = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- processes -----------------------------------------------------------------------------

    def _spawn(self, name: str, module: str, args: list[str], port: int) -> Service:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        service = Service(name, f"127.0.0.1:{port}", proc, log, self.metadata)
        self.services.append(service)
        return service

    def start_router(self, *flags: str, admin_port: int | None = None) -> Service:
        port, admin_port = free_port(), admin_port or free_port()
        # On demand: most suites send token ids only, and the load costs every router seconds of
        # CPU (background loading: tests/router/test_tokenizer.py and every `tandem up`).
        args = ["--model", self.model, "--port", str(port), "--admin-port", str(admin_port)]
        args += ["--tokenizer-load", "on-demand", *flags]
        service = self._spawn("router", "services.router", args, port)
        self.router = service.address
        self.admin_address = f"127.0.0.1:{admin_port}"
        self._channel = grpc.insecure_channel(self.router)
        self._admin_channel = grpc.insecure_channel(self.admin_address)
        self.wait(lambda: self._list_workers() is not None, "router")
        return service

    def start_worker(
        self, role: str, *flags: str, register: bool = True, wait: bool = True, port: int | None = None
    ) -> Service:
        """One worker (`start_workers`), on `port` when given (a worker started again in place)."""
        (service,) = self.start_workers([(role, *flags)], register, wait, port)
        return service

    def start_workers(
        self, specs: list[tuple[str, ...]], register: bool = True, wait: bool = True, port: int | None = None
    ) -> list[Service]:
        """Start workers `(role, *flags)` at once (they load in parallel), then wait for each to
        be healthy in the router (`register`: with the router at `admin_address`; `wait`)."""
        assert port is None or len(specs) == 1
        started = []
        for role, *flags in specs:
            at = port or free_port()
            module = "services.worker" if role == "unified" else f"services.{role}"
            args = ["--model", self.model, "--port", str(at), *ENGINE_FLAGS, *flags]
            if register:
                args += ["--router", self.admin_address]
            n = sum(s.name.startswith(role) for s in self.services)
            started.append(self._spawn(f"{role}-{n}", module, args, at))
        for service in started if register and wait else []:
            self.wait(
                lambda s=service: self.worker_state(s.address) == router_pb2.WORKER_STATE_HEALTHY,
                service.name,
            )
        return started

    def wait(self, condition: Any, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [s for s in self.services if s.process.poll() is not None]
            if time.monotonic() > deadline or any(s.name == what for s in dead):
                raise AssertionError(f"{what} not ready\n" + self.logs())
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name} (exit {s.process.poll()}) ---\n"
            + "\n".join(s.log.read_text(errors="replace").splitlines()[-15:])
            for s in self.services
        )

    def close(self) -> None:
        for s in reversed(self.services):
            if s.process.poll() is None:
                s.process.send_signal(signal.SIGTERM)
        for s in reversed(self.services):
            try:
                s.process.wait(15)
            except subprocess.TimeoutExpired:
                s.process.kill()
                s.process.wait()
        for channel in (self._channel, self._admin_channel):
            if channel is not None:
                channel.close()

    # ---- router calls --------------------------------------------------------------------------

    @property
    def stub(self) -> router_pb2_grpc.RouterServiceStub:
        assert self._channel is not None
        return router_pb2_grpc.RouterServiceStub(self._channel)

    @property
    def admin(self) -> router_pb2_grpc.RouterAdminServiceStub:
        """The router's admin port (calls need `metadata=cluster.metadata` when it has a token)."""
        assert self._admin_channel is not None
        return router_pb2_grpc.RouterAdminServiceStub(self._admin_channel)

    def _list_workers(self) -> list[router_pb2.WorkerInfo] | None:
        try:
            request = router_pb2.ListWorkersRequest()
            return list(self.admin.ListWorkers(request, timeout=1, metadata=self.metadata).workers)
        except grpc.RpcError:
            return None

    def worker_state(self, address: str) -> int | None:
        for w in self._list_workers() or []:
            if w.address == address:
                return int(w.state)
        return None

    def request(
        self,
        token_ids: list[int] | None = None,
        text: str = "",
        n: int = 1,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        **params: Any,
    ) -> router_pb2.GenerateRequest:
        return router_pb2.GenerateRequest(
            token_ids=token_ids or [],
            text=text,
            n=n,
            sampling_params=params,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
        )

    def generate(
        self, token_ids: list[int] | None = None, text: str = "", **kwargs: Any
    ) -> list[router_pb2.GenerateResponse]:
        return list(self.stub.Generate(self.request(token_ids, text, **kwargs), timeout=60))


def collect(responses: list[router_pb2.GenerateResponse]) -> dict[int, dict[str, Any]]:
    """Per sample index: token ids, text, logprobs, finish, usage, route."""
    out: dict[int, dict[str, Any]] = {}
    for r in responses:
        o = r.output
        s = out.setdefault(o.index, {"ids": [], "text": "", "logprobs": [], "finish": None, "route": None})
        s["ids"] += list(o.token_ids)
        s["text"] += o.text
        s["logprobs"] += list(o.logprobs)
        s["usage"] = o.usage
        if r.HasField("route"):
            s["route"] = r.route
        if o.HasField("finish"):
            s["finish"] = o.finish
    return out
