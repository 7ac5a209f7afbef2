"""A NIXL agent over the engine's KV pool: one-sided WRITEs of whole pages into a peer's pool.

The decode engine only registers its pool and hands out its metadata (agent metadata + buffer
addresses); it never takes part in a write. It learns that one finished from the notification
that NIXL delivers after the data of that transfer: the prefill engine attaches the commit
record (`KvCommit`) to the last write of a request.

Pages are coalesced into runs (consecutive on both sides), so a transfer posts
`buffers x runs` descriptors rather than `buffers x pages`; each buffer of the pool (2 per
layer for MHA) still gets its own descriptors.

No progress thread: NIXL's UCX progress thread polls without sleeping (a whole core per idle
engine), and the engine already drives transfers itself: `state()` and `take_notifs()` progress
the UCX worker, and the engine calls them after every step and every 2 ms while a transfer is in
flight. A write then completes only while both sides poll: the writer's `state()` may read PROC
until the target has progressed too, so the decode engine must keep polling (`take_notifs`)
while it holds pages a write may target, as it does while it holds a reservation. UCX
settings come from `UCX_DEFAULTS`, each overridden by the same `UCX_*` variable in the
environment (docs/kv_transfer.md says what UCX picks and how fast it is).

Single-threaded: the engine loop calls every method.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Literal, Protocol

import msgspec
import numpy as np

from shared.errors import InvalidRequest
from shared.transfer import import_nixl
from shared.transfer.pages import PageLayout, page_runs

XferState = Literal["DONE", "PROC", "ERR"]
logger = logging.getLogger(__name__)

# UCX settings the agent asks for, by name without the `UCX_` prefix; an environment variable
# `UCX_<NAME>` wins over each. Empty: no UCX_TLS we tried beat UCX's own choice on host memory
# (cma for the pages, tcp for set-up and notifications), and a list must keep the CUDA
# transports on GPU hosts (docs/kv_transfer.md).
UCX_DEFAULTS: dict[str, str] = {}


class PeerInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a peer needs to write into our pool (with tensor parallelism: into rank 0's shard;
    `ranks` holds the other ranks' own `PeerInfo`, encoded, in rank order)."""

    name: str
    agent_metadata: bytes
    fingerprint: str
    addresses: list[int]  # base address of each buffer
    page_bytes: list[int]
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int
    tp_size: int = 1
    tp_rank: int = 0
    ranks: list[bytes] = []


def check_peer(info: PeerInfo, fingerprint: str, tp_size: int) -> None:
    """Refuse a peer whose pool this engine (rank) cannot write into."""
    if info.tp_size != tp_size:
        raise InvalidRequest(
            f"tensor-parallel size mismatch: KV peer {info.name} runs tp_size={info.tp_size}, this"
            f" engine tp_size={tp_size}; a prefill/decode pair must use the same tp_size"
            " (heterogeneous TP is not supported yet)"
        )
    if info.fingerprint != fingerprint:
        raise ValueError(
            f"KV layout mismatch with {info.name}: {info.fingerprint} != {fingerprint}"
            " (same model, dtype and page size on both sides?)"
        )


class KvAgent(Protocol):
    """What the KV hand-off (shared/disagg/) needs of a transfer agent: `NixlAgent` over one
    pool, `ShardedNixlAgent` (shared/transfer/shards.py) over a tensor-parallel engine's shards.

    `write` starts writing `src_pages` into the peer's `dst_pages` and returns a handle whose
    `state` is PROC until the write is over; its `notif` reaches the peer's `take_notifs` after
    all of the write's data. A write that cannot be posted raises RuntimeError (KeyError for a
    peer never added); one that fails reads "ERR" (a peer that died: either)."""

    name: str

    def metadata(self) -> bytes: ...

    def has_peer(self, name: str) -> bool: ...

    def add_peer(self, metadata: bytes) -> str: ...

    def remove_peer(self, name: str) -> None: ...

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int], notif: bytes = b"") -> Any: ...

    def state(self, handle: Any) -> XferState: ...

    def release(self, handle: Any) -> None: ...

    def take_notifs(self) -> list[bytes]: ...


