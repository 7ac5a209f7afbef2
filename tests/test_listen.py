"""The services' gRPC servers take their ports alone (services/common/listen.py): grpc's default
SO_REUSEPORT let a second router start on a port in use and share its calls, silently."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.common.listen import EXCLUSIVE_PORT, listen
from services.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_a_grpc_server_does_not_share_a_port_in_use() -> None:
    async def main() -> None:
        holder = grpc.aio.server()  # grpc's defaults, as another process's server would have them
        port = holder.add_insecure_port("127.0.0.1:0")
        await holder.start()
        try:
            shared = grpc.aio.server()  # why the option: by default a second server binds it too
            assert shared.add_insecure_port(f"127.0.0.1:{port}") == port
            ours = grpc.aio.server(options=[EXCLUSIVE_PORT])
            with pytest.raises(SystemExit) as info:
                listen(ours, f"127.0.0.1:{port}", "python -m services.router")
            assert str(info.value) == (
                f"python -m services.router: error: cannot listen on 127.0.0.1:{port}: the port is taken"
                " or the address is not this host's"
            )
        finally:
            await holder.stop(None)

    asyncio.run(main())


def test_a_second_router_on_a_taken_port_exits_with_one_line(tiny_llama: Path) -> None:
    port = free_port()
    router = [sys.executable, "-m", "services.router", "--model", str(tiny_llama), "--port", str(port)]
    first = subprocess.Popen(
        [*router, "--admin-port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None
        while "serving on" not in (line := first.stdout.readline()):
            assert line, "the first router exited"
        second = subprocess.run(
            [*router, "--admin-port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=30)
