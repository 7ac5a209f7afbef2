"""Request-size limits of the gateway, checked before any expensive work.

    bytes      `SizeLimits` (ASGI middleware): Content-Length and the bytes read -> 413; a body not
               complete within the read timeout -> 408; both close the connection
    headers    a header block over `max_header_bytes` -> 431: `http.GatewayH11Protocol` when it
               is still arriving (h11's buffer limit), `SizeLimits` when it came in one read
    fields     `check_completion` / `check_chat` / `check_tokenize`, before templating or
               tokenizing: prompt characters, prompts x n, stop lists, tools, constraint text;
               `check_detokenize`: token count -> 400 naming the field

A prompt's characters are capped because tokenizing is the first thing that grows with the
prompt: an HF tokenizer's `encode` cannot be interrupted once a thread runs it (it keeps running
after its client left), and holds a few hundred bytes per character while it does. No tokenizer
averages near 16 characters per token on real text (English runs at ~4), so a prompt longer than
16 characters per context token cannot fit the context anyway: that is the default cap (at
least 64 Ki characters; 4 Mi when the context is unknown; `RequestLimits.prompt_chars`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.args import UNKNOWN_CONTEXT_PROMPT_CHARS, RequestLimits
from services.gateway.constraints import requested_constraints
from services.gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    bad_request,
)

_Request = CompletionRequest | ChatCompletionRequest


def check_completion(req: CompletionRequest, limits: RequestLimits, context: int | None) -> None:
    """Size checks of a /v1/completions request (a 400 naming the field); before tokenizing."""
    _check_common(req, limits, len(req.prompts()))
    cap = limits.prompt_chars(context)
    for i, prompt in enumerate(req.prompts()):
        if isinstance(prompt, str) and len(prompt) > cap:
            param = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
            raise _too_long(f"the prompt has {len(prompt)} characters", cap, param)


def check_chat(req: ChatCompletionRequest, limits: RequestLimits, context: int | None) -> None:
    """Size checks of a /v1/chat/completions request (a 400 naming the field); before templating."""
    _check_common(req, limits, 1)
    tools = req.tools or []
    if len(tools) > limits.max_tools:
        raise bad_request(f"'tools' may hold at most {limits.max_tools} tools, got {len(tools)}", "tools")
    tools_chars = sum(len(json.dumps(t.model_dump(exclude_none=True))) for t in tools)
    if tools_chars > limits.max_tools_chars:
        raise bad_request(
            f"'tools' is too large: {tools_chars} characters of JSON, the limit is {limits.max_tools_chars}",
            "tools",
        )
    _check_chat_chars(req.messages, tools_chars, req.chat_template_kwargs, limits.prompt_chars(context))


def check_tokenize(req: TokenizeRequest, limits: RequestLimits, context: int | None) -> None:
    """Size checks of a /tokenize request (a 400 naming the field), as a generation's prompt."""
    cap = limits.prompt_chars(context)
    if req.prompt is not None and len(req.prompt) > cap:
        raise _too_long(f"the prompt has {len(req.prompt)} characters", cap, "prompt")
    tools = req.tools or []
    if len(tools) > limits.max_tools:
        raise bad_request(f"'tools' may hold at most {limits.max_tools} tools, got {len(tools)}", "tools")
    tools_chars = sum(len(json.dumps(t.model_dump(exclude_none=True))) for t in tools)
    _check_chat_chars(req.messages or [], tools_chars, req.chat_template_kwargs, cap)


def check_detokenize(req: DetokenizeRequest, context: int | None) -> None:
    """A /detokenize request holds at most a context's tokens (4 Mi when the context is unknown):
    no generation is longer."""
    cap = context or UNKNOWN_CONTEXT_PROMPT_CHARS
    if len(req.tokens) > cap:
        raise bad_request(f"'tokens' holds {len(req.tokens)} tokens, more than the context ({cap})", "tokens")


def _check_chat_chars(
    messages: list[ChatMessage], tools_chars: int, template_kwargs: dict[str, Any] | None, cap: int
) -> None:
    chars = sum(_message_chars(m) for m in messages) + tools_chars
    if template_kwargs:
        chars += len(json.dumps(template_kwargs))
    if chars > cap:
        raise _too_long(f"the messages (and tools) have {chars} characters", cap, "messages")


def _check_common(
    req: CompletionRequest | ChatCompletionRequest, limits: RequestLimits, prompts: int
) -> None:
    samples = prompts * (req.n or 1)
    if samples > limits.max_samples:
        param = "n" if prompts == 1 else "prompt"
        raise bad_request(
            f"the request asks for {samples} samples ({prompts} prompts x n={req.n or 1}); "
            f"the limit is {limits.max_samples}",
            param,
        )
    stops = req.stop_list
    if len(stops) > limits.max_stop:
        raise bad_request(f"'stop' may hold at most {limits.max_stop} strings, got {len(stops)}", "stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise bad_request(
            f"stop strings may have at most {limits.max_stop_chars} characters, got one of {longest}", "stop"
        )
    for constraint in requested_constraints(req):  # response_format, regex, ebnf, vLLM's guided_*
        size = len(constraint.value)
        if size > limits.max_constraint_chars:
            raise bad_request(
                f"{constraint.param} is too large: {size} characters, the limit is "
                f"{limits.max_constraint_chars}",
                constraint.param,
            )


def _message_chars(message: ChatMessage) -> int:
    calls = message.tool_calls or []
    return len(message.text()) + sum(len(c.function.arguments) + len(c.function.name) for c in calls)


def _too_long(what: str, cap: int, param: str) -> OpenAIError:
    return bad_request(
        f"{what}, more than this server accepts ({cap}); it could not fit the model's context. "
        "Please shorten the prompt.",
        param,
    )


class SizeLimits:
    """ASGI middleware: checks the header block's size (431), then reads a request's whole body
    under a size cap and a deadline and hands it to the app. Over the cap: 413; not complete in
    time: 408 (a client trickling its body holds no connection longer than that). Each closes
    the connection."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # "k: v\r\n"
            if header_bytes > self.limits.max_header_bytes:
                limit = self.limits.max_header_bytes
                await _reject(
                    send, 431, f"the request's header block is larger than the limit of {limit} bytes"
                )
                return
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        cap = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            await _reject(send, 413, f"the request body has {int(declared)} bytes; the limit is {cap}")
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_read_timeout
        more = True
        while more:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                timeout = self.limits.body_read_timeout
                await _reject(send, 408, f"the request body did not arrive within {timeout:g} s")
                return
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > cap:
                await _reject(send, 413, f"the request body has more than {cap} bytes; the limit is {cap}")
                return
            chunks.append(body)
            more = message.get("more_body", False)
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()  # after the body: the disconnect the server watches for

        await self.app(scope, replay, send)


async def _reject(send: Send, status: int, message: str) -> None:
    body = json.dumps(OpenAIError(status, message).body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
