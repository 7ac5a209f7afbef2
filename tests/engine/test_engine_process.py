"""The engine in its own process, driven through EngineClient over ZMQ (real processes)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import EngineConfig
from shared.engine_client import EngineClient, remove_orphaned_socket_dirs
from shared.engine_core import RequestOutput
from shared.inputs import Prompt
from tests.engine.hf_reference import hf_greedy
from tests.suite.cluster import running

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def collect(client: EngineClient, rid: str, ids: list[int], params: dict[str, object]) -> list[RequestOutput]:
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    client.add([rid], Prompt(ids, params), outputs.put)
    got: list[RequestOutput] = []
    while True:
        item = outputs.get(timeout=60)
        if isinstance(item, BaseException):
            raise item
        got.append(item)
        if item.finished:
            return got


@pytest.fixture(scope="module")
def client(tiny_llama: Path) -> Iterator[EngineClient]:
    c = EngineClient(EngineConfig.from_options(str(tiny_llama), page_size=4, debug_invariants=True))
    yield c
    c.shutdown()
    assert not c.process.is_alive() and c.process.exitcode == 0  # a clean stop


def test_exit_without_teardown_runs_atexit_and_flushes_then_exits_with_its_code(tmp_path: Path) -> None:
    """What the engine process and the follower ranks leave by (shared/process_exit.py)."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys, pathlib\n"
        "from shared.process_exit import exit_without_teardown\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "sys.stdout.write('unflushed out'); sys.stderr.write('unflushed err')\n"
        "exit_without_teardown(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed out" and proc.stderr == "unflushed err"
    assert marker.read_text() == "yes"


def test_generation_through_the_process_matches_hf(client: EngineClient, tiny_llama: Path) -> None:
    prompt = list(range(20, 45))
    outputs = collect(client, "a", prompt, GREEDY)
    assert len(outputs) > 1  # increments stream back step by step
    assert [t for o in outputs for t in o.new_ids] == hf_greedy(tiny_llama, prompt, 12)
    assert outputs[-1].finish_reason == {"type": "length"}
    assert client.vocab_size > 0 and client.max_context_len > 0


def test_bad_request_is_rejected_and_the_engine_keeps_serving(client: EngineClient) -> None:
    with pytest.raises(ValueError, match="top_p"):
        client.add(["bad"], Prompt([5, 6], {"top_p": 7.0}), lambda _: None)
    with pytest.raises(ValueError, match="context"):
        client.add(["long"], Prompt([5] * (client.max_context_len + 1), {}), lambda _: None)
    assert len(collect(client, "after", [5, 6, 7], GREEDY)) >= 1


def test_abort_through_the_process(client: EngineClient) -> None:
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    client.add(["long-run"], Prompt([5, 6, 7], {"max_new_tokens": 500, "ignore_eos": True}), outputs.put)
    first = outputs.get(timeout=60)
    assert isinstance(first, RequestOutput) and not first.finished
    client.abort("long-run")
    last = first
    while not last.finished:
        item = outputs.get(timeout=60)
        assert isinstance(item, RequestOutput)
        last = item
    assert last.finish_reason == {"type": "abort", "message": "aborted"}
    assert last.completion_tokens < 500


def test_a_model_that_cannot_load_fails_start_up_clearly(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"failed to start.*missing"):
        EngineClient(EngineConfig.from_options(str(tmp_path / "missing")))


def test_a_dead_engine_fails_open_requests_promptly(tiny_llama: Path) -> None:
    c = EngineClient(EngineConfig.from_options(str(tiny_llama)))
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    c.add(["doomed"], Prompt([5, 6, 7], {"max_new_tokens": 100000, "ignore_eos": True}), outputs.put)
    assert c.process.pid is not None
    os.kill(c.process.pid, signal.SIGKILL)
    c.process.join(5)
    start = time.monotonic()
    # Before the receiver notices, a call must not block its caller (an event loop) forever on
    # a socket with no engine behind it: it raises, or is failed with the rest.
    with contextlib.suppress(RuntimeError):
        c.stats()
    c.abort("doomed")
    assert time.monotonic() - start < 1
    while True:
        item = outputs.get(timeout=10)
        if isinstance(item, BaseException):
            break
    assert "died" in str(item) and time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="died"):
        c.add(["later"], Prompt([5], {}), outputs.put)
    c.shutdown()