class NixlAgent:
    def __init__(
        self,
        layout: PageLayout,
        role: str,
        *,
        progress_thread: bool = False,
        ucx: dict[str, str] | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
    ) -> None:
        """`progress_thread`: NIXL's UCX progress thread (busy-polls a core; off: the caller's
        `state`/`take_notifs` calls progress transfers). `ucx`: UCX settings over
        `UCX_DEFAULTS` (names without `UCX_`); a `UCX_*` environment variable still wins.
        `tp_size`/`tp_rank`: the tensor-parallel rank whose pool shard `layout` is (peers must
        run the same tp_size)."""
        nixl_agent, nixl_agent_config = import_nixl()
        self.layout = layout
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.name = f"tandem-{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        settings = {**UCX_DEFAULTS, **(ucx or {})}
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=[])
        self._agent = nixl_agent(self.name, config)
        # NIXL applies `engine_config` through ucp_config_modify, skipping a key whose UCX_<KEY>
        # environment variable is set: the user's setting wins.
        params = {"engine_config": ",".join(f"{k}={v}" for k, v in settings.items())} if settings else {}
        self._agent.create_backend("UCX", params)
        self._agent.register_memory(layout.buffers)
        device = layout.buffers[0].device
        self.mem_type = "VRAM" if device.type == "cuda" else "DRAM"
        self.device_id = device.index or 0
        self.addresses = [buf.data_ptr() for buf in layout.buffers]
        self._addresses = np.asarray(self.addresses, dtype=np.int64)  # [B]
        self._page_bytes = np.asarray(layout.page_bytes, dtype=np.int64)  # [B]
        self._peers: dict[str, PeerInfo] = {}
        self._peer_addresses: dict[str, np.ndarray] = {}  # [B] per peer
        logger.info(
            "NIXL agent %s: %s pool, %d buffers, UCX progress thread %s, UCX settings %s",
            self.name,
            self.mem_type,
            len(layout.buffers),
            "on" if progress_thread else "off (the engine polls)",
            describe_ucx(settings),
        )

    def metadata(self) -> bytes:
        info = PeerInfo(
            self.name,
            self._agent.get_agent_metadata(),
            self.layout.fingerprint,
            self.addresses,
            self.layout.page_bytes,
            self.mem_type,
            self.device_id,
            self.tp_size,
            self.tp_rank,
        )
        return msgspec.msgpack.encode(info)

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    def add_peer(self, metadata: bytes) -> str:
        """Learn a peer from its `metadata()`; its layout must match ours. Returns its name."""
        info = msgspec.msgpack.decode(metadata, type=PeerInfo)
        check_peer(info, self.layout.fingerprint, self.tp_size)
        if info.name not in self._peers:
            self._agent.add_remote_agent(info.agent_metadata)
            self._peers[info.name] = info
            self._peer_addresses[info.name] = np.asarray(info.addresses, dtype=np.int64)
        return info.name

    def remove_peer(self, name: str) -> None:
        """Forget a peer (no write to it may be in flight): NIXL drops its metadata and the
        connection to it. An unknown name is ignored."""
        if self._peers.pop(name, None) is not None:
            del self._peer_addresses[name]
            self._agent.remove_remote_agent(name)

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int], notif: bytes = b"") -> Any:
        """Start writing our `src_pages` into the peer's `dst_pages` (every buffer); a handle."""
        info = self._peers[peer]  # KeyError: add_peer first
        assert len(src_pages) == len(dst_pages) and src_pages
        local, remote = self.descriptors(peer, src_pages, dst_pages)
        src = self._agent.get_xfer_descs(local, self.mem_type)
        dst = self._agent.get_xfer_descs(remote, info.mem_type)
        handle = None
        try:
            handle = self._agent.initialize_xfer("WRITE", src, dst, peer, notif)
            posted, why = self._agent.transfer(handle), ""
        except Exception as e:
            if not _nixl_error(e):
                raise
            posted, why = "ERR", f": {type(e).__name__} {e}"  # a peer gone: NIXL_ERR_REMOTE_DISCONNECT
        if posted == "ERR":
            if handle is not None:
                self._agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL could not post a write to {peer}{why}")
        return handle

    def descriptors(
        self, peer: str, src_pages: list[int], dst_pages: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The write's (local, remote) descriptors: `[buffers * runs, 3]` rows (address, bytes,
        device), buffer-major, one row per run of pages consecutive on both sides."""
        runs = page_runs(src_pages, dst_pages)  # [R, 3]: src start, dst start, pages
        page_bytes = self._page_bytes[:, None]  # [B, 1]
        lengths = page_bytes * runs[None, :, 2]  # [B, R]
        local = self._addresses[:, None] + page_bytes * runs[None, :, 0]
        remote = self._peer_addresses[peer][:, None] + page_bytes * runs[None, :, 1]
        info = self._peers[peer]
        return _rows(local, lengths, self.device_id), _rows(remote, lengths, info.device_id)

    def state(self, handle: Any) -> XferState:
        """The write's state; "ERR" also where NIXL raises for it (its peer is gone)."""
        try:
            state: XferState = self._agent.check_xfer_state(handle)
        except Exception as e:
            if not _nixl_error(e):
                raise
            return "ERR"
        return state

    def release(self, handle: Any) -> None:
        self._agent.release_xfer_handle(handle)

    def notify(self, peer: str, msg: bytes) -> None:
        """Send `msg` to the peer's notifications, without a write."""
        self._agent.send_notif(peer, msg)

    def take_notifs(self) -> list[bytes]:
        """Notifications received since the last call (commit records), from any peer."""
        return [msg for msgs in self._agent.get_new_notifs().values() for msg in msgs]


def _nixl_error(e: Exception) -> bool:
    """Whether NIXL's bindings raised `e`: their errors (nixlRemoteDisconnectError and the like)
    derive from Exception alone, in whichever build is installed (nixl, nixl_cu12, nixl_cu13).
    Posting a write to, or asking after a write to, a peer whose process died raises one: the
    `KvAgent` contract turns them into RuntimeError and "ERR", which the engine handles as a
    failed transfer (an escaped one killed the prefill engine when a decode worker died)."""
    return type(e).__module__.split(".")[0].startswith("nixl")


def _rows(addresses: np.ndarray, lengths: np.ndarray, device_id: int) -> np.ndarray:
    # [B, R] addresses and lengths -> [B * R, 3] descriptor rows
    return np.stack([addresses, lengths, np.full_like(lengths, device_id)], -1).reshape(-1, 3)


def describe_ucx(settings: dict[str, str]) -> str:
    """The UCX settings in force, for the start-up log: ours, and the environment's `UCX_*`."""
    env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    ours = [f"{k}={v}" for k, v in settings.items() if f"UCX_{k}" not in env]
    parts = [f"{k}={v} (env)" for k, v in sorted(env.items())] + ours
    tls = "" if "UCX_TLS" in env or "TLS" in settings else "UCX_TLS unset (UCX picks per peer); "
    return tls + (", ".join(parts) or "UCX defaults") + "; UCX_PROTO_INFO=y prints UCX's choice per transfer"
