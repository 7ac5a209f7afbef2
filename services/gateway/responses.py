"""Router increments -> OpenAI response bodies and stream chunks.

A `Job` is a validated, tokenized request; a `ResponseBuilder` folds the router's per-sample
increments into OpenAI's shapes for it. Choice `prompt_idx * n + sample_idx` is sample
`sample_idx` of prompt `prompt_idx`, so the n samples of a prompt sit next to each other.
A chat job with tools parses each choice's text into `tool_calls` (see `tool_calls/output.py`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.gateway.constraints import Constraint
from services.gateway.protocol import OpenAIError
from services.gateway.reasoning import ReasoningFormat, ReasoningSplitter, split_reasoning
from services.gateway.tokenizer import Tokenizer
from services.gateway.tool_calls.output import ToolCallStream, ToolParsing, parse_message
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2

Metadata = tuple[tuple[str, str], ...]
Chunk = dict[str, Any]

_FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class Reasoning:
    """A chat job's reasoning split: the format, and whether the output begins inside it."""

    format: ReasoningFormat
    inside: bool

    def splitter(self) -> ReasoningSplitter:
        return ReasoningSplitter(self.format, self.inside)


@dataclass
class Job:
    """A validated, tokenized request: one GenerateRequest per prompt, and how to answer it."""

    kind: Literal["completion", "chat"]
    id: str
    model: str
    n: int
    requests: list[router_pb2.GenerateRequest]
    echo_texts: list[str]  # per prompt: text put in front of the first delta ("" without echo)
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    metadata: Metadata = ()  # forwarded to the router (W3C trace context)
    tool_parsing: ToolParsing | None = None  # chat with tools: parse calls out of the text
    constraint: Constraint | None = None  # the output constraint, to name its field in errors
    reasoning: Reasoning | None = None  # chat with --reasoning-parser: split reasoning_content off
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.n


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: common_pb2.Usage | None = None
    text_len: int = 0  # characters streamed so far, for completions' text_offset
    started: bool = False
    tool_stream: ToolCallStream | None = None  # streamed chat with tools
    reasoning: ReasoningSplitter | None = None  # streamed chat with a reasoning parser


def finish_reason(output: common_pb2.Output) -> str | None:
    """OpenAI's finish_reason of an increment (None before the last); raises on abort."""
    if not output.HasField("finish"):
        return None
    finish = output.finish
    if finish.reason == common_pb2.FINISH_REASON_ABORT:
        reason = finish.message or "no reason given"
        raise OpenAIError(500, f"generation aborted: {reason}", type="server_error")
    return _FINISH_REASONS.get(finish.reason, "stop")


