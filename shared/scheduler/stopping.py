"""When a request stops, decided after each of its new tokens; and its text up to the stop.

After a token, in this order (the first that holds ends the request):

    grammar   the token broke its grammar (cannot happen: the sampler masks): ABORT
    stop id   an EOS or `stop_token_ids` token, once `min_new_tokens` are out: STOP (matched id)
    stop str  the detokenized text now holds a stop string, once `min_new_tokens` are out: STOP
              (matched string); the text is cut before it (or after it, with `no_stop_trim`).
              A stop string wholly inside the text of the first `min_new_tokens` tokens stays in
              the text; one that ends after it counts (vLLM's and SGLang's rule)
    grammar   the grammar has terminated (a complete JSON value, ...): STOP
    length    `max_new_tokens` out, or the context is full: LENGTH

`req.text` is what may be reported: the decoded text short of a possible stop string's start
(`StopStringMatcher.safe_len`), all of it once the request finished.
"""

from __future__ import annotations

import logging

from shared.scheduler.request import FinishKind, FinishReason, Req

logger = logging.getLogger(__name__)


def stop_after(req: Req, token: int, max_context_len: int) -> FinishReason | None:
    """Why `req` stops now that `token` is its newest output (already in `req.output_ids`), or
    None; detokenizes the token and moves `req.text` on as it goes."""
    params = req.params
    reason: FinishReason | None = None
    grammar = req.grammar
    if grammar is not None and not grammar.accept(token):  # masked out: cannot happen
        logger.error("request %s: token %d is not allowed by its %s", req.rid, token, grammar.kind)
        reason = FinishReason(FinishKind.ABORT, message=f"token {token} broke the {grammar.kind}")
    elif token in req.stop_ids and req.num_output_tokens >= params.min_new_tokens:
        reason = FinishReason(FinishKind.STOP, matched=token)
    else:
        assert req.detokenizer is not None
        req.decoded += req.detokenizer.add([token])
        reason = stop_string(req)
        if reason is None and grammar is not None and grammar.terminated:
            reason = FinishReason(FinishKind.STOP, matched=token)
    known_len = len(req.prompt_ids) + req.num_output_tokens
    if reason is None and (req.num_output_tokens >= params.max_new_tokens or known_len >= max_context_len):
        reason = FinishReason(FinishKind.LENGTH)
    return reason


def final_reason(req: Req, reason: FinishReason) -> FinishReason:
    """`req` finishes for `reason`: the rest of its text (the detokenizer's held-back bytes) is
    decoded, and a stop string found in it wins, unless a stop string already ended it."""
    if reason.kind == FinishKind.STOP and isinstance(reason.matched, str):
        return reason
    assert req.detokenizer is not None
    req.decoded += req.detokenizer.flush()
    return stop_string(req, final=True) or reason


def stop_string(req: Req, final: bool = False) -> FinishReason | None:
    """A stop string in `req.decoded` past the text reported so far (and past
    `req.stop_search_from`): STOP, with `req.text` cut there. Otherwise None, with `req.text`
    advanced as far as no stop string can still start (all of it when `final`). Short of
    `min_new_tokens`, none may end in the text decoded so far."""
    matcher = req.stop_matcher
    if matcher is None:
        req.text = req.decoded
        return None
    if req.num_output_tokens < req.params.min_new_tokens:
        req.stop_search_from = len(req.decoded)
    hit = matcher.find(req.decoded, max(len(req.text), req.stop_search_from))
    if hit is not None:
        start, stop = hit
        req.text = req.decoded[: start + len(stop)] if req.params.no_stop_trim else req.decoded[:start]
        return FinishReason(FinishKind.STOP, matched=stop)
    req.text = req.decoded if final else req.decoded[: matcher.safe_len(req.decoded)]
    return None
