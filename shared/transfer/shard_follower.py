"""A follower rank's part of each KV transfer of a tensor-parallel prefill/decode engine.

Rank 0 decides every transfer (shared/transfer/shards.py: the instructions and why); a follower
carries out, between forwards, what a TRANSFER item of the step broadcast says for its own KV
shard: post and release NIXL writes of its pages to the peer rank of its index, report their
states, or move its pages' bytes to or from rank 0 (the gRPC transport).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from shared.transfer.nixl import NixlAgent, PeerInfo, XferState
from shared.transfer.pages import PageLayout
from shared.transfer.shards import (
    ADD_PEER,
    METADATA,
    PROGRESS,
    READ,
    RELEASE,
    REMOVE_PEER,
    STATE_CODES,
    STATES,
    WRITE,
    WRITE_PAGES,
    as_tensor,
    host_bytes,
)

logger = logging.getLogger(__name__)


class FollowerTransfer:
    """A follower rank's part of every KV transfer, run as rank 0 instructs (see the module
    docstring); it holds its NIXL agent (created when rank 0 first asks for its metadata)."""

    def __init__(self, layout: PageLayout, role: str, rank: int, size: int, device: torch.device) -> None:
        self.layout = layout
        self.role = role
        self.rank = rank
        self.size = size
        self.device = device
        self.agent: NixlAgent | None = None
        self._peers: dict[int, str] = {}  # rank 0's peer id -> our peer's agent name
        self._writes: dict[int, Any] = {}  # write id -> NIXL handle (None: could not post)

    def progress(self) -> None:
        """Let NIXL progress writes into or out of our shard (notifications are rank 0's)."""
        if self.agent is not None:
            self.agent.take_notifs()

    def run(self, words: list[int]) -> None:
        """Carry out one TRANSFER item (replying where the instruction wants a reply)."""
        i = 0
        while i < len(words):
            op = words[i]
            if op == METADATA:
                self._send_metadata()
                i += 1
            elif op == ADD_PEER:
                peer_id, lengths = words[i + 1], words[i + 2 : i + 1 + self.size]
                self._add_peer(peer_id, lengths[self.rank - 1])
                i += 1 + self.size
            elif op == WRITE:
                write_id, peer_id, n = words[i + 1 : i + 4]
                src, dst = words[i + 4 : i + 4 + n], words[i + 4 + n : i + 4 + 2 * n]
                self._write(write_id, peer_id, src, dst)
                i += 4 + 2 * n
            elif op == RELEASE:
                self._release(words[i + 1])
                i += 2
            elif op == REMOVE_PEER:
                name = self._peers.pop(words[i + 1], None)
                if name is not None and self.agent is not None:
                    self.agent.remove_peer(name)
                i += 2
            elif op == STATES:
                k = words[i + 1]
                self._send_states(words[i + 2 : i + 2 + k])
                i += 2 + k
            elif op == PROGRESS:
                self.progress()
                i += 1
            elif op in (READ, WRITE_PAGES):
                n = words[i + 1]
                pages = words[i + 2 : i + 2 + n]
                if op == READ:
                    self._read(pages)
                else:
                    self._write_pages(pages)
                i += 2 + n
            else:
                raise ValueError(f"unknown KV-transfer instruction {op} at word {i}")

    def _send_metadata(self) -> None:
        self.agent = self.agent or NixlAgent(self.layout, self.role, tp_size=self.size, tp_rank=self.rank)
        blob = self.agent.metadata()
        dist.send(torch.tensor([len(blob)], dtype=torch.int64, device=self.device), dst=0)
        dist.send(as_tensor(blob, self.device), dst=0)

    def _add_peer(self, peer_id: int, length: int) -> None:
        staged = torch.empty(length, dtype=torch.uint8, device=self.device)
        dist.recv(staged, src=0)
        code = 0
        try:
            assert self.agent is not None, "rank 0 asked for our metadata first"
            metadata = bytes(host_bytes(staged))
            info = msgspec.msgpack.decode(metadata, type=PeerInfo)
            if info.tp_rank != self.rank:
                raise ValueError(f"KV peer {info.name} is rank {info.tp_rank}, not {self.rank}")
            self._peers[peer_id] = self.agent.add_peer(metadata)
        except Exception:
            logger.exception("rank %d could not add a KV peer", self.rank)
            code = 1
        dist.gather(torch.tensor([code], dtype=torch.int64, device=self.device), None, dst=0)

    def _write(self, write_id: int, peer_id: int, src: list[int], dst: list[int]) -> None:
        assert self.agent is not None
        try:
            self._writes[write_id] = self.agent.write(self._peers[peer_id], src, dst)
        except (RuntimeError, KeyError) as e:  # reported ERR when rank 0 asks
            logger.warning("rank %d could not post a KV write: %s", self.rank, e)
            self._writes[write_id] = None

    def _release(self, write_id: int) -> None:
        handle = self._writes.pop(write_id, None)
        if handle is not None and self.agent is not None:
            with contextlib.suppress(Exception):  # a write that never ended may refuse release
                self.agent.release(handle)

    def _send_states(self, write_ids: list[int]) -> None:
        codes = [STATE_CODES[self._state(w)] for w in write_ids]
        dist.gather(torch.tensor(codes, dtype=torch.int64, device=self.device), None, dst=0)

    def _state(self, write_id: int) -> XferState:
        handle = self._writes.get(write_id)
        if handle is None or self.agent is None:
            return "ERR"
        try:
            return self.agent.state(handle)
        except Exception as e:  # e.g. the peer disconnected: this write is over
            logger.warning("rank %d: KV write failed: %s", self.rank, e)
            return "ERR"

    def _read(self, pages: list[int]) -> None:
        dist.send(as_tensor(self.layout.read_pages(pages), self.device), dst=0)

    def _write_pages(self, pages: list[int]) -> None:
        staged = torch.empty(self.layout.nbytes(len(pages)), dtype=torch.uint8, device=self.device)
        dist.recv(staged, src=0)
        self.layout.write_pages(pages, host_bytes(staged))
