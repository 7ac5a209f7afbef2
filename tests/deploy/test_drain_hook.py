"""The workers' preStop hook (tandem-worker-hooks/drain.py) against a stand-in for the router's
admin HTTP API, whose routes are checked against the real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.router.admin_http import create_admin_app
from tests.deploy.manifests import find

ADDRESS = "10.1.2.3:50062"


class FakeRouterAdmin(BaseHTTPRequestHandler):
    """POST /workers/{address}/drain and GET /workers, answering as services/router/admin_http.py."""

    in_flight: ClassVar[list[int]] = []  # successive answers for this worker's in_flight
    calls: ClassVar[list[str]] = []
    authorization: ClassVar[set[str | None]] = set()  # what the calls sent

    def do_POST(self) -> None:
        self.calls.append(f"POST {self.path}")
        self.authorization.add(self.headers.get("Authorization"))
        self._reply({"workers": []})

    def do_GET(self) -> None:
        self.calls.append(f"GET {self.path}")
        self.authorization.add(self.headers.get("Authorization"))
        in_flight = self.in_flight.pop(0) if len(self.in_flight) > 1 else self.in_flight[0]
        self._reply(
            {"workers": [{"address": ADDRESS, "role": "decode", "state": "draining", "in_flight": in_flight}]}
        )

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def router_admin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRouterAdmin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeRouterAdmin.calls = []
    FakeRouterAdmin.authorization = set()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def hook(tmp_path: Path) -> Path:
    path = tmp_path / "drain.py"
    path.write_text(find("ConfigMap", "tandem-worker-hooks")["data"]["drain.py"])
    return path


def run_hook(tmp_path: Path, admin: str, timeout_s: str = "10") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUTER_ADMIN_URL": admin, "WORKER_ADDRESS": ADDRESS, "DRAIN_TIMEOUT_S": timeout_s}
    env["TANDEM_CLUSTER_TOKEN"] = "cluster-secret"  # the worker's container has it
    return subprocess.run(
        [sys.executable, str(hook(tmp_path))], env=env, capture_output=True, text=True, timeout=30
    )


def test_the_hook_uses_routes_the_router_serves() -> None:
    app = create_admin_app(None)  # type: ignore[arg-type]  # only its routes are read
    routes = {(method, route.path) for route in app.routes for method in getattr(route, "methods", ())}
    assert ("POST", "/workers/{address}/drain") in routes and ("GET", "/workers") in routes


def test_the_hook_drains_then_waits_for_in_flight_requests(tmp_path: Path, router_admin: str) -> None:
    FakeRouterAdmin.in_flight = [2, 1, 0]
    result = run_hook(tmp_path, router_admin)
    assert result.returncode == 0 and not result.stderr
    assert FakeRouterAdmin.calls == [f"POST /workers/{ADDRESS}/drain", *["GET /workers"] * 3]
    assert FakeRouterAdmin.authorization == {"Bearer cluster-secret"}  # the admin API wants it


def test_the_hook_gives_up_at_its_deadline_and_never_fails(tmp_path: Path, router_admin: str) -> None:
    FakeRouterAdmin.in_flight = [5]
    assert run_hook(tmp_path, router_admin, timeout_s="1.5").returncode == 0
    unreachable = run_hook(tmp_path, "http://127.0.0.1:9")  # nothing listens on the discard port
    assert unreachable.returncode == 0 and "drain hook" in unreachable.stderr
