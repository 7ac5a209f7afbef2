"""A request as the scheduler sees it: tokens, KV ownership, sampling state and output.

KV ownership of a running request (row = its row in req_to_token):

    token index   0 ............ cached_len ............ kv_len ........ len(all_ids)
    req_to_token  | radix-tree slots | private slots       |  (no KV yet)  |
                  ^ locked via last_node  ^ the request owns these pages

`cached_len` is always page-aligned, so the private region starts on a page boundary and the
request owns its private pages whole. The tokens still to compute are all_ids[kv_len:]: a whole
prompt at first, a chunk of it under chunked prefill, exactly one token (the last sampled) in
decode. A retracted request keeps its output and re-computes prompt + output when readmitted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.constrained import RequestGrammar
    from shared.detokenizer import IncrementalDetokenizer, StopStringMatcher
    from shared.mem import TreeNode
    from shared.pooling import PartialSum, PoolingParams
    from shared.sampling import SamplingParams
    from shared.transfer import KvTarget


PENDING = -1  # an output token still on the device (never a vocabulary id)


class FinishKind(enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # aborted by the caller or refused
    TRANSFERRED = "transferred"  # prefill engine: the prompt's KV went to a decode engine


@dataclass(frozen=True)
class FinishReason:
    kind: FinishKind
    matched: int | str | None = None  # the stop token id or stop string
    message: str | None = None  # why an abort happened

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind.value}
        if self.matched is not None:
            out["matched"] = self.matched
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]  # tokens that finish the request (eos unless ignore_eos, + stop_token_ids)
    arrival: int  # admission order, for FCFS and for choosing whom to retract
    return_logprob: bool = False
    top_logprobs_num: int = 0
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    # No stop string may end within `decoded[:stop_search_from]`: the text decoded while the
    # request was short of its `min_new_tokens` (shared/scheduler/stopping.py).
    stop_search_from: int = 0
    leader: Req | None = None  # n > 1: siblings wait for the leader's prompt KV to be cached
    grammar: RequestGrammar | None = None  # the output constraint (shared/constrained)
    # An embedding request (shared/pooling.py): runs its prompt, samples nothing, finishes with
    # `embedding`; `pool_partial` carries mean pooling's running sum between prefill chunks.
    pooling: PoolingParams | None = None
    pool_partial: PartialSum | None = None
    embedding: list[float] | None = None

    output_ids: list[int] = field(default_factory=list)
    # Overlap scheduling: the last `pending` entries of output_ids are placeholders (PENDING) for
    # tokens sampled on the device whose values the host has not read yet (see EngineCore.step).
    pending: int = 0
    row: int | None = None  # row in req_to_token while running
    kv_len: int = 0
    cached_len: int = 0
    last_slot: int | None = None  # slot of token kv_len - 1 (host copy, so extend needs no sync)
    last_node: TreeNode | None = None
    cached_tokens: int | None = None  # prompt tokens served from the cache at first admission
    finish_reason: FinishReason | None = None
    num_retractions: int = 0

    # Disaggregation (see shared/disagg): a prefill request's destination, or a decode
    # reservation whose KV is still to arrive.
    kv_target: KvTarget | None = None
    # decode: the reserved pages, in prompt order, for the prompt after its cached prefix
    kv_pages: list[int] | None = None
    awaiting_kv: bool = False
    kv_deadline: float = 0.0  # time.monotonic() by which the KV must arrive / be sent
    kv_lease_s: float = 0.0  # decode: how long the reservation waits for room, then for its KV

    # Output produced since the last report to the caller.
    decoded: str = ""  # all text decoded so far (may end in a possible stop-string prefix)
    text: str = ""  # the part of `decoded` released to the caller (stop strings cut)
    reported_ids: int = 0
    reported_text: int = 0
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens whose K/V is still to be computed before the next token can be sampled."""
        return self.seq_len - self.kv_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_done(self) -> bool:
        """The prompt ran and its first token was read (its KV is then in the cache)."""
        return len(self.output_ids) > self.pending or self.finished

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens the host knows (placeholders excluded)."""
        return len(self.output_ids) - self.pending