class ResponseBuilder:
    """Accumulates one job's increments: `add` + `response()` for a whole body, `chunks` for SSE."""

    def __init__(self, job: Job, tokenizer: Tokenizer) -> None:
        self.job = job
        self._tokenizer = tokenizer
        self._choices = [_Choice() for _ in range(job.num_choices)]
        obj = {"chat": "chat.completion", "completion": "text_completion"}[job.kind]
        self._head = {"id": job.id, "object": obj, "created": job.created, "model": job.model}
        self._streamed_any = False

    def add(self, idx: int, output: common_pb2.Output) -> None:
        """Fold one increment of choice `idx` into the whole-body response."""
        choice = self._choices[idx]
        choice.text.append(output.text)
        choice.logprobs.extend(output.logprobs)
        choice.finish_reason = finish_reason(output) or choice.finish_reason
        if output.HasField("usage"):
            choice.usage = output.usage

    def response(self) -> dict[str, Any]:
        """The non-streaming response body."""
        job = self.job
        choices: list[dict[str, Any]] = []
        for i, choice in enumerate(self._choices):
            echo = job.echo_texts[i // job.n]
            text = echo + "".join(choice.text)
            logprobs = self._logprobs(choice.logprobs, len(echo))[0] if job.logprobs else None
            body: dict[str, Any] = {"index": i}
            reason = choice.finish_reason
            if job.kind == "chat":
                body["message"], reason = self._message(text, reason)
            else:
                body["text"] = text
            choices.append({**body, "logprobs": logprobs, "finish_reason": reason})
        return {**self._head, "choices": choices, "usage": self.usage()}

    def chunks(self, idx: int, output: common_pb2.Output) -> list[Chunk]:
        """The stream chunks for one increment of choice `idx`."""
        job, choice = self.job, self._choices[idx]
        reason = finish_reason(output)  # first: an abort must raise before anything is sent
        if output.HasField("usage"):
            choice.usage = output.usage
        out: list[Chunk] = []
        if not self._streamed_any and job.kind == "chat":
            # OpenAI opens every choice with an empty assistant delta.
            out.extend(self._chunk(i, {"role": "assistant", "content": ""}) for i in range(job.num_choices))
        self._streamed_any = True
        text = output.text
        if not choice.started:
            choice.started = True
            echo = job.echo_texts[idx // job.n]
            text = echo + text
            choice.text_len = len(echo)
        logprobs = None
        if job.logprobs and output.logprobs:
            logprobs, choice.text_len = self._logprobs(output.logprobs, choice.text_len)
        if job.kind == "chat" and job.reasoning is not None:
            if choice.reasoning is None:
                choice.reasoning = job.reasoning.splitter()
            thought, text = choice.reasoning.feed(text, last=reason is not None)
            if thought:
                out.append(self._chunk(idx, {"reasoning_content": thought}, logprobs))
                logprobs = None
        if job.kind == "chat" and job.tool_parsing is not None:
            out.extend(self._tool_chunks(idx, text, logprobs, reason))
        elif job.kind == "chat":
            if text or logprobs:
                out.append(self._chunk(idx, {"content": text}, logprobs))
            if reason:
                out.append(self._chunk(idx, {}, None, reason))
        elif text or logprobs or reason:
            out.append(self._chunk(idx, text, logprobs, reason))
        return out

    def _message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A chat choice's message, and its finish reason ("tool_calls" once it called a tool)."""
        head: dict[str, Any] = {"role": "assistant"}
        if self.job.reasoning is not None:
            thought, text = split_reasoning(self.job.reasoning.format, self.job.reasoning.inside, text)
            head["reasoning_content"] = thought
        if self.job.tool_parsing is None:
            # All reasoning and no answer (cut by max_tokens): no content, as vLLM answers.
            content = None if self.job.reasoning is not None and not text else text
            return {**head, "content": content}, reason
        parsed = parse_message(self.job.tool_parsing, text)
        message: dict[str, Any] = {**head, "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
            reason = "tool_calls" if reason != "length" else reason
        return message, reason

    def _tool_chunks(
        self, idx: int, text: str, logprobs: dict[str, Any] | None, reason: str | None
    ) -> list[Chunk]:
        choice = self._choices[idx]
        assert self.job.tool_parsing is not None
        if choice.tool_stream is None:
            choice.tool_stream = ToolCallStream(self.job.tool_parsing)
        deltas = choice.tool_stream.deltas(text, last=reason is not None)
        if not deltas and logprobs:
            deltas = [{"content": ""}]  # text held back (a possible call), its logprobs go now
        out = [self._chunk(idx, delta, logprobs if i == 0 else None) for i, delta in enumerate(deltas)]
        if reason:
            if choice.tool_stream.complete_calls and reason != "length":
                reason = "tool_calls"
            out.append(self._chunk(idx, {}, None, reason))
        return out

    def usage_chunk(self) -> Chunk:
        """The last chunk when `stream_options.include_usage` is set."""
        return {**self._head, "object": self._chunk_object(), "choices": [], "usage": self.usage()}

    def usage(self) -> dict[str, Any]:
        """OpenAI usage: each prompt counted once however many samples it had."""
        job = self.job
        prompt = cached = completion = 0
        for p, request in enumerate(job.requests):
            usages = [c.usage for c in self._choices[p * job.n : (p + 1) * job.n] if c.usage is not None]
            prompt += max((u.prompt_tokens for u in usages), default=len(request.token_ids))
            cached += max((u.cached_tokens for u in usages), default=0)
            completion += sum(u.completion_tokens for u in usages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.job.kind == "chat" else "text_completion"

    def _chunk(
        self,
        idx: int,
        delta: dict[str, Any] | str,
        logprobs: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> Chunk:
        body = {"index": idx, "delta" if isinstance(delta, dict) else "text": delta}
        choice = {**body, "logprobs": logprobs, "finish_reason": reason}
        chunk: Chunk = {**self._head, "object": self._chunk_object(), "choices": [choice]}
        if self.job.include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last
        return chunk

    def _logprobs(
        self, entries: Sequence[common_pb2.TokenLogprob], text_offset: int
    ) -> tuple[dict[str, Any], int]:
        """Logprobs in the endpoint's shape, and the text offset after these tokens."""
        piece, top_n = self._tokenizer.piece, self.job.top_logprobs
        if self.job.kind == "chat":
            content = []
            for entry in entries:
                top_list = [
                    {"token": p.text, "logprob": _finite(t.logprob), "bytes": list(p.raw)}
                    for t in entry.top_logprobs[:top_n]
                    for p in (piece(t.token_id),)
                ]
                p = piece(entry.token_id)
                content.append(
                    {
                        "token": p.text,
                        "logprob": _finite(entry.logprob),
                        "bytes": list(p.raw),
                        "top_logprobs": top_list,
                    }
                )
            return {"content": content}, text_offset
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top_logprobs: list[dict[str, float]] = []
        offsets: list[int] = []
        for entry in entries:
            text = piece(entry.token_id).text
            tokens.append(text)
            token_logprobs.append(_finite(entry.logprob))
            # Keyed by text, as OpenAI's legacy format is: tokens of one text (a partial UTF-8
            # character's bytes all read "\ufffd") share an entry, the likeliest's (the first).
            top: dict[str, float] = {}
            for t in entry.top_logprobs[:top_n]:
                top.setdefault(piece(t.token_id).text, _finite(t.logprob))
            # OpenAI always lists the sampled token too: up to logprobs + 1 entries.
            top.setdefault(text, _finite(entry.logprob))
            top_logprobs.append(top)
            offsets.append(text_offset)
            # Offsets add up per-token text, so they drift where a token splits a UTF-8 character
            # or a stop string was cut from the text.
            text_offset += len(text)
        body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}
        return {**body, "text_offset": offsets}, text_offset


def _finite(logprob: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as -9999.
    return logprob if logprob > -9999.0 else -9999.0  # NaN too
