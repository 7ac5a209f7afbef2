"""Decode side of the KV hand-off (see the package docstring for the lifecycle).

`KvReceiver` sees the engine through narrow pieces: the pool's pages (`KvPages`, to write pages
that arrive as bytes), its transfer agent (`KvAgent`: NIXL notifications) and a function that
reserves pages for a request (parking it) or says there is no room. What it decides comes back
from `take_events()` (`Granted`, `Arrived`, `Expired`, `Released`) for the core to act on. With
tensor parallelism the pages and the agent span every rank's shard (shared/transfer/shards.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

from shared.disagg.events import Arrived, Expired, Granted, ReceiveEvent, Released
from shared.errors import InvalidRequest
from shared.scheduler.request import Req
from shared.transfer import KvCommit

if TYPE_CHECKING:
    from shared.transfer.nixl import KvAgent
    from shared.transfer.pages import KvPages

ReservePages = Callable[[Req], "list[int] | None"]  # pages for the whole prompt (parked), or None

logger = logging.getLogger(__name__)

LEASE_EXPIRED = "the prompt's KV did not arrive within the reservation lease"
PREFILL_GAVE_UP = "the prefill engine gave the prompt up before its KV was sent"


class Held(Enum):
    """What an aborted request held on the receiver's side."""

    NOTHING = "nothing"  # nothing to wait out: the core frees whatever the request holds
    NO_PAGES = "no_pages"  # expected or queued: nothing to free, the core just finishes it
    QUARANTINED = "quarantined"  # its pages wait out a write that may still land


