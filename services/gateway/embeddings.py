"""POST /v1/embeddings in OpenAI's shape, answered through the router's `Embed` RPC.

    request   {"model", "input": str | [str] | [int] | [[int]], "encoding_format"?: "float" |
              "base64", "dimensions"?, "user"? (ignored)} plus Tandem's extras "pooling"?
              ("last" | "mean"; default last), "normalize"? (default true),
              "add_special_tokens"? (default true, for text inputs)
    response  {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
              "model", "usage": {"prompt_tokens", "total_tokens"}}

`base64` is the vector's little-endian float32 bytes, as OpenAI sends them (the `openai` SDK
asks for it by default and decodes it). Every input is checked before any work: the count
(`--max-embedding-inputs`), text length (the prompt-character cap), token ids against the
vocabulary and each input's tokens against the context: a 400 naming `input` (or `input[i]`).
With API keys configured it wants one like every /v1/ route (auth.py).
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

import grpc
from pydantic import Field, field_validator

from services.common.errors import param_of
from services.gateway.handler import Handler
from services.gateway.limits import _too_long
from services.gateway.protocol import UINT32_MAX, _TextRequest, are_token_prompts, bad_request, prompt_list
from services.gateway.responses import Metadata
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2

_POOLING = {"last": common_pb2.POOLING_LAST, "mean": common_pb2.POOLING_MEAN}
# vLLM's embedding extras Tandem does not honour: a 400 rather than silently ignored.
_UNSUPPORTED = ("truncate_prompt_tokens", "embed_dtype", "priority")
# Fields the router or engine names that the client knows as `input`.
_INPUT_PARAMS = {"prompt", "token_ids", "text", "inputs"}


class EmbeddingRequest(_TextRequest):
    model: str
    input: Any  # str | list[str] | list[int] | list[list[int]], checked below
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1, le=UINT32_MAX)
    user: str | None = None
    pooling: Literal["last", "mean"] | None = None
    normalize: bool | None = None
    add_special_tokens: bool | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(
                "must be a non-empty string, a non-empty list of strings, of token ids, or of token-id lists"
            )
        if all(isinstance(p, str) and p for p in value):
            return value
        if are_token_prompts(value):
            return value
        raise ValueError(
            "must be a non-empty string, a list of non-empty strings, a non-empty list of token ids"
            " (0 <= id < 2**31) or a list of such lists"
        )

    def inputs(self) -> list[str | list[int]]:
        return prompt_list(self.input)


async def embed(handler: Handler, req: EmbeddingRequest, metadata: Metadata = ()) -> dict[str, Any]:
    """Validate, tokenize, call the router's Embed; the OpenAI response body."""
    handler.check_model(req.model)
    extras = req.model_extra or {}
    for name in _UNSUPPORTED:
        if extras.get(name) is not None:
            raise bad_request(f"'{name}' is not supported by this server", name)
    inputs = req.inputs()
    limits, context = handler.limits, handler.model.max_context_len
    if len(inputs) > limits.max_embedding_inputs:
        raise bad_request(
            f"'input' holds {len(inputs)} inputs; this server accepts at most {limits.max_embedding_inputs}",
            "input",
        )
    single = len(inputs) == 1
    chars_cap = limits.prompt_chars(context)
    vocab = handler.tokenizer.vocab_size
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    token_lists: list[list[int]] = []
    for i, item in enumerate(inputs):
        param = "input" if single else f"input[{i}]"
        if isinstance(item, str):
            if len(item) > chars_cap:
                raise _too_long(f"the input has {len(item)} characters", chars_cap, param)
            ids = await handler.tokenizer.encode_async(item, add_special_tokens=add_special)
        else:
            bad = next((t for t in item if t >= vocab), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param)
            ids = item
        if not ids:
            raise bad_request("the input has no tokens", param)
        if context and len(ids) >= context:
            raise bad_request(
                f"the input has {len(ids)} tokens; this model's context is {context} tokens", param
            )
        token_lists.append(ids)
    options = common_pb2.EmbedOptions(pooling=_POOLING[req.pooling or "last"], dimensions=req.dimensions or 0)
    if req.normalize is not None:
        options.normalize = req.normalize
    request = router_pb2.EmbedRequest(
        model="",  # the gateway's name may be an alias: the router serves one model
        inputs=[router_pb2.EmbedInput(token_ids=ids) for ids in token_lists],
        options=options,
    )
    try:
        answer = await handler.stub.Embed(request, timeout=handler.request_timeout, metadata=metadata or None)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            at = param_of(e)
            raise bad_request(
                e.details() or "invalid request", "input" if at in _INPUT_PARAMS else at
            ) from None
        raise
    b64 = req.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": e.index,
            "embedding": _base64(e.values) if b64 else list(e.values),
        }
        for e in answer.embeddings
    ]
    tokens = answer.usage.prompt_tokens
    return {
        "object": "list",
        "data": data,
        "model": handler.model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _base64(values: Any) -> str:
    """Little-endian float32 bytes, base64: what OpenAI sends for encoding_format=base64."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