def test_a_request_id_in_use_is_refused_and_the_first_caller_keeps_its_stream(client: EngineClient) -> None:
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    client.add(["dup"], Prompt([5, 6, 7], {"max_new_tokens": 40, "ignore_eos": True}), outputs.put)
    with pytest.raises(ValueError, match="'dup' is already in use"):
        client.add(["dup"], Prompt([8, 9], {"max_new_tokens": 2}), lambda _: None)
    last = outputs.get(timeout=60)
    while isinstance(last, RequestOutput) and not last.finished:
        last = outputs.get(timeout=60)
    assert isinstance(last, RequestOutput) and last.completion_tokens == 40


def test_stray_kv_messages_are_dropped_and_the_engine_keeps_serving(client: EngineClient) -> None:
    from shared.transfer import KvCommit

    client.commit_kv(b"not a commit record", b"\x00" * 16)  # garbage
    client.commit_kv(KvCommit("nobody", 5, 0).encode(), b"\x00" * 16)  # a unified engine: no receiver
    client.set_kv_target("nobody", [1, 2])  # nor a sender
    assert len(collect(client, "still-serving", [5, 6, 7], GREEDY)) >= 1
    assert client.process.is_alive()


def test_an_answer_to_a_cancelled_call_is_dropped_and_the_client_keeps_going(
    client: EngineClient,
) -> None:
    # An event-loop caller that leaves cancels its future (asyncio.wrap_future does); the
    # engine's answer arrives later and must not stop the receiver thread.
    # A cancel loses the race when the answer is already in (a loaded machine): try until five won.
    cancelled = sum(client.stats().cancel() for _ in range(200))
    assert cancelled >= 5
    outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
    admitted = client.submit(["left"], Prompt([5, 6, 7], GREEDY), outputs.put)
    admitted.cancel()
    assert client.stats().result(timeout=30)["kv_total_tokens"] > 0
    assert len(collect(client, "after-cancel", [5, 6, 7], GREEDY)) >= 1
    client.abort("left")


_BUSY_ENGINE = """
import queue, sys, time
from shared.config import EngineConfig
from shared.engine_client import EngineClient, remove_orphaned_socket_dirs
from shared.inputs import Prompt

c = EngineClient(EngineConfig.from_options(sys.argv[1], page_size=4))
outputs = queue.SimpleQueue()
params = {"max_new_tokens": c.max_context_len - 8, "ignore_eos": True}
for i in range(4):
    c.add([f"long-{i}"], Prompt([5, 6, 7], params), outputs.put)
outputs.get(timeout=60)
print(c.process.pid, flush=True)
time.sleep(600)
"""


def test_an_engine_dies_with_the_process_that_started_it(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while its engine runs requests: the engine goes at once (it used to run
    them to their end first, holding the GPU its restarted worker needs); the sockets' directory
    it could not remove goes when the next engine client starts (they piled up in /tmp)."""
    starter = subprocess.Popen(
        [sys.executable, "-c", _BUSY_ENGINE, str(tiny_llama)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TMPDIR": str(tmp_path)},
    )
    try:
        assert starter.stdout is not None
        engine = int(starter.stdout.readline())
        starter.kill()
        starter.wait(10)
        deadline = time.monotonic() + 2.0
        while running(engine):
            assert time.monotonic() < deadline, "the engine outlived the process that started it"
            time.sleep(0.05)
        (orphan,) = tmp_path.glob("tandem-engine-*")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        client = EngineClient(EngineConfig.from_options(str(tiny_llama)))
        try:
            assert not orphan.exists()
            assert [p.name for p in tmp_path.glob("tandem-engine-*")] == [Path(client._dir).name]
        finally:
            client.shutdown()
        assert not list(tmp_path.glob("tandem-engine-*"))  # a client that stops removes its own
    finally:
        starter.kill()
        starter.wait()


def test_only_socket_directories_of_gone_processes_of_this_namespace_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    namespace = os.readlink("/proc/self/ns/pid")
    owners = {
        "gone": f"{gone.pid} {namespace}",
        "gone-elsewhere": f"{gone.pid} pid:[1]",  # another container's: its ids are not ours to judge
        "alive": f"{os.getpid()} {namespace}",
        "unowned": None,  # being made, or made by an older client
    }
    for name, owner in owners.items():
        path = tmp_path / f"tandem-engine-{name}"
        path.mkdir()
        if owner is not None:
            (path / "owner").write_text(owner)
    removed = remove_orphaned_socket_dirs(str(tmp_path))
    assert removed == [str(tmp_path / "tandem-engine-gone")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tandem-engine-alive",
        "tandem-engine-gone-elsewhere",
        "tandem-engine-unowned",
    ]
