"""What the two halves of the KV hand-off report back to the engine (from `take_events()`).

The sender and the receiver decide; the engine core acts (frees, reports, continues), so
neither half touches the scheduler or the request table itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.scheduler.request import Req
from shared.transfer import KvCommit


@dataclass(frozen=True)
class Sent:
    """Prefill: the prompt's KV is with the decode engine (or in `payload`, gRPC transport):
    report the request as transferred and free its pages."""

    req: Req
    kv_bytes: int
    payload: memoryview | None
    commit: bytes | None  # the commit record the caller delivers (gRPC transport)
    span: tuple[float, float]  # the transfer's (start, end), time.time(), for tracing


@dataclass(frozen=True)
class SendFailed:
    """Prefill: the transfer failed or was aborted, and no write reads our pages any more."""

    req: Req
    message: str


@dataclass(frozen=True)
class Granted:
    """Decode: a queued reservation got its pages (the request is parked, awaiting its KV)."""

    req: Req
    pages: list[int]


@dataclass(frozen=True)
class Arrived:
    """Decode: the reservation's KV is in place; continue from the commit's first token."""

    req: Req
    commit: KvCommit


@dataclass(frozen=True)
class Expired:
    """Decode: the KV did not arrive within the lease after the pages were granted."""

    req: Req
    message: str


@dataclass(frozen=True)
class Released:
    """Decode: an aborted reservation's pages can no longer be written: free them."""

    req: Req


SendEvent = Sent | SendFailed
ReceiveEvent = Granted | Arrived | Expired | Released
