"""Prefill/decode disaggregation inside one engine: the two halves of a KV hand-off.

The decode engine learns of a prompt first (`expect_kv`) but holds no memory for it until the
prefill engine starts computing it: only then does the prefill side ask for pages (just in
time), so decode memory is never held idle while a prompt queues for prefill.

    prefill engine (KvSender)                      decode engine (KvReceiver)
    admitted (target: transport, peer; no pages)   expected (holds nothing)
    first scheduled ── kv_pages_wanted ──(caller)──▶ reserve: pages now, or queued until room
    ◀──────────────── set_kv_target(pages) ─────────  granted: parked, lease starts
    chunks done: full pages stream out (nixl)
    first token: parked; last pages + commit ──────▶ commit (NIXL notification, or bytes +
    writes DONE: release, report "transferred"       record over gRPC): running from token 1

The lease guards liveness, not queueing: it starts when the pages are granted and bounds the
prompt's remaining compute and transfer; a reservation waiting for room has no timer (its
caller aborts it when it gives up). A page a write may still land in is never handed to anyone
else: the prefill side keeps its pages until its writes are DONE or ERR; the decode side keeps
an aborted reservation's pages until the commit arrives or twice the lease has passed (NIXL
only: bytes over gRPC land inside the commit, so those pages are freed at once). A prefill
engine that gives a prompt up tells the decode engine once no write of its can land (an
`aborted` commit record riding a one-page write), which ends that wait at once.

Both halves see narrow pieces of the engine (the pool layout, a page function, callbacks) and
report what they decided as events (`shared/disagg/events.py`) that `EngineCore` acts on.
"""

from __future__ import annotations

from shared.disagg.receiver import KvReceiver
from shared.disagg.sender import KvSender

__all__ = ["KvReceiver", "KvSender"]
