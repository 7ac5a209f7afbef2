"""OpenAI <-> router conversion: the gateway's role logic.

One request's life here:

    prepare_completion / prepare_chat   model check, OpenAI checks, size limits (`limits.py`),
                                        output constraint (response format, regex, ebnf, guided_*,
                                        tools), chat template, tokenize,
                                        context-length checks -> a `Job` of GenerateRequests
    complete(job, calls)                one router `Generate` per prompt, merged; increments are
      or stream(job, calls)             folded into one response, or turned into chunk dicts

Choice `prompt_idx * n + sample_idx` collects sample `sample_idx` of prompt `prompt_idx`. The
server owns `RouterCalls` and cancels every open call when the client goes away or an error
ends the request; errors are raised (`OpenAIError`, `grpc.aio.AioRpcError`) and mapped there.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.convert import SAMPLING_SCALARS
from services.common.streams import merge
from services.gateway.args import RequestLimits
from services.gateway.constraints import (
    Constraint,
    rejected_constraint,
    requested_constraints,
    single_constraint,
)
from services.gateway.limits import check_chat, check_completion
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request
from services.gateway.reasoning import after_reasoning, reasoning_format, starts_inside, template_kwargs
from services.gateway.responses import Job, Metadata, Reasoning, ResponseBuilder
from services.gateway.tokenizer import Tokenizer
from services.gateway.tool_calls.formats import tool_call_format
from services.gateway.tool_calls.output import ToolParsing
from services.gateway.tool_calls.request import resolve_tools
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Request fields named as in the proto; the token limits are mapped one by one (their OpenAI
# names differ and the gateway clamps them to the context).
_SAMPLING_FIELDS = tuple(f for f in SAMPLING_SCALARS if f not in ("max_new_tokens", "min_new_tokens"))


@dataclass(frozen=True)
class ServedModel:
    """The model this gateway serves: the public id and what the router told us about it."""

    name: str
    max_context_len: int | None = None  # None: unknown, no context checks
    created: int = field(default_factory=lambda: int(time.time()))


class RouterCalls:
    """The router calls one HTTP request opened. `cancel_all` is idempotent and synchronous, so it
    is safe in `finally` blocks of cancelled tasks."""

    def __init__(self) -> None:
        self._calls: list[grpc.aio.UnaryStreamCall] = []

    def track(self, call: grpc.aio.UnaryStreamCall) -> grpc.aio.UnaryStreamCall:
        self._calls.append(call)
        return call

    def cancel_all(self) -> None:
        for call in self._calls:
            call.cancel()  # a no-op on a finished call


class Handler:
    """Turns OpenAI requests into router calls and router increments into OpenAI responses."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stub: router_pb2_grpc.RouterServiceStub,
        model: ServedModel,
        request_timeout: float | None,
        tool_call_parser: str = "auto",
        limits: RequestLimits | None = None,
        reasoning_parser: str = "off",
    ) -> None:
        self.tokenizer = tokenizer
        self.stub = stub
        self.model = model  # replaced by the server when it learns the context length later
        self.request_timeout = request_timeout
        self.limits = limits or RequestLimits()
        # How this model writes tool calls ("auto": told by its chat template).
        self.tool_format = tool_call_format(tool_call_parser, tokenizer.chat_template)
        # Where the model writes its reasoning (None: no split, all is content).
        self.reasoning = reasoning_format(reasoning_parser, tokenizer.chat_template)

    # ---- preparing: validation, templating, tokenization --------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.model.name:
            raise OpenAIError(
                404, f"The model '{name}' does not exist", param="model", code="model_not_found"
            )

    async def prepare_completion(
        self, req: CompletionRequest, metadata: Metadata = (), request_id: str | None = None
    ) -> Job:
        """Validate and tokenize a /v1/completions request (`request_id`: the response's `id`
        is `cmpl-<it>`; None: a fresh one)."""
        self.check_model(req.model)
        req.check()
        check_completion(req, self.limits, self.model.max_context_len)
        constraint = single_constraint(requested_constraints(req))
        n = req.n or 1
        requests: list[router_pb2.GenerateRequest] = []
        echo_texts: list[str] = []
        prompts = req.prompts()
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                special = True if req.add_special_tokens is None else req.add_special_tokens
                token_ids = await self.tokenizer.encode_async(prompt, add_special_tokens=special)
                text = prompt
            else:
                self._check_token_ids(prompt)
                token_ids, text = prompt, ""
            if not token_ids:
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                raise bad_request(f"'{where}' is empty: it has no tokens to continue from", where)
            max_new = self._max_new_tokens(
                len(token_ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt"
            )
            requests.append(
                self._generate_request(req, token_ids, text, n, max_new, req.logprobs, constraint)
            )
            if req.echo:
                echo_texts.append(text or self.tokenizer.decode(token_ids))
            else:
                echo_texts.append("")
        return Job(
            kind="completion",
            id=f"cmpl-{request_id or uuid.uuid4().hex}",
            model=self.model.name,
            n=n,
            requests=requests,
            echo_texts=echo_texts,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs or 0,
            include_usage=req.include_usage,
            metadata=metadata,
            constraint=constraint,
        )

    async def prepare_chat(
        self, req: ChatCompletionRequest, metadata: Metadata = (), request_id: str | None = None
    ) -> Job:
        """Validate, render the chat template and tokenize a /v1/chat/completions request."""
        self.check_model(req.model)
        req.check()
        check_chat(req, self.limits, self.model.max_context_len)
        tools = resolve_tools(req)
        candidates = requested_constraints(req)
        tool_parsing = None
        # No tag (no tools, or tool_choice "none"): the output is neither constrained nor parsed.
        tag = self.tool_format.structural_tag(tools) if tools is not None else None
        if tools is not None and tag is not None:
            candidates.insert(0, Constraint("structural_tag", json.dumps(tag), "tools"))
            tool_parsing = ToolParsing(self.tool_format, tools.names, tools.parameters)
        constraint = single_constraint(candidates)
        n = req.n or 1
        kwargs = template_kwargs(req.reasoning_effort, req.chat_template_kwargs, self.tokenizer.chat_template)
        text, token_ids = await self.tokenizer.render_chat_async(
            req.template_messages(), req.template_tools(), kwargs
        )
        reasoning = None
        if self.reasoning is not None:
            reasoning = Reasoning(self.reasoning, starts_inside(self.reasoning, text))
            if constraint is not None:  # the constraint applies once the reasoning is over
                constraint = after_reasoning(constraint, reasoning.inside)
        user_max = req.max_new_tokens()
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        # OpenAI's chat default is "until the context ends".
        max_new = self._max_new_tokens(len(token_ids), user_max, None, "messages", param)
        top = (req.top_logprobs or 0) if req.logprobs else None  # None: no logprobs at all
        request = self._generate_request(req, token_ids, text, n, max_new, top, constraint)
        return Job(
            kind="chat",
            id=f"chatcmpl-{request_id or uuid.uuid4().hex}",
            model=self.model.name,
            n=n,
            requests=[request],
            echo_texts=[""],
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
            include_usage=req.include_usage,
            metadata=metadata,
            tool_parsing=tool_parsing,
            constraint=constraint,
            reasoning=reasoning,
        )

    def _check_token_ids(self, token_ids: Sequence[int]) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", "prompt")

    def _max_new_tokens(
        self,
        prompt_len: int,
        user_max: int | None,
        default: int | None,
        prompt_param: str,
        max_param: str = "max_tokens",
    ) -> int | None:
        context = self.model.max_context_len
        if not context:
            return user_max if user_max is not None else default
        if prompt_len >= context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens, but the prompt has "
                f"{prompt_len} tokens. Please shorten the prompt.",
                prompt_param,
            )
        room = context - prompt_len
        if user_max is None:
            return room if default is None else min(default, room)
        if user_max > room:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + user_max} tokens ({prompt_len} in the prompt, {user_max} for the "
                "completion). Please reduce the prompt or the completion length.",
                max_param,
            )
        return user_max

    @staticmethod
    def _generate_request(
        req: CompletionRequest | ChatCompletionRequest,
        token_ids: list[int],
        text: str,
        n: int,
        max_new_tokens: int | None,
        top_logprobs: int | None,
        constraint: Constraint | None,
    ) -> router_pb2.GenerateRequest:
        params = common_pb2.SamplingParams()
        # proto3 `optional`: only what the user gave is set, the worker applies the defaults.
        for name in _SAMPLING_FIELDS:
            value = getattr(req, name)
            if value is not None:
                setattr(params, name, value)
                # The wire's floats are 32-bit: 1e-300 would arrive as 0.0, 1e308 as inf.
                sent = getattr(params, name)
                if isinstance(value, float) and value != 0 and (sent == 0 or math.isinf(sent)):
                    raise bad_request(f"'{name}' {value!r} is outside the range of a 32-bit float", name)
        if max_new_tokens is not None:
            params.max_new_tokens = max_new_tokens
        if req.min_tokens is not None:
            # Given max_tokens, check() compared them; here also the default and the context's room.
            if max_new_tokens is not None and req.min_tokens > max_new_tokens:
                raise bad_request(
                    f"'min_tokens' ({req.min_tokens}) must not exceed the maximum tokens ({max_new_tokens}, "
                    "the default or what the context leaves when max_tokens is not given)",
                    "min_tokens",
                )
            params.min_new_tokens = req.min_tokens
        params.stop.extend(req.stop_list)
        params.stop_token_ids.extend(req.stop_token_ids or [])
        if constraint is not None:
            setattr(params, constraint.field, constraint.value)
        return router_pb2.GenerateRequest(
            text=text,
            token_ids=token_ids,
            sampling_params=params,
            n=n,
            return_logprob=top_logprobs is not None,
            top_logprobs_num=top_logprobs or 0,
        )

    # ---- running: router calls, merged -------------------------------------------------------

    async def _events(self, job: Job, calls: RouterCalls) -> AsyncIterator[tuple[int, common_pb2.Output]]:
        """(choice index, increment) from every router call of `job`, in arrival order."""
        opened = [
            calls.track(self.stub.Generate(r, timeout=self.request_timeout, metadata=job.metadata or None))
            for r in job.requests
        ]
        finished = [False] * job.num_choices
        try:
            async for prompt_idx, response in merge(opened):
                output = response.output
                if output.index >= job.n:
                    raise OpenAIError(
                        500, f"router sent sample {output.index} of n={job.n}", type="server_error"
                    )
                choice = prompt_idx * job.n + output.index
                finished[choice] = finished[choice] or output.HasField("finish")
                yield choice, output
        except grpc.aio.AioRpcError as exc:
            error = rejected_constraint(exc, job.constraint)
            if error is None:
                raise
            raise error from exc
        finally:
            calls.cancel_all()
        if not all(finished):
            raise OpenAIError(
                502, "the router's stream ended before every sample finished", type="server_error"
            )

    async def complete(self, job: Job, calls: RouterCalls) -> dict[str, Any]:
        """Run `job` to the end and answer with one OpenAI response body."""
        builder = ResponseBuilder(job, self.tokenizer)
        async for idx, output in self._events(job, calls):
            builder.add(idx, output)
        return builder.response()

    async def stream(self, job: Job, calls: RouterCalls) -> AsyncGenerator[dict[str, Any], None]:
        """Run `job`, yielding OpenAI stream chunks (the server adds `data: [DONE]`).

        Nothing is yielded before the router's first increment, so a caller that awaits the first
        chunk learns of early router errors while it can still answer with an HTTP status.
        """
        builder = ResponseBuilder(job, self.tokenizer)
        async for idx, output in self._events(job, calls):
            for chunk in builder.chunks(idx, output):
                yield chunk
        if job.include_usage:
            yield builder.usage_chunk()
