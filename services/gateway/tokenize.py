"""POST /tokenize and POST /detokenize, in vLLM's shapes, with the gateway's own tokenizer.

    /tokenize    {"model"?, "prompt", "add_special_tokens"? (true)}
                 or {"model"?, "messages", "add_generation_prompt"? (true), "add_special_tokens"?
                 (false: the template writes them), "tools"?, "chat_template_kwargs"?}
                 -> {"tokens": [...], "count": N, "max_model_len": M (null: unknown)}
                 (+ "token_strs" with "return_token_strs": true)
    /detokenize  {"model"?, "tokens": [...]} -> {"prompt": "..."}

The ids are those a generation request of the same prompt would send to the router (chat:
the same template rendering). Both are bounded like a generation (`limits.py`) and, with API
keys configured, want one like /v1/* (`auth.py`). No router call: the gateway answers alone.
"""

from __future__ import annotations

from typing import Any

from services.gateway.handler import Handler
from services.gateway.limits import check_detokenize, check_tokenize
from services.gateway.protocol import DetokenizeRequest, TokenizeRequest, bad_request


async def tokenize(handler: Handler, req: TokenizeRequest) -> dict[str, Any]:
    """The token ids of a prompt, or of chat messages rendered by the chat template."""
    if req.model is not None:
        handler.check_model(req.model)
    req.check()
    context = handler.model.max_context_len
    check_tokenize(req, handler.limits, context)
    tokenizer = handler.tokenizer
    if req.prompt is not None:
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        tokens = await tokenizer.encode_async(req.prompt, add_special_tokens=add_special)
    else:
        assert req.messages is not None  # req.check()
        add_prompt = True if req.add_generation_prompt is None else req.add_generation_prompt
        text, tokens = await tokenizer.render_chat_async(
            [m.template_dict() for m in req.messages],
            req.template_tools(),
            req.chat_template_kwargs,
            add_generation_prompt=add_prompt,
        )
        if req.add_special_tokens:
            tokens = await tokenizer.encode_async(text, add_special_tokens=True)
    body: dict[str, Any] = {"tokens": tokens, "count": len(tokens), "max_model_len": context}
    if req.return_token_strs:
        body["token_strs"] = tokenizer.token_strings(tokens)
    return body


async def detokenize(handler: Handler, req: DetokenizeRequest) -> dict[str, Any]:
    """The text of token ids (special tokens included, as vLLM's /detokenize)."""
    if req.model is not None:
        handler.check_model(req.model)
    check_detokenize(req, handler.model.max_context_len)
    vocab = handler.tokenizer.vocab_size
    bad = next((t for t in req.tokens if t >= vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": await handler.tokenizer.decode_async(req.tokens)}
