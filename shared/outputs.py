"""What the engine reports per request and step (light: no torch, so I/O processes import it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.scheduler.request import Req


@dataclass
class RequestOutput:
    """What one step produced for one request (increments since the previous output)."""

    rid: str
    new_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    new_logprobs: list[float] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    # An embedding request's final output: the pooled vector (shared/pooling.py).
    embedding: list[float] | None = None
    # Prefill engine, on the final output: bytes written to the decode engine; with the gRPC
    # transport also the pages themselves and the commit record for the caller to deliver.
    kv_bytes: int = 0
    kv_payload: memoryview | None = None
    kv_commit: bytes | None = None
    # Prefill engine, on the final output: when the transfer's first page write was posted and
    # when the last one completed (wall-clock seconds, time.time(), so the worker can place
    # them on a trace; 0 = not timed). gRPC transport: the engine's read of the pages.
    kv_transfer_start: float = 0.0
    kv_transfer_end: float = 0.0
    # Prefill engine, before any other output: the prompt starts computing and its KV needs
    # this many pages of the decode engine (just-in-time reservation); the caller answers
    # with `set_kv_target`.
    kv_pages_wanted: int = 0

    @classmethod
    def since_reported(cls, req: Req) -> RequestOutput | None:
        """What `req` has to report since its last output (tokens, text short of a possible stop
        string, logprobs; the end), or None when nothing is new; marks it reported."""
        n_ids = req.num_output_tokens
        new_ids = req.output_ids[req.reported_ids : n_ids]
        new_text = req.text[req.reported_text :]
        if not new_ids and not new_text and not req.finished:
            return None
        out = cls(
            rid=req.rid,
            new_ids=new_ids,
            new_text=new_text,
            finished=req.finished,
            finish_reason=req.finish_reason.to_dict() if req.finish_reason else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=n_ids,
            cached_tokens=req.cached_tokens or 0,
            new_logprobs=req.output_logprobs[req.reported_ids :],
            new_top_logprobs=req.output_top_logprobs[req.reported_ids :],
            embedding=req.embedding,
        )
        req.reported_ids, req.reported_text = n_ids, len(req.text)
        return out

    def then(self, later: RequestOutput) -> RequestOutput:
        """This increment followed by a later one of the same request, as one increment."""
        return replace(
            later,
            new_ids=self.new_ids + later.new_ids,
            new_text=self.new_text + later.new_text,
            new_logprobs=self.new_logprobs + later.new_logprobs,
            new_top_logprobs=self.new_top_logprobs + later.new_top_logprobs,
        )
