"""Prefill/decode disaggregation inside one engine: the two halves of a KV hand-off.

Prefill engine (`KvSender`): runs the prompt like any request, samples the first token, then
sends the prompt's pages into the decode engine's reservation and only then releases them:

    running --(chunk done: its full pages go out early, nixl)--> running
    running --(first token)--> parked: last pages + commit record --> DONE: release, report

Decode engine (`KvReceiver`): reserves pages for a prompt, waits for the commit record (NIXL
notification, or bytes + record from the gRPC transport), then runs the request from the
first token like any other:

    (queued while full, first come first served, up to the lease)
    reserve --> parked (awaiting_kv, leased) --(commit)--> running
                   '--(abort / lease expiry)--> quarantined until the write is over --> freed

A page a write may still land in is never handed to anyone else: the prefill side keeps its
pages until its writes are DONE or ERR; the decode side keeps an aborted reservation's pages
until the commit arrives or twice the transfer timeout has passed.
"""

from __future__ import annotations

from shared.disagg.receiver import KvReceiver
from shared.disagg.sender import KvSender

__all__ = ["KvReceiver", "KvSender"]
