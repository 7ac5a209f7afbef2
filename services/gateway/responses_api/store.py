"""Stored responses: what `previous_response_id` continues and `GET /v1/responses/{id}` returns.

A bounded least-recently-used map in this gateway's memory (`--responses-store-size` entries; 0
keeps none). It is per replica: behind a load balancer a follow-up must reach the replica that
answered the response it names (or it is a 404), and a restart forgets them all.

An entry holds the response as it was sent and its whole conversation as input items (the input
it answered, then its output; `instructions` are not carried over, as OpenAI does). A follow-up's
conversation shares the item objects of the one it continues, so a chain of N responses costs N
tuples of references, not N copies of the text. Every conversation passed the prompt-size checks
when it was answered, so each entry is bounded too.

The gateway serves requests on one event loop and these methods never await: no lock is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.gateway.responses_api.request import InputItem


@dataclass(frozen=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as sent
    conversation: tuple[InputItem, ...]  # input then output items, for a follow-up


class ResponseStore:
    """At most `capacity` responses by id, the least recently used dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry (now the most recently used), None when unknown or dropped."""
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        """Forget the entry; False when there was none."""
        return self._entries.pop(response_id, None) is not None
