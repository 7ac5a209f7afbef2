"""KV pages as bytes (`PageLayout`) and NIXL writes between two processes (`NixlAgent`).

The round trips use random data in pools of mixed buffer shapes and dtypes; the NIXL test runs
the receiving agent in a second process that only progresses when it polls, as an engine does
with NIXL's progress thread off."""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.transfer import nixl_available
from shared.transfer.pages import PageLayout, page_runs

PAGE = 4
NUM_PAGES = 40
# K/V-like buffers, an MLA-like one and one of another dtype: page_bytes differ per buffer
SHAPES = [
    ((8, 16), torch.bfloat16),
    ((8, 16), torch.bfloat16),
    ((1, 24), torch.float32),
    ((3,), torch.float16),
]


def make_layout(fill: bool, seed: int = 0) -> PageLayout:
    gen = torch.Generator().manual_seed(seed)
    buffers = []
    for shape, dtype in SHAPES:
        buf = torch.zeros(NUM_PAGES * PAGE, *shape, dtype=dtype)
        if fill:
            buf.copy_(torch.randn(buf.shape, generator=gen))
        buffers.append(buf)
    return PageLayout(buffers, PAGE)


def page(layout: PageLayout, buffer: int, p: int) -> torch.Tensor:
    return layout.buffers[buffer][p * PAGE : (p + 1) * PAGE]


ORDERS = {
    "contiguous": (list(range(3, 13)), list(range(20, 30))),
    "reversed": (list(range(12, 2, -1)), list(range(1, 11))),
    "shuffled": (
        random.Random(1).sample(range(1, NUM_PAGES), 15),
        random.Random(2).sample(range(1, NUM_PAGES), 15),
    ),
    "runs": ([1, 2, 3, 9, 10, 30, 5, 6, 7, 8], [11, 12, 13, 14, 15, 2, 3, 36, 37, 38]),
}


@pytest.mark.parametrize("order", ORDERS)
def test_pages_round_trip_between_pools(order: str) -> None:
    src, dst = ORDERS[order]
    a, b = make_layout(fill=True), make_layout(fill=False)
    data = a.read_pages(src)
    assert len(data) == a.nbytes(len(src))
    b.write_pages(dst, data)
    for i in range(len(SHAPES)):
        for s, d in zip(src, dst):
            assert torch.equal(page(a, i, s), page(b, i, d))
    untouched = sorted(set(range(NUM_PAGES)) - set(dst))
    for i in range(len(SHAPES)):
        assert all(not page(b, i, p).any() for p in untouched)
    assert b.read_pages(dst) == data


def test_serialized_form_is_buffer_major_in_page_order() -> None:
    layout = make_layout(fill=True)
    pages = [7, 2, 3]
    expected = b"".join(
        page(layout, i, p).contiguous().view(torch.uint8).numpy().tobytes() for i in range(4) for p in pages
    )
    assert layout.read_pages(pages) == expected


def test_write_pages_takes_any_buffer_and_checks_its_size() -> None:
    a, b = make_layout(fill=True), make_layout(fill=False)
    data = a.read_pages([5, 6])
    b.write_pages([8, 9], memoryview(data))
    b.write_pages([10, 11], bytearray(data))
    assert b.read_pages([8, 9]) == b.read_pages([10, 11]) == data
    with pytest.raises(ValueError, match="expected"):
        b.write_pages([8], data)
    b.write_pages([], b"")  # nothing to do


def test_page_runs_coalesce_where_both_lists_advance() -> None:
    runs = page_runs([1, 2, 3, 7, 8, 9], [4, 5, 9, 10, 11, 12])
    assert runs.tolist() == [[1, 4, 2], [3, 9, 1], [7, 10, 3]]
    assert page_runs([5, 6, 7]).tolist() == [[5, 5, 3]]
    assert page_runs([]).shape == (0, 3)


# ---- NIXL -------------------------------------------------------------------------------------

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")


def _receiver(conn: Any) -> None:
    """Process B: an engine-like receiver that progresses NIXL only when it polls."""
    torch.set_num_threads(1)
    from shared.transfer.nixl import NixlAgent

    layout = make_layout(fill=False)
    agent = NixlAgent(layout, "decode")
    conn.send(agent.metadata())
    while True:
        cmd, *args = conn.recv()
        if cmd == "stop":
            return
        # Poll every 2 ms until the notif, as a decode engine holding a reservation does: the
        # writer's transfer may wait on our progress as well as the notification.
        notifs: list[bytes] = []
        conn.send("polling")
        deadline = time.monotonic() + 30
        while args[0] not in notifs and time.monotonic() < deadline:
            notifs += agent.take_notifs()
            time.sleep(0.002)
        conn.send((notifs, layout.read_pages(args[1])))


