"""Grammar-constrained decoding with xgrammar (JSON schema, regex, EBNF, structural tags).

`GrammarCompiler` turns a request's constraint into a compiled grammar off the scheduler's
thread (checked at once, compiled on a pool, cached); `RequestGrammar` is one request's state;
`TokenMasks` builds the batch's allowed-token bitmask each step and `apply_token_bitmask`
applies it to the logits before sampling. The engine core wires them in (shared/engine_core.py).
"""

from shared.constrained.grammar import GrammarCompiler, parser_message
from shared.constrained.matcher import (
    RequestGrammar,
    TokenMasks,
    apply_token_bitmask,
    apply_token_bitmask_reference,
)

__all__ = [
    "GrammarCompiler",
    "RequestGrammar",
    "TokenMasks",
    "apply_token_bitmask",
    "apply_token_bitmask_reference",
    "parser_message",
]
