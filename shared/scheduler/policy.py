"""The order in which waiting requests are considered for admission."""

from __future__ import annotations

from shared.config import SchedulePolicy
from shared.scheduler.kv_manager import KVCacheManager
from shared.scheduler.request import Req

# Past this many waiting requests, matching every one against the tree costs more than it saves.
_LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: SchedulePolicy, kv: KVCacheManager) -> list[Req]:
    """FCFS: by arrival. LPM (longest prefix match): most cached tokens first, ties by arrival,
    so requests that share a prefix run together while it is still in the cache."""
    by_arrival = sorted(waiting, key=lambda r: r.arrival)
    if policy == "fcfs" or len(waiting) > _LPM_MAX_QUEUE or kv.cache is None:
        return by_arrival
    matched = {id(r): len(m.slots) if (m := kv.match(r)) is not None else 0 for r in by_arrival}
    return sorted(by_arrival, key=lambda r: -matched[id(r)])