@needs_nixl
def test_nixl_write_between_processes_completes_when_polled() -> None:
    from shared.transfer.nixl import NixlAgent

    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    try:
        layout = make_layout(fill=True)
        agent = NixlAgent(layout, "prefill")  # no progress thread: state() progresses the write
        peer = agent.add_peer(conn.recv())
        for i, (src, dst) in enumerate([ORDERS["runs"], ORDERS["shuffled"]]):
            notif = f"commit-{i}".encode()
            conn.send(("poll", notif, dst))
            assert conn.recv() == "polling"
            handle = agent.write(peer, src, dst, notif)
            deadline = time.monotonic() + 30
            while agent.state(handle) == "PROC":
                assert time.monotonic() < deadline, "the write did not complete"
                time.sleep(0.002)  # the engine's poll interval while transfers are in flight
            assert agent.state(handle) == "DONE"
            agent.release(handle)
            notifs, data = conn.recv()
            assert notifs == [notif]
            assert data == layout.read_pages(src)
        conn.send(("stop",))
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


@needs_nixl
def test_a_peer_that_died_fails_its_writes_without_raising_nixl_errors() -> None:
    """The decode engine's process killed (a decode worker gone): a write in flight to it reads
    "ERR" and a new one raises RuntimeError, the KvAgent contract the hand-off handles. NIXL's own
    nixlRemoteDisconnectError escaped both, and killed the prefill engine (a QA pass: 2 of 6
    decode kills under load)."""
    from shared.transfer.nixl import NixlAgent

    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,), daemon=True)
    proc.start()
    try:
        agent = NixlAgent(make_layout(fill=True), "prefill")
        peer = agent.add_peer(conn.recv())
        src, dst = ORDERS["runs"]
        in_flight = agent.write(peer, src, dst, b"commit")  # the receiver is not polling
        proc.kill()
        proc.join(10)
        deadline = time.monotonic() + 30
        while (state := agent.state(in_flight)) == "PROC":
            assert time.monotonic() < deadline, "the write to a dead peer never ended"
            time.sleep(0.01)
        assert state == "ERR"
        agent.release(in_flight)
        with pytest.raises(RuntimeError, match=f"NIXL could not post a write to {peer}"):
            agent.write(peer, src, dst, b"commit")
    finally:
        if proc.is_alive():
            proc.kill()


@needs_nixl
def test_nixl_descriptors_are_one_per_run_and_buffer() -> None:
    from shared.transfer.nixl import NixlAgent

    a, b = NixlAgent(make_layout(fill=True), "prefill"), NixlAgent(make_layout(fill=False), "decode")
    peer = a.add_peer(b.metadata())
    src, dst = ORDERS["runs"]
    local, remote = a.descriptors(peer, src, dst)
    runs = page_runs(src, dst)
    assert local.shape == remote.shape == (len(SHAPES) * len(runs), 3)
    expected_local, expected_remote = [], []
    for base, rbase, page_bytes in zip(a.addresses, b.addresses, a.layout.page_bytes):
        for s, d, n in runs.tolist():
            expected_local.append([base + s * page_bytes, n * page_bytes, 0])
            expected_remote.append([rbase + d * page_bytes, n * page_bytes, 0])
    np.testing.assert_array_equal(local, expected_local)
    np.testing.assert_array_equal(remote, expected_remote)


@needs_nixl
def test_nixl_peers_must_run_the_same_tp_size() -> None:
    """The metadata says the tp_size (omitted at 1: a tp_size 1 engine's metadata is what it
    was before tensor parallelism); an agent refuses a peer of another tp_size, by name."""
    from shared.errors import InvalidRequest
    from shared.transfer.nixl import NixlAgent

    one, two = (
        NixlAgent(make_layout(fill=False), "prefill"),
        NixlAgent(make_layout(fill=False), "decode", tp_size=2),
    )
    assert b"tp_size" not in one.metadata() and b"tp_size" in two.metadata()
    with pytest.raises(
        InvalidRequest, match=r"tensor-parallel size mismatch: .* tp_size=2, this engine tp_size=1"
    ):
        one.add_peer(two.metadata())
    with pytest.raises(InvalidRequest, match=r"runs tp_size=1, this engine tp_size=2"):
        two.add_peer(one.metadata())
    assert not one.has_peer(two.name) and not two.has_peer(one.name)


_AGENT_WITH_UCX_TLS = """
import torch
from shared.transfer.pages import PageLayout
from shared.transfer.nixl import NixlAgent
NixlAgent(PageLayout([torch.zeros(64, 4)], 16), "decode", ucx={"TLS": "cma,posix,self"})
"""


@needs_nixl
def test_ucx_settings_reach_ucx_and_the_environment_wins() -> None:
    """`ucx=` goes to UCX (a transport list UCX cannot start with fails the agent), unless the
    same UCX_* variable is set: then the user's value is used."""
    root = Path(__file__).resolve().parents[2]

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "UCX_TLS"} | env
        return subprocess.run(
            [sys.executable, "-c", _AGENT_WITH_UCX_TLS], cwd=root, env=environ, capture_output=True, text=True
        )

    assert start().returncode != 0
    assert start(UCX_TLS="tcp").returncode == 0
