"""Prefill side of the KV hand-off (see the package docstring for the lifecycle)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.scheduler.request import Req
from shared.transfer import KvCommit, KvTarget

if TYPE_CHECKING:
    from shared.engine_core import EngineCore
    from shared.transfer.nixl import NixlAgent


@dataclass
class _Send:
    req: Req
    sent_pages: int = 0  # pages of the prompt already posted
    handles: list[Any] = field(default_factory=list)  # writes in flight
    commit: bytes | None = None  # set at the first token; posted with the last pages
    final_posted: bool = False
    abort_message: str | None = None  # aborted or failed while writes were in flight
    deadline: float = 0.0  # the last post's time + the transfer timeout
    first_post: float = 0.0  # wall clock (time.time()) of the first write posted, for tracing


class KvSender:
    def __init__(self, core: EngineCore, agent: NixlAgent | None, timeout_s: float) -> None:
        self.core = core
        self.agent = agent
        self.timeout_s = timeout_s
        self._sends: dict[str, _Send] = {}  # nixl requests, from admission to release
        self.bytes_sent = 0
        self.transfers = 0
        self.failures = 0

    @property
    def busy(self) -> bool:
        return bool(self._sends)

    def check_target(self, target: KvTarget, prompt_len: int) -> None:
        """Raise ValueError if this engine cannot send a prompt of `prompt_len` tokens there."""
        layout = self.core.layout
        want = self.core.kv.allocator.pages_needed(0, prompt_len)
        if len(target.pages) != want:
            raise ValueError(f"the KV target has {len(target.pages)} pages; the prompt needs {want}")
        layout.check_pages(target.pages)
        if target.transport == "nixl":
            if self.agent is None:
                raise ValueError("this prefill engine has no NIXL agent (kv_transport=grpc)")
            if not self.agent.has_peer(target.peer):
                raise ValueError(f"unknown KV peer {target.peer!r}: add its transfer metadata first")

    def track(self, req: Req) -> None:
        assert req.kv_target is not None
        if req.kv_target.transport == "nixl":
            self._sends[req.rid] = _Send(req)

    # ---- called by the core --------------------------------------------------------------------

    def stream_pages(self) -> None:
        """After a step: post the running requests' pages that the cache now holds for them.

        Only pages below `cached_len` are final (the radix tree locks them for the request);
        pages above it may still be swapped for an identical cached copy and freed.
        """
        for send in self._sends.values():
            req = send.req
            if send.commit is None and send.abort_message is None and req.row is not None:
                ready = req.cached_len // self.core.layout.page_size
                if ready > send.sent_pages:
                    self._post(send, ready, b"")

    def on_first_token(self, req: Req, token: int) -> None:
        """The prompt is done: send what is left with the commit record, then release."""
        commit = KvCommit(
            rid=req.rid,
            first_token=token,
            cached_tokens=req.cached_tokens or 0,
            logprob=req.output_logprobs[0] if req.output_logprobs else None,
            top_logprobs=req.output_top_logprobs[0] if req.output_top_logprobs else None,
        ).encode()
        core = self.core
        assert req.kv_target is not None
        if req.kv_target.transport == "grpc":
            start = time.time()
            payload = core.layout.read_pages(self._own_pages(req))
            self.bytes_sent += len(payload)
            self.transfers += 1
            # The worker's WriteKv carries the bytes on: it ends the transfer's span.
            core.release_prefill(req, len(payload), payload, commit, (start, time.time()))
            return
        send = self._sends[req.rid]
        send.commit = commit
        core.scheduler.park(req)
        if not send.handles:
            self._post(send, self._num_pages(req), commit)
            send.final_posted = True

    def abort(self, req: Req) -> bool:
        """Abort a tracked request; True if it must wait for its writes (the core then waits)."""
        send = self._sends.get(req.rid)
        if send is None or not (send.handles or send.final_posted):
            self._sends.pop(req.rid, None)
            return False
        send.abort_message = send.abort_message or "aborted"
        if req in self.core.scheduler.running:
            self.core.scheduler.park(req)
        return True

    def poll(self) -> None:
        """Advance every write: post the last pages once the others landed, release when done."""
        now = time.monotonic()
        for rid, send in list(self._sends.items()):
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
                self.core.fail_prefill(send.req, send.abort_message)
            elif send.final_posted:
                del self._sends[rid]
                self.transfers += 1
                nbytes = self.core.layout.nbytes(send.sent_pages)
                self.core.release_prefill(send.req, nbytes, None, None, (send.first_post, time.time()))
            elif send.commit is not None:
                self._post(send, self._num_pages(send.req), send.commit)
                send.final_posted = True

    # ---- helpers -------------------------------------------------------------------------------

    def reset(self) -> None:
        """After a failed step dropped every request: forget them (their writes are abandoned)."""
        for send in self._sends.values():
            self._release_handles(send)
        self._sends.clear()

    def _num_pages(self, req: Req) -> int:
        return self.core.kv.allocator.pages_needed(0, len(req.prompt_ids))

    def _own_pages(self, req: Req, end: int | None = None) -> list[int]:
        page_size = self.core.layout.page_size
        n = self._num_pages(req) if end is None else end
        assert req.row is not None
        slots = self.core.kv.req_pool.read(req.row, 0, n * page_size)[::page_size]
        return (slots // page_size).tolist()

    def _post(self, send: _Send, end: int, notif: bytes) -> None:
        assert self.agent is not None and send.req.kv_target is not None
        src = self._own_pages(send.req, end)[send.sent_pages :]
        dst = send.req.kv_target.pages[send.sent_pages : end]
        try:
            send.handles.append(self.agent.write(send.req.kv_target.peer, src, dst, notif))
        except RuntimeError as e:
            send.abort_message = f"KV transfer failed: {e}"
            self.failures += 1
            return
        self.bytes_sent += self.core.layout.nbytes(len(src))
        send.first_post = send.first_post or time.time()
        send.sent_pages = end
        send.deadline = time.monotonic() + self.timeout_s

    def _release_handles(self, send: _Send) -> None:
        assert self.agent is not None or not send.handles
        for handle in send.handles:
            # A write that never ended may refuse release: nothing more can be done with it.
            with contextlib.suppress(Exception):
                self.agent.release(handle)  # type: ignore[union-attr]
        send.handles = []
