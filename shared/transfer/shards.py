"""KV transfer with tensor parallelism: every rank moves its own shard, rank 0 decides.

With `tp_size = N` each rank's pool holds its KV heads only (shared/distributed/), so a prompt's
pages are N shards in N processes. A prefill/decode pair runs the same `tp_size`, and prefill
rank r's shard goes to decode rank r's. Rank 0 alone runs the hand-off (`KvSender`/`KvReceiver`
see one `KvPages` and one `KvAgent`, as at `tp_size = 1`); the two classes here are those for
rank 0, and they drive the followers through TRANSFER items of the step broadcast
(shared/distributed/step_sync.py), which a follower runs between forwards (`FollowerTransfer`,
shared/transfer/shard_follower.py):

    rank 0                                              follower r
    ShardedNixlAgent   (one NIXL agent per rank, each over its own shard)
      start-up      METADATA: gather every rank's agent metadata; ours lists them (`ranks`)
      add_peer      ADD_PEER: rank r learns the peer's rank-r agent (once per pair of ranks)
      remove_peer   REMOVE_PEER (sent with the next item): rank r forgets it
      write         our write, and WRITE: rank r posts the same pages of its shard to its peer
      state         STATES: gather the followers' states (at most once per `_STATES_TTL_S`)
      (notif)       once every rank's data is DONE, one more write carries the notification:
                    our last page again (the decode side hears the commit after all shards)
      release       RELEASE (sent with the next item)
      take_notifs   PROGRESS when no forward went out for `_PROGRESS_EVERY_S` (a follower
                    progresses its agent after each forward): a NIXL write completes only
                    while its target polls
    ShardedPageLayout  (the gRPC transport: bytes through rank 0)
      read_pages    READ: each follower sends its shard's bytes to rank 0 (point to point)
      write_pages   WRITE_PAGES: rank 0 sends each follower its part, which it writes

Bytes over gRPC are the shards one after the other (rank 0's serialized pages, then rank 1's,
...): the prefill rank 0 gathers `N - 1` shards and the decode rank 0 scatters them, an extra
copy through rank 0 per follower shard on top of the transport's own (NIXL moves each shard
directly between its two ranks). Byte counts (`nbytes`) are of all shards.

Cost at `tp_size > 1` only: one broadcast item per write, state refresh or abort notice; the
notification's extra one-page write. Nothing here runs at `tp_size = 1`.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from shared.distributed.step_sync import StepBroadcast
from shared.errors import InvalidRequest
from shared.transfer.nixl import NixlAgent, PeerInfo, XferState, check_peer
from shared.transfer.pages import PageLayout

logger = logging.getLogger(__name__)

# Instructions (int64 words: an opcode, then its arguments).
METADATA = 1  # []; each follower sends rank 0 its metadata's length, then the metadata
ADD_PEER = 2  # [peer id, N - 1 lengths]; rank 0 sends rank r its part; gather a status
WRITE = 3  # [write id, peer id, n, src pages [n], dst pages [n]]
RELEASE = 4  # [write id]
STATES = 5  # [k, write ids [k]]; gather the states [k]
PROGRESS = 6  # []
READ = 7  # [n, pages [n]]; each follower sends its shard's bytes of the pages
WRITE_PAGES = 8  # [n, pages [n]]; rank 0 sends each follower its shard's bytes of the pages
REMOVE_PEER = 9  # [peer id]

STATE_CODES: dict[str, int] = {"PROC": 0, "DONE": 1, "ERR": 2}
_STATES: list[XferState] = ["PROC", "DONE", "ERR"]
_STATES_TTL_S = 0.0005  # followers' states are asked at most this often (one poll pass)
_PROGRESS_EVERY_S = 0.001  # idle followers are told to progress at most this often


def as_tensor(data: bytes | bytearray | memoryview, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only buffer: it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).to(device)


def host_bytes(t: torch.Tensor) -> memoryview:
    return t.cpu().numpy().data


class _Channel:
    """Rank 0's end: instructions out through the step broadcast, replies back point to point
    or gathered. Items without a reply (releases) wait for the next item."""

    def __init__(self, sync: StepBroadcast, size: int) -> None:
        self.sync = sync
        self.size = size
        self.device = sync.device
        self._deferred: list[int] = []

    def send(self, *words: int) -> None:
        words_out, self._deferred = [*self._deferred, *words], []
        self.sync.send_transfer(words_out)

    def defer(self, *words: int) -> None:
        self._deferred += words

    def gather_codes(self, k: int) -> list[list[int]]:
        """Each follower's `k` ints (rank 0 contributes none of its own)."""
        parts = [torch.empty(k, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.gather(torch.zeros(k, dtype=torch.int64, device=self.device), parts, dst=0)
        return [p.tolist() for p in parts[1:]]

    def recv_bytes(self, rank: int, out: memoryview) -> None:
        """`rank`'s bytes into `out` (a host buffer of the size it sends)."""
        if self.device.type == "cpu":
            dist.recv(torch.frombuffer(out, dtype=torch.uint8), src=rank)
            return
        staged = torch.empty(out.nbytes, dtype=torch.uint8, device=self.device)
        dist.recv(staged, src=rank)
        out[:] = host_bytes(staged)

    def send_bytes(self, rank: int, data: bytes | bytearray | memoryview) -> None:
        dist.send(as_tensor(data, self.device), dst=rank)


class ShardedPageLayout:
    """Rank 0's `KvPages` over every rank's shard: page ids are the same on every rank (rank 0
    allocates, the followers mirror it); bytes are the ranks' serialized pages in rank order."""

    def __init__(self, local: PageLayout, channel: _Channel) -> None:
        self.local = local
        self.channel = channel
        self.size = channel.size
        self.page_size = local.page_size
        self.num_pages = local.num_pages
        # The shards have one shape on every rank: the fingerprint says how many there are.
        self.fingerprint = f"{local.fingerprint}-tp{self.size}"

    def nbytes(self, num_pages: int) -> int:
        return self.size * self.local.nbytes(num_pages)

    def check_pages(self, pages: list[int]) -> None:
        self.local.check_pages(pages)

    def read_pages(self, pages: list[int]) -> bytearray:
        shard = self.local.nbytes(len(pages))
        out = bytearray(self.size * shard)
        view = memoryview(out)
        view[:shard] = self.local.read_pages(pages)
        if pages:
            self.channel.send(READ, len(pages), *pages)
            for rank in range(1, self.size):
                self.channel.recv_bytes(rank, view[rank * shard : (rank + 1) * shard])
        return out

    def write_pages(self, pages: list[int], data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes != self.nbytes(len(pages)):
            raise InvalidRequest(
                f"expected {self.nbytes(len(pages))} bytes for {len(pages)} pages of {self.size}"
                f" tensor-parallel shards, got {view.nbytes}"
            )
        shard = self.local.nbytes(len(pages))
        self.local.write_pages(pages, view[:shard])
        if pages:
            self.channel.send(WRITE_PAGES, len(pages), *pages)
            for rank in range(1, self.size):
                self.channel.send_bytes(rank, view[rank * shard : (rank + 1) * shard])


_UNPOSTED = object()  # a notification write that NIXL refused to post


@dataclass
class _Write:
    """One write of every rank's shard (the handle `ShardedNixlAgent.write` returns)."""

    id: int
    peer: str
    local: Any  # our NIXL handle
    notif: bytes
    last: tuple[int, int]  # (src, dst) page the notification's write rewrites
    followers: XferState = "PROC"  # the followers' writes, all together
    carrier: Any = None  # our write carrying `notif`, posted once every shard landed


class ShardedNixlAgent:
    """Rank 0's `KvAgent` (see the module docstring): one NIXL agent per rank, each writing its
    own shard to the peer's rank of the same index."""

    def __init__(self, local: NixlAgent, channel: _Channel) -> None:
        self.local = local
        self.name = local.name
        self.channel = channel
        self.size = channel.size
        self._peers: dict[str, int] = {}  # peer name -> id the followers know it by
        self._peer_ids = itertools.count()
        self._writes: dict[int, _Write] = {}
        self._ids = itertools.count()
        self._states_at = float("-inf")
        self._steps_seen = -1
        self._progressed_at = float("-inf")
        channel.send(METADATA)
        ranks = []
        for rank in range(1, self.size):
            length = torch.empty(1, dtype=torch.int64, device=channel.device)
            dist.recv(length, src=rank)
            blob = bytearray(int(length.item()))
            channel.recv_bytes(rank, memoryview(blob))
            ranks.append(bytes(blob))
        info = msgspec.msgpack.decode(local.metadata(), type=PeerInfo)
        self._metadata = msgspec.msgpack.encode(msgspec.structs.replace(info, ranks=ranks))

    def metadata(self) -> bytes:
        return self._metadata

    def has_peer(self, name: str) -> bool:
        return name in self._peers

    def add_peer(self, metadata: bytes) -> str:
        """Learn a peer engine with the same tp_size: rank r learns its rank r."""
        info = msgspec.msgpack.decode(metadata, type=PeerInfo)
        check_peer(info, self.local.layout.fingerprint, self.size)
        if len(info.ranks) != self.size - 1:
            raise InvalidRequest(
                f"KV peer {info.name} lists {len(info.ranks)} other ranks, not {self.size - 1}"
            )
        if info.name in self._peers:
            return info.name
        peer_id = next(self._peer_ids)
        self.channel.send(ADD_PEER, peer_id, *(len(blob) for blob in info.ranks))
        for rank, blob in enumerate(info.ranks, start=1):
            self.channel.send_bytes(rank, blob)
        failed = [rank for rank, (code,) in enumerate(self.channel.gather_codes(1), start=1) if code]
        if failed:
            raise RuntimeError(
                f"tensor-parallel rank(s) {failed} could not add KV peer {info.name} (see their log)"
            )
        name = self.local.add_peer(metadata)
        self._peers[name] = peer_id
        return name

    def remove_peer(self, name: str) -> None:
        peer_id = self._peers.pop(name, None)
        if peer_id is not None:
            self.channel.defer(REMOVE_PEER, peer_id)  # goes out with the next item
            self.local.remove_peer(name)

    def write(self, peer: str, src_pages: list[int], dst_pages: list[int], notif: bytes = b"") -> _Write:
        peer_id = self._peers[peer]  # KeyError: add_peer first
        local = self.local.write(peer, src_pages, dst_pages)
        write = _Write(next(self._ids), peer, local, notif, (src_pages[-1], dst_pages[-1]))
        n = len(src_pages)
        self.channel.send(WRITE, write.id, peer_id, n, *src_pages, *dst_pages)
        self._writes[write.id] = write
        return write

    def state(self, handle: Any) -> XferState:
        write: _Write = handle
        if write.carrier is _UNPOSTED:
            return "ERR"
        if write.carrier is not None:
            return self.local.state(write.carrier)
        local = self.local.state(write.local)
        if write.followers == "PROC":
            self._refresh()
        if "PROC" in (local, write.followers):
            return "PROC"  # no part may be reported over while another still reads our pages
        if "ERR" in (local, write.followers):
            return "ERR"
        if not write.notif:
            return "DONE"
        # Every shard landed: the notification may go now, riding a rewrite of one page.
        src, dst = write.last
        try:
            write.carrier = self.local.write(write.peer, [src], [dst], write.notif)
        except (RuntimeError, KeyError) as e:  # as a write that could not be posted: failed
            logger.warning("could not post the notification to %s: %s", write.peer, e)
            write.carrier = _UNPOSTED
            return "ERR"
        return "PROC"

    def release(self, handle: Any) -> None:
        write: _Write = handle
        self._writes.pop(write.id, None)
        self.channel.defer(RELEASE, write.id)
        try:
            self.local.release(write.local)
        finally:
            if write.carrier not in (None, _UNPOSTED):
                self.local.release(write.carrier)

    def take_notifs(self) -> list[bytes]:
        notifs = self.local.take_notifs()
        # The followers progress after each forward; between forwards they wait for an item.
        now, steps = time.monotonic(), self.channel.sync.steps_sent
        if steps != self._steps_seen:
            self._steps_seen, self._progressed_at = steps, now
        elif now - self._progressed_at >= _PROGRESS_EVERY_S:
            self.channel.send(PROGRESS)
            self._progressed_at = now
        return notifs

    def _refresh(self) -> None:
        """Ask the followers how their writes are doing (those not over yet), in one item."""
        now = time.monotonic()
        if now - self._states_at < _STATES_TTL_S:
            return
        self._states_at = now
        pending = [w for w in self._writes.values() if w.followers == "PROC"]
        if not pending:
            return
        self.channel.send(STATES, len(pending), *(w.id for w in pending))
        codes = self.channel.gather_codes(len(pending))  # [followers][writes]
        for i, write in enumerate(pending):
            states = {_STATES[rank_codes[i]] for rank_codes in codes}
            write.followers = "PROC" if "PROC" in states else "ERR" if "ERR" in states else "DONE"


def shard_transfer(
    layout: PageLayout, agent: NixlAgent | None, sync: StepBroadcast, size: int
) -> tuple[ShardedPageLayout, ShardedNixlAgent | None]:
    """Rank 0 of a tensor-parallel PD engine: its layout and agent (over rank 0's shard) made
    into ones over every rank's shard (the followers' agents start now)."""
    channel = _Channel(sync, size)
    return ShardedPageLayout(layout, channel), ShardedNixlAgent(agent, channel) if agent is not None else None
