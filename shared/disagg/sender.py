"""Prefill side of the KV hand-off (see the package docstring for the lifecycle).

`KvSender` sees the engine through narrow pieces: the pool's pages (`KvPages`), its transfer
agent (`KvAgent`), a function that gives a request's own page ids, and a callback that asks for
a decode reservation. It never touches the scheduler: what it decides comes back from
`take_events()` (`Sent`, `SendFailed`) for the core to act on. With tensor parallelism the pages
and the agent span every rank's shard (shared/transfer/shards.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.disagg.events import SendEvent, SendFailed, Sent
from shared.errors import InvalidRequest
from shared.scheduler.request import Req
from shared.transfer import KvCommit, KvTarget

if TYPE_CHECKING:
    from shared.transfer.nixl import KvAgent
    from shared.transfer.pages import KvPages

logger = logging.getLogger(__name__)

_ABANDONED_KEPT = 4096  # aborted requests whose reservation may still come (oldest forgotten)
OwnPages = Callable[[Req, int], list[int]]  # (request, n) -> page ids of its first n prompt pages
WantTarget = Callable[[Req, int], None]  # (request, pages needed): ask the decode side for pages


@dataclass
class _Send:
    req: Req
    num_pages: int  # pages of the whole prompt
    # The decode engine's pages for the prompt's last len(pages) pages, once reserved: the
    # earlier ones it already holds (its prefix cache), so they are not sent.
    pages: list[int] | None = None
    asked: bool = False  # a reservation was asked for
    sent_pages: int = 0  # pages of the prompt already posted (nixl), or held by the decode side
    handles: list[Any] = field(default_factory=list)  # writes in flight
    commit: bytes | None = None  # set at the first token; posted with the last pages
    final_posted: bool = False
    abort_message: str | None = None  # aborted or failed while writes were in flight
    deadline: float = 0.0  # the last post's time + the transfer timeout
    first_post: float = 0.0  # wall clock (time.time()) of the first write posted, for tracing

    @property
    def held(self) -> int:
        """The prompt's first pages, which the decode engine already holds (once reserved)."""
        return self.num_pages - len(self.pages) if self.pages is not None else 0


