"""Decode side of the KV hand-off (see the package docstring for the lifecycle)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from shared.scheduler.request import Req
from shared.transfer import KvCommit

if TYPE_CHECKING:
    from shared.engine_core import EngineCore
    from shared.transfer.nixl import NixlAgent


class KvReceiver:
    def __init__(self, core: EngineCore, agent: NixlAgent | None, lease_s: float) -> None:
        self.core = core
        self.agent = agent
        self.lease_s = lease_s
        self._queued: dict[str, Req] = {}  # reservations waiting for room, in arrival order
        self._waiting: dict[str, Req] = {}  # reservations awaiting their KV
        self._quarantine: dict[str, Req] = {}  # aborted reservations a write may still reach
        self.bytes_received = 0
        self.reservations = 0
        self.queued = 0  # reservations that had to wait for room
        self.expired = 0

    @property
    def busy(self) -> bool:
        return bool(self._queued or self._waiting or self._quarantine)

    def reserve(self, req: Req, lease_s: float | None) -> list[int] | None:
        """Hold pages for the whole prompt of `req` (returned in prompt order), or queue the
        reservation until there is room (None; the core reports it when it is granted)."""
        if req.rid in self._quarantine:
            raise ValueError(f"request id {req.rid!r} is still in use")
        req.kv_lease_s = lease_s or self.lease_s
        if not self._queued and self._try_reserve(req):
            return req.kv_pages
        req.kv_deadline = time.monotonic() + req.kv_lease_s  # how long it may wait for room
        self._queued[req.rid] = req
        self.queued += 1
        return None

    def _try_reserve(self, req: Req) -> bool:
        core = self.core
        if core.scheduler.num_active >= core.config.max_running_requests:
            return False
        # Room for the running requests' next tokens stays free, as admission does.
        slots = core.kv.admit(req, None, len(req.prompt_ids), reserve_pages=len(core.scheduler.running))
        if slots is None:
            return False
        page_size = core.layout.page_size
        req.kv_pages = (slots[::page_size] // page_size).tolist()
        req.awaiting_kv = True
        req.kv_deadline = time.monotonic() + req.kv_lease_s  # the lease starts now
        core.scheduler.parked.append(req)
        self._waiting[req.rid] = req
        self.reservations += 1
        return True

    def commit(self, commit: KvCommit, payload: bytes | None = None) -> None:
        """The prompt's KV is in place (or arrives in `payload`): continue from the first token."""
        quarantined = self._quarantine.pop(commit.rid, None)
        if quarantined is not None:  # the write we were waiting out is over
            self.core.scheduler.remove(quarantined, cache_kv=False)
            return
        req = self._waiting.pop(commit.rid, None)
        if req is None:
            return  # expired and freed already: nothing of ours is left to write to
        assert req.kv_pages is not None
        if payload is not None:
            self.core.layout.write_pages(req.kv_pages, payload)
        self.bytes_received += self.core.layout.nbytes(len(req.kv_pages))
        req.awaiting_kv = False
        self.core.continue_decode(req, commit)  # unparks it (once its grammar, if any, compiled)

    def abort(self, req: Req) -> str:
        """Abort a reservation. "dropped": it was still queued (the core forgets it, no output);
        "quarantined": its pages wait out a possible write (the core keeps them); "" otherwise."""
        if self._queued.pop(req.rid, None) is not None:
            self.core.drop_reservation(req.rid, "aborted while waiting for KV room")
            return "dropped"
        if self._waiting.pop(req.rid, None) is None:
            return ""
        req.kv_deadline = time.monotonic() + 2 * self.lease_s
        self._quarantine[req.rid] = req
        return "quarantined"

    def reset(self) -> None:
        """After a failed step dropped every request."""
        self._queued.clear()
        self._waiting.clear()
        self._quarantine.clear()

    def poll(self) -> None:
        """Take commit records from NIXL, expire reservations whose KV is late, end quarantines."""
        if self.agent is not None:
            for msg in self.agent.take_notifs():
                self.commit(KvCommit.decode(msg))
        now = time.monotonic()
        for rid, req in list(self._queued.items()):  # first come, first served
            if now > req.kv_deadline:
                del self._queued[rid]
                self.expired += 1
                self.core.drop_reservation(
                    rid, "no KV room on this decode engine within the reservation lease"
                )
            elif self._try_reserve(req):
                del self._queued[rid]
                self.core.reservation_granted(rid, req.kv_pages or [])
            else:
                break
        for rid, req in list(self._waiting.items()):
            if now > req.kv_deadline:
                self.expired += 1
                self.core.abort(rid, "the prompt's KV did not arrive within the reservation lease")
        for rid, req in list(self._quarantine.items()):
            if now > req.kv_deadline:
                del self._quarantine[rid]
                self.core.scheduler.remove(req, cache_kv=False)