class KvReceiver:
    """Reservations of a decode engine, from the prompt's arrival to its KV's.

        expect ──reserve──▶ queued (FCFS, no timer: the caller gives up by aborting)
                              │ room
                              ▼
                           granted (parked, lease running) ──commit──▶ Arrived (running)
                              │ abort / lease
                              ▼
                           quarantined ──(late commit, or 2 x lease)──▶ Released

    Only a NIXL write can land after the fact (it is one-sided); bytes over gRPC land inside
    `commit`, so an engine without an agent frees an aborted reservation's pages at once. A
    prefill engine that gives a prompt up after its pages were granted says so (an `aborted`
    commit record): a quarantine ends then, and a reservation still waiting fails at once.

    The lease guards liveness, not queueing: it starts when the pages are granted, which is
    when the prefill engine starts computing the prompt (it asks just in time), so it bounds
    the prompt's compute and transfer, never the time spent waiting for a turn.

    Single-threaded: the engine loop calls every method.
    """

    def __init__(
        self, layout: KvPages, reserve_pages: ReservePages, agent: KvAgent | None, lease_s: float
    ) -> None:
        self.layout = layout
        self.reserve_pages = reserve_pages
        self.agent = agent
        self.lease_s = lease_s
        self._expected: dict[str, Req] = {}  # known, no pages asked for yet
        self._queued: dict[str, Req] = {}  # pages asked for, waiting for room, in arrival order
        self._waiting: dict[str, Req] = {}  # pages granted, awaiting the KV
        self._quarantine: dict[str, Req] = {}  # aborted reservations a write may still reach
        self._events: list[ReceiveEvent] = []
        self.bytes_received = 0
        self.reservations = 0
        self.queued = 0  # reservations that had to wait for room
        self.expired = 0

    @property
    def pending(self) -> int:
        """Prompts whose KV has not arrived yet (still on the prefill side, or in transfer)."""
        return len(self._expected) + len(self._queued) + len(self._waiting)

    @property
    def busy(self) -> bool:
        """Reservations queued, granted or quarantined: keep polling."""
        return bool(self._queued or self._waiting or self._quarantine)

    def expect(self, req: Req, lease_s: float | None) -> None:
        """A prompt whose KV a prefill engine will compute; pages come with `reserve`."""
        if req.rid in self._quarantine:
            raise InvalidRequest(f"request id {req.rid!r} is still in use", param="request_id")
        req.kv_lease_s = lease_s or self.lease_s
        self._expected[req.rid] = req

    def reserve(self, rid: str) -> list[int] | None:
        """Pages for the whole prompt of an expected request (in prompt order), or None: the
        reservation waits for room (first come, first served) and `Granted` reports it."""
        req = self._expected.pop(rid, None)
        if req is None:
            raise InvalidRequest(f"no request {rid!r} is waiting for a KV reservation", param="request_id")
        if not self._queued and self._grant(req):
            return req.kv_pages
        self._queued[rid] = req
        self.queued += 1
        return None

    def _grant(self, req: Req) -> bool:
        pages = self.reserve_pages(req)
        if pages is None:
            return False
        req.kv_pages = pages
        req.awaiting_kv = True
        req.kv_deadline = time.monotonic() + req.kv_lease_s  # the lease starts now
        self._waiting[req.rid] = req
        self.reservations += 1
        return True

    def commit(self, commit: KvCommit, payload: bytes | memoryview | None = None) -> None:
        """The prompt's KV is in place (or arrives in `payload`): continue from the first token.
        An `aborted` record: nothing more will be written (the prefill side gave up)."""
        quarantined = self._quarantine.pop(commit.rid, None)
        if quarantined is not None:  # the write we were waiting out is over
            self._events.append(Released(quarantined))
            return
        req = self._waiting.pop(commit.rid, None)
        if req is None:
            return  # expired and freed already: nothing of ours is left to write to
        if commit.aborted:  # no write in flight: the core's abort frees the pages at once
            self._events.append(Expired(req, PREFILL_GAVE_UP))
            return
        assert req.kv_pages is not None
        if payload is not None:
            # A bad payload raises ValueError: the write is over, so the core aborts the
            # request and frees its pages at once (awaiting_kv: none of its KV is cached).
            self.layout.write_pages(req.kv_pages, payload)
        self.bytes_received += self.layout.nbytes(len(req.kv_pages))
        req.awaiting_kv = False
        self._events.append(Arrived(req, commit))

    def abort(self, req: Req) -> Held:
        """Forget an aborted request; a granted reservation's pages wait out a possible write."""
        if self._expected.pop(req.rid, None) is not None or self._queued.pop(req.rid, None) is not None:
            return Held.NO_PAGES
        if self._waiting.pop(req.rid, None) is None or self.agent is None:
            return Held.NOTHING  # (no agent: no write can land after the fact)
        req.kv_deadline = time.monotonic() + 2 * req.kv_lease_s
        self._quarantine[req.rid] = req
        return Held.QUARANTINED

    def poll(self) -> None:
        """Take commit records from NIXL, grant queued reservations, expire late KV, end
        quarantines."""
        if self.agent is not None:
            for msg in self.agent.take_notifs():
                try:
                    commit = KvCommit.decode(msg)
                except Exception:  # not one of ours: nothing to continue, nothing to free
                    logger.warning("ignoring a malformed KV notification (%d bytes)", len(msg))
                    continue
                self.commit(commit)
        for rid, req in list(self._queued.items()):  # first come, first served
            if not self._grant(req):
                break
            del self._queued[rid]
            self._events.append(Granted(req, req.kv_pages or []))
        now = time.monotonic()
        for req in list(self._waiting.values()):
            if now > req.kv_deadline:
                self.expired += 1
                self._events.append(Expired(req, LEASE_EXPIRED))
        for rid, req in list(self._quarantine.items()):
            if now > req.kv_deadline:
                del self._quarantine[rid]
                self._events.append(Released(req))

    def take_events(self) -> list[ReceiveEvent]:
        events, self._events = self._events, []
        return events

    def reset(self) -> list[Req]:
        """After a failed step dropped every request: forget them all. Returns the ones the
        scheduler did not hold (expected or queued), which the caller must fail too."""
        unscheduled = [*self._expected.values(), *self._queued.values()]
        for table in (self._expected, self._queued, self._waiting, self._quarantine):
            table.clear()
        self._events.clear()
        return unscheduled
