"""services/common/event_loop.py: the services run on uvloop where it is installed, on asyncio's
loop when TANDEM_EVENT_LOOP says so, and a bad setting is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import event_loop

ROOT = Path(__file__).resolve().parents[1]
uvloop = pytest.importorskip("uvloop")  # a runtime dependency on Linux


def test_the_setting() -> None:
    assert event_loop.loop_kind({}) == "uvloop"
    assert event_loop.loop_kind({"TANDEM_EVENT_LOOP": "auto"}) == "uvloop"
    assert event_loop.loop_kind({"TANDEM_EVENT_LOOP": " AsyncIO "}) == "asyncio"
    assert event_loop.loop_kind({"TANDEM_EVENT_LOOP": "uvloop"}) == "uvloop"
    with pytest.raises(ValueError, match="expected uvloop, asyncio or auto"):
        event_loop.loop_kind({"TANDEM_EVENT_LOOP": "trio"})


LOOPS = [("auto", "uvloop.Loop"), ("asyncio", "_UnixSelectorEventLoop")]


@pytest.mark.parametrize(("setting", "loop_type"), LOOPS)
def test_run_uses_the_chosen_loop(setting: str, loop_type: str) -> None:
    code = (
        "import asyncio; from services.common import event_loop\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    return f'{type(loop).__module__}.{type(loop).__name__}'\n"
        "print(event_loop.run(main()))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TANDEM_EVENT_LOOP": setting}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(loop_type)


def test_a_service_refuses_a_bad_setting(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TANDEM_EVENT_LOOP": "trio"}
    out = subprocess.run(
        [sys.executable, "-m", "services.router", "--model", str(tmp_path), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "error: TANDEM_EVENT_LOOP='trio'" in out.stderr and "Traceback" not in out.stderr