class KvSender:
    """Sends each prefill request's prompt KV into the pages a decode engine reserves for it.

    A request arrives with a `KvTarget` naming the transport and peer; its pages are usually
    not known yet (`target.pages == []`): the first time the request is scheduled,
    `want_target` asks for them (just in time, so decode memory is not held while the prompt
    queues here) and `set_target` delivers them. Full pages stream out (nixl) as chunks finish;
    the first token parks the request until the rest is written and committed. That last write
    waits for `post_ready`, which the core calls once it has launched a forward (posting costs
    the host a descriptor per page run and buffer, up to milliseconds for a fragmented prompt,
    which then overlaps the GPU's work instead of idling it) or at once when no forward follows.

    Single-threaded: the engine loop calls every method.
    """

    def __init__(
        self,
        layout: KvPages,
        own_pages: OwnPages,
        agent: KvAgent | None,
        timeout_s: float,
        want_target: WantTarget,
    ) -> None:
        self.layout = layout
        self.own_pages = own_pages
        self.agent = agent
        self.timeout_s = timeout_s
        self.want_target = want_target
        self._sends: dict[str, _Send] = {}  # from admission to release
        # Requests aborted while their reservation was asked for: rid -> decode peer (nixl).
        self._abandoned: dict[str, str] = {}
        # "No KV is coming" writes: (handle, deadline, peer).
        self._notices: list[tuple[Any, float, str]] = []
        # Commit and pages known, every earlier write landed: the last write waits for post_ready.
        self._ready: dict[str, _Send] = {}
        self._events: list[SendEvent] = []
        self.peers: set[str] = set()  # decode engines' agents we can write into (nixl)
        self._forgotten: set[str] = set()  # peers to remove once nothing of ours goes there
        self.bytes_sent = 0
        self.transfers = 0
        self.failures = 0

    @property
    def busy(self) -> bool:
        """Writes in flight or requests waiting for their reservation: keep polling."""
        return bool(self._sends or self._notices or self._ready)

    def pages_needed(self, prompt_len: int) -> int:
        return -(-prompt_len // self.layout.page_size)

    def check_target(self, target: KvTarget, prompt_len: int) -> None:
        """Raise ValueError if this engine cannot send a prompt of `prompt_len` tokens there."""
        if target.pages:
            self._check_pages(target.pages, prompt_len)
        if target.transport == "nixl":
            if self.agent is None:
                raise InvalidRequest("this prefill engine has no NIXL agent (kv_transport=grpc)")
            if not self.agent.has_peer(target.peer):
                raise InvalidRequest(f"unknown KV peer {target.peer!r}: add its transfer metadata first")

    def _check_pages(self, pages: list[int], prompt_len: int) -> None:
        """A target lists pages for the prompt's last pages (the decode engine's prefix cache
        holds the ones before): at least one, at most the prompt's."""
        want = self.pages_needed(prompt_len)
        if not 1 <= len(pages) <= want:
            raise InvalidRequest(f"the KV target has {len(pages)} pages; the prompt needs 1 to {want}")
        self.layout.check_pages(pages)

    def track(self, req: Req) -> None:
        assert req.kv_target is not None
        send = _Send(req, self.pages_needed(len(req.prompt_ids)))
        if req.kv_target.pages:
            self._target(send, list(req.kv_target.pages))
        self._sends[req.rid] = send

    @staticmethod
    def _target(send: _Send, pages: list[int]) -> None:
        send.pages, send.asked = pages, True
        send.sent_pages = send.held  # never sent: the decode side has them

    # ---- peers (nixl) --------------------------------------------------------------------------

    def add_peer(self, metadata: bytes) -> str:
        """Learn a decode engine from its agent's metadata (again, if it was being forgotten);
        returns its agent name."""
        if self.agent is None:
            raise InvalidRequest("this prefill engine has no NIXL agent (kv_transport=grpc)")
        name = self.agent.add_peer(metadata)
        self.peers.add(name)
        self._forgotten.discard(name)
        return name

    def remove_peer(self, name: str) -> None:
        """Forget a decode engine (gone, or its worker restarted under another agent name): at
        once if nothing of ours is on its way there, else once the last write to it is over.
        Reservations it may still grant to requests aborted here are no longer waited for (its
        lease frees them)."""
        if name in self.peers:
            self._abandoned = {rid: peer for rid, peer in self._abandoned.items() if peer != name}
            self._forgotten.add(name)
            self._remove_forgotten()

    def _remove_forgotten(self) -> None:
        if not self._forgotten:
            return
        in_use = {s.req.kv_target.peer for s in self._sends.values() if s.req.kv_target is not None}
        in_use |= {peer for _, _, peer in self._notices}
        for name in self._forgotten - in_use:
            self.agent.remove_peer(name)  # type: ignore[union-attr]
            self.peers.discard(name)
        self._forgotten &= in_use

    # ---- called by the core --------------------------------------------------------------------

    def on_scheduled(self, reqs: list[Req]) -> None:
        """A step was scheduled: ask for the reservation of prompts that start computing now."""
        for req in reqs:
            send = self._sends.get(req.rid)
            if send is not None and not send.asked:
                send.asked = True
                self.want_target(req, send.num_pages)

    def set_target(self, rid: str, pages: list[int]) -> None:
        """The decode engine reserved `pages` for request `rid` (ValueError if they cannot be)."""
        send = self._sends.get(rid)
        if send is None or send.abort_message is not None:
            peer = self._abandoned.pop(rid, None)
            if peer is not None:  # aborted before its pages came: nothing will be written there
                self._notify_abandoned(peer, pages, rid)
            return
        if send.pages is not None:
            raise InvalidRequest(f"request {rid!r} already has its KV target")
        self._check_pages(pages, len(send.req.prompt_ids))
        self._target(send, pages)
        if send.commit is not None:  # the prompt finished before its reservation came
            self._finish(send)

    def stream_pages(self, computed: Mapping[str, int]) -> None:
        """After a step has run: post the pages its prompt chunks computed. `computed` maps a
        request id to its prompt tokens whose KV that step completed (its `cached_len` when the
        step was launched); the caller makes sure the forward has run, since a write reads the
        pages on its own stream, in no order with the engine's.

        Only pages below `cached_len` are final (the radix tree locks them for the request);
        pages above it may still be swapped for an identical cached copy and freed.
        """
        for rid, tokens in computed.items():
            send = self._sends.get(rid)
            if send is None or not self._is_nixl(send) or not send.pages:
                continue
            if send.commit is not None or send.abort_message is not None or send.req.row is None:
                continue  # done (the rest goes with its commit), failing, or no longer running
            end = min(tokens, send.req.cached_len) // self.layout.page_size
            if end > send.sent_pages:
                self._post(send, end, b"")

    def on_first_token(self, req: Req, token: int) -> None:
        """The prompt is done (the core parked it): send what is left with the commit record."""
        send = self._sends[req.rid]
        send.commit = KvCommit(
            rid=req.rid,
            first_token=token,
            cached_tokens=req.cached_tokens or 0,
            logprob=req.output_logprobs[0] if req.output_logprobs else None,
            top_logprobs=req.output_top_logprobs[0] if req.output_top_logprobs else None,
        ).encode()
        if send.pages is not None:
            self._finish(send)

    def abort(self, req: Req) -> bool:
        """Abort a tracked request; True if it must wait for its writes (the core then waits).
        The decode side hears that no KV is coming once no write of ours can land."""
        send = self._sends.get(req.rid)
        if send is None or not (send.handles or send.final_posted):
            if send is not None:
                del self._sends[req.rid]
                self._abandon(send)
            return False
        send.abort_message = send.abort_message or "aborted"
        return True

    def poll(self) -> None:
        """Advance every write: post the last pages once the others landed, release when done;
        remove the forgotten peers no write goes to any more."""
        now = time.monotonic()
        self._poll_notices(now)
        for rid, send in list(self._sends.items()):
            if not send.handles:
                continue
            states = [self.agent.state(h) for h in send.handles] if self.agent is not None else []
            if send.abort_message is None and "ERR" in states:
                send.abort_message = "KV transfer to the decode engine failed"
                self.failures += 1
            elif send.abort_message is None and "PROC" in states and now > send.deadline:
                send.abort_message = "KV transfer to the decode engine timed out"
                self.failures += 1
            # Our pages stay ours while a write may still read them (bounded by a second timeout).
            if "PROC" in states and now <= send.deadline + (self.timeout_s if send.abort_message else 0):
                continue
            self._release_handles(send)
            if send.abort_message is not None:
                del self._sends[rid]
                self._abandon(send)  # our writes are over (landed, failed or abandoned)
                self._events.append(SendFailed(send.req, send.abort_message))
            elif send.final_posted:
                del self._sends[rid]
                self.transfers += 1
                nbytes = self.layout.nbytes(len(send.pages or ()))
                self._events.append(Sent(send.req, nbytes, None, None, (send.first_post, time.time())))
            elif send.commit is not None:
                self._finish(send)
        self._remove_forgotten()

    def post_ready(self) -> None:
        """Post the last write (the rest of the pages and the commit) of every prompt whose
        first token and pages are known and whose earlier writes have landed."""
        ready, self._ready = self._ready, {}
        for rid, send in ready.items():
            if self._sends.get(rid) is send and send.abort_message is None and not send.handles:
                assert send.commit is not None
                self._post(send, send.num_pages, send.commit)
                send.final_posted = True

    def take_events(self) -> list[SendEvent]:
        events, self._events = self._events, []
        return events

    def reset(self) -> None:
        """After a failed step dropped every request: forget them (their writes are abandoned)."""
        for send in self._sends.values():
            self._release_handles(send)
        self._sends.clear()
        self._ready.clear()
        self._events.clear()

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _is_nixl(send: _Send) -> bool:
        return send.req.kv_target is not None and send.req.kv_target.transport == "nixl"

    def _finish(self, send: _Send) -> None:
        """The commit and the pages are known: the last write (nixl: due at `post_ready` once the
        earlier ones landed, so the commit's notification comes after all the data) or the bytes
        (grpc)."""
        assert send.commit is not None and send.pages is not None
        if self._is_nixl(send):
            if not send.handles and not send.final_posted:
                self._ready[send.req.rid] = send
            return
        start = time.time()
        payload = self.layout.read_pages(self.own_pages(send.req, send.num_pages)[send.held :])
        self.bytes_sent += len(payload)
        self.transfers += 1
        del self._sends[send.req.rid]
        # The worker carries the bytes on (WriteKv) and ends the transfer's span.
        span = (start, time.time())
        self._events.append(Sent(send.req, len(payload), memoryview(payload), send.commit, span))

    def _post(self, send: _Send, end: int, notif: bytes) -> None:
        assert self.agent is not None and send.req.kv_target is not None and send.pages is not None
        src = self.own_pages(send.req, end)[send.sent_pages :]
        dst = send.pages[send.sent_pages - send.held : end - send.held]
        try:
            send.handles.append(self.agent.write(send.req.kv_target.peer, src, dst, notif))
        except RuntimeError as e:
            send.abort_message = f"KV transfer failed: {e}"
            self.failures += 1
            if not send.handles:  # else poll reports it once the earlier writes are over
                del self._sends[send.req.rid]
                self._abandon(send)
                self._events.append(SendFailed(send.req, send.abort_message))
            return
        self.bytes_sent += self.layout.nbytes(len(src))
        send.first_post = send.first_post or time.time()
        send.sent_pages = end
        send.deadline = time.monotonic() + self.timeout_s

    def _abandon(self, send: _Send) -> None:
        """Tell the decode engine (nixl) that no KV of this request will come; if its pages were
        asked for but are not here yet, tell it when they come (`set_target`)."""
        target = send.req.kv_target
        if self.agent is None or target is None or target.transport != "nixl":
            return  # gRPC bytes land inside the decode engine's commit: nothing to wait out there
        if send.pages is not None:
            self._notify_abandoned(target.peer, send.pages, send.req.rid)
        elif send.asked:
            self._abandoned[send.req.rid] = target.peer
            while len(self._abandoned) > _ABANDONED_KEPT:  # reservations that never came
                self._abandoned.pop(next(iter(self._abandoned)))

    def _notify_abandoned(self, peer: str, pages: list[int], rid: str) -> None:
        """The notice rides a one-page write (our null page 0 into the first of the abandoned
        pages, which the decode engine frees unread): a write's notification needs no progress
        thread to go out, since `poll` drives the write like any other."""
        assert self.agent is not None
        try:
            handle = self.agent.write(peer, [0], pages[:1], KvCommit.abandon(rid).encode())
        except (RuntimeError, KeyError) as e:  # the peer is gone: its lease frees the pages
            logger.warning("could not tell %s that request %s sends no KV: %s", peer, rid, e)
            return
        self._notices.append((handle, time.monotonic() + self.timeout_s, peer))

    def _poll_notices(self, now: float) -> None:
        assert self.agent is not None or not self._notices
        pending = []
        for handle, deadline, peer in self._notices:
            if self.agent.state(handle) == "PROC" and now <= deadline:  # type: ignore[union-attr]
                pending.append((handle, deadline, peer))
                continue
            with contextlib.suppress(Exception):
                self.agent.release(handle)  # type: ignore[union-attr]
        self._notices = pending

    def _release_handles(self, send: _Send) -> None:
        assert self.agent is not None or not send.handles
        for handle in send.handles:
            # A write that never ended may refuse release: nothing more can be done with it.
            with contextlib.suppress(Exception):
                self.agent.release(handle)  # type: ignore[union-attr]
        send.handles = []
