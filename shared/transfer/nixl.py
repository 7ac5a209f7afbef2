"""A NIXL agent over the engine's KV pool: one-sided WRITEs of whole pages into a peer's pool.

The decode engine only registers its pool and hands out its metadata (agent metadata + buffer
addresses); it never takes part in a write. It learns that one finished from the notification
that NIXL delivers after the data of that transfer: the prefill engine attaches the commit
record (`KvCommit`) to the last write of a request.

Pages are coalesced into runs (consecutive on both sides), so a transfer posts
`buffers x runs` descriptors rather than `buffers x pages`.

Single-threaded: the engine loop calls every method.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import uuid
from typing import Any, Literal

import msgspec
import numpy as np

from shared.transfer.pages import PageLayout

XferState = Literal["DONE", "PROC", "ERR"]


def import_nixl() -> tuple[Any, Any]:
    """(nixl_agent, nixl_agent_config) from whichever NIXL build is installed."""
    for module in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            api = importlib.import_module(module)
        except ImportError:
            continue
        logging.getLogger("nixl").setLevel(logging.WARNING)
        return api.nixl_agent, api.nixl_agent_config
    raise ImportError("NIXL is not installed (pip install nixl, or nixl-cu12 / nixl-cu13)")


class PeerInfo(msgspec.Struct, frozen=True):
    """What a peer needs to write into our pool."""

    name: str
    agent_metadata: bytes
    fingerprint: str
    addresses: list[int]  # base address of each buffer
    page_bytes: list[int]
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int


class NixlAgent:
    def __init__(self, layout: PageLayout, role: str) -> None:
        nixl_agent, nixl_agent_config = import_nixl()
        self.layout = layout
        self.name = f"tandem-{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._agent = nixl_agent(self.name, nixl_agent_config(backends=["UCX"]))
        self._agent.register_memory(layout.buffers)
        device = layout.buffers[0].device
        self.mem_type = "VRAM" if device.type == "cuda" else "DRAM"
        self.device_id = device.index or 0
        self.addresses = [buf.data_ptr() for buf in layout.buffers]
        self._peers: dict[str, PeerInfo] = {}

    def metadata(self) -> bytes:
        info = PeerInfo(
            self.name,
            self._agent.get_agent_metadata(),
            self.layout.fingerprint,
            self.addresses,
            self.layout.page_bytes,
            self.mem_type,
            self.device_id,
        )
        return msgspec.msgpack.encode(info)

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    def add_peer(self, metadata: bytes) -> str:
        """Learn a peer from its `metadata()`; its layout must match ours. Returns its name."""
        info = msgspec.msgpack.decode(metadata, type=PeerInfo)
        if info.fingerprint != self.layout.fingerprint:
            raise ValueError(
                f"KV layout mismatch with {info.name}: {info.fingerprint} != {self.layout.fingerprint}"
                " (same model, dtype and page size on both sides?)"
            )
        if info.name not in self._peers:
            self._agent.add_remote_agent(info.agent_metadata)
            self._peers[info.name] = info
        return info.name

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int], notif: bytes = b"") -> Any:
        """Start writing our `src_pages` into the peer's `dst_pages` (every buffer); a handle."""
        info = self._peers[peer]  # KeyError: add_peer first
        assert len(src_pages) == len(dst_pages) and src_pages
        runs = _runs(src_pages, dst_pages)  # [R, 3]: src start, dst start, pages
        local, remote = [], []
        for base, rbase, page_bytes in zip(self.addresses, info.addresses, self.layout.page_bytes):
            lengths = runs[:, 2] * page_bytes
            local.append(
                np.stack([base + runs[:, 0] * page_bytes, lengths, np.full_like(lengths, self.device_id)], 1)
            )
            remote.append(
                np.stack([rbase + runs[:, 1] * page_bytes, lengths, np.full_like(lengths, info.device_id)], 1)
            )
        src = self._agent.get_xfer_descs(np.concatenate(local), self.mem_type)
        dst = self._agent.get_xfer_descs(np.concatenate(remote), info.mem_type)
        handle = self._agent.initialize_xfer("WRITE", src, dst, peer, notif)
        if self._agent.transfer(handle) == "ERR":
            self._agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL could not post a write to {peer}")
        return handle

    def state(self, handle: Any) -> XferState:
        state: XferState = self._agent.check_xfer_state(handle)
        return state

    def release(self, handle: Any) -> None:
        self._agent.release_xfer_handle(handle)

    def take_notifs(self) -> list[bytes]:
        """Notifications received since the last call (commit records), from any peer."""
        return [msg for msgs in self._agent.get_new_notifs().values() for msg in msgs]


def _runs(src: list[int], dst: list[int]) -> np.ndarray:
    """Maximal runs where both page lists advance by one: rows (src start, dst start, length)."""
    s = np.asarray(src, dtype=np.int64)
    d = np.asarray(dst, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(s)]]))
    return np.stack([s[starts], d[starts], lengths], 1)
