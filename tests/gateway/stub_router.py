"""A deterministic stand-in for the router: a real grpc.aio `RouterService` on a free port.

It "generates" the prompt's own non-special tokens back, one increment per token, interleaving
the n samples, and honours max_new_tokens, stop strings (trimmed unless no_stop_trim),
return_logprob/top_logprobs_num and usage. Magic words in the request's `text` (the gateway's
routing hint) trigger failures:

    RESOURCE_EXHAUSTED / UNAVAILABLE   the call fails with that status before any output
    ABORT_NOW / ABORT_LATER            the samples finish with FINISH_REASON_ABORT (at once / after 2 tokens)
    SLOW                               0.1 s between tokens (for disconnect tests)
    STALL                              30 s before the first token

A test can instead script what the next call streams back (`StubRouter.script`): text pieces per
sample, one increment each, split wherever the test likes (`split_text` cuts at awkward places).
An output constraint (json_schema, regex, ebnf, structural_tag) is compiled with xgrammar, as the
engine does, and one that does not compile fails the call with INVALID_ARGUMENT naming its field.

Generations come as Generate calls or as streams of a GenerateMany call, served by the router's
own multiplexing (services/common/multiplex.py); `service.multiplexing = False` makes
GenerateMany UNIMPLEMENTED, as an older router answers. It records every request and every
generation the client cancelled. It runs its own event loop in a background thread, so
synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from services.common.errors import ServiceError
from services.common.multiplex import GenerateServicer
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from shared.errors import InvalidRequest

MODEL_ID = "tiny-stub-model"
NUM_SPECIAL_TOKENS = 5  # the tiny tokenizer's special tokens are ids 0..4
DEFAULT_MAX_NEW_TOKENS = 128
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Script:
    """What one Generate call streams back: per sample, text pieces (one increment each) and a finish."""

    samples: tuple[tuple[str, ...], ...]  # one entry serves every sample
    finish: tuple[str, ...]  # "stop" or "length", per sample (one entry serves all)

    def pieces(self, index: int) -> tuple[str, ...]:
        return self.samples[min(index, len(self.samples) - 1)]

    def finish_reason(self, index: int) -> str:
        return self.finish[min(index, len(self.finish) - 1)]


def split_text(text: str, sizes: Sequence[int] = (1, 3, 2, 5, 4, 7)) -> list[str]:
    """`text` in pieces of the given sizes, cycled: cuts land inside tags, names and escapes."""
    pieces: list[str] = []
    at = 0
    for size in itertools.cycle(sizes):
        if at >= len(text):
            return pieces
        pieces.append(text[at : at + size])
        at += size
    raise AssertionError("unreachable")


def compile_constraint(params: common_pb2.SamplingParams) -> str | None:
    """The engine's check of an output constraint: xgrammar's error message, None when it compiles."""
    kind = params.WhichOneof("constraint")
    if kind is None:
        return None
    import xgrammar  # only here: it pulls in torch

    build = {
        "json_schema": xgrammar.Grammar.from_json_schema,
        "regex": xgrammar.Grammar.from_regex,
        "ebnf": xgrammar.Grammar.from_ebnf,
        "structural_tag": xgrammar.Grammar.from_structural_tag,
    }[kind]
    try:
        build(getattr(params, kind))
    except Exception as exc:
        return f"{kind} is invalid: {' '.join(str(exc).split())}"  # the engine's wording
    return None


class StubRouterService(GenerateServicer, router_pb2_grpc.RouterServiceServicer):
    """The servicer; see the module docstring for its behaviour."""

    def __init__(self, tokenizer_dir: Path, max_context_len: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.max_context_len = max_context_len
        self.requests: list[router_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []  # each generation's call metadata
        self.multiplexing = True  # False: GenerateMany answers UNIMPLEMENTED (an older router)
        self.generate_calls = 0  # Generate calls
        self.generate_many_calls = 0  # GenerateMany calls (UNIMPLEMENTED ones included)
        self.active = 0  # generations started and not ended
        self.cancelled = threading.Event()  # set when any Generate call was cancelled by the client
        self.cancelled_count = 0
        self.list_models_calls = 0
        self.scripts: list[Script] = []  # consumed one per Generate call, in order
        self._next_id = 1

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        self.list_models_calls += 1
        model = router_pb2.Model(id=MODEL_ID, max_context_len=self.max_context_len, created=1_700_000_000)
        return router_pb2.ListModelsResponse(models=[model])

    async def Tokenize(
        self, request: router_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.TokenizeResponse:
        ids = self.tokenizer.encode(request.text, add_special_tokens=request.add_special_tokens).ids
        return router_pb2.TokenizeResponse(token_ids=ids)

    batch_type = router_pb2.GenerateManyResponse  # GenerateMany: the router's own multiplexing

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.generate_calls += 1
        async for response in super().Generate(request, context):
            yield response

    async def GenerateMany(
        self, requests: AsyncIterator[router_pb2.GenerateManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateManyResponse]:
        self.generate_many_calls += 1
        if not self.multiplexing:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        async for batch in super().GenerateMany(requests, context):
            yield batch

    async def _serve(
        self, request: router_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.active += 1
        try:
            async for response in self._checked(request, metadata):
                yield response
        finally:
            self.active -= 1

    async def _checked(
        self, request: router_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.requests.append(request)
        self.metadata.append(dict(metadata))
        request_id = request.request_id or self._next_id
        self._next_id += 1
        for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            if code.name in request.text:
                raise ServiceError(code, f"stub router: {code.name.lower()} (magic word)")
        for token_id in request.sampling_params.stop_token_ids:
            if not 0 <= token_id < self.vocab_size:
                message = f"stop_token_ids entry {token_id} is outside the vocabulary [0, {self.vocab_size})"
                raise InvalidRequest(message, param="stop_token_ids")
        kind = request.sampling_params.WhichOneof("constraint")
        if kind is not None:
            error = await asyncio.to_thread(compile_constraint, request.sampling_params)
            if error is not None:  # as the router answers: the field at fault as data
                raise InvalidRequest(error, param=kind)
        try:
            if self.scripts:
                responses = self._scripted(request, request_id, self.scripts.pop(0))
            else:
                responses = self._generate(request, request_id)
            async for response in responses:
                yield response
        except asyncio.CancelledError:
            self.cancelled_count += 1
            self.cancelled.set()
            raise

    async def _generate(
        self, request: router_pb2.GenerateRequest, request_id: int
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        params = request.sampling_params
        prompt = list(request.token_ids) or self.tokenizer.encode(request.text).ids
        source = [t for t in prompt if t >= NUM_SPECIAL_TOKENS]
        max_new = params.max_new_tokens if params.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        delay = 0.1 if "SLOW" in request.text else 0.0
        if "STALL" in request.text:
            await asyncio.sleep(30)
        n = request.n or 1
        samples = [_Sample() for _ in range(n)]
        step = 0
        while not all(s.done for s in samples):
            for index, sample in enumerate(samples):
                if sample.done:
                    continue
                output = common_pb2.Output(index=index)
                if "ABORT_NOW" in request.text or ("ABORT_LATER" in request.text and step == 2):
                    output.finish.reason = common_pb2.FINISH_REASON_ABORT
                    output.finish.message = "stub router: aborted (magic word)"
                elif step >= max_new:
                    output.finish.reason = common_pb2.FINISH_REASON_LENGTH
                elif step >= len(source):
                    output.finish.reason = common_pb2.FINISH_REASON_STOP
                    output.finish.matched_token_id = 1
                else:
                    self._next_token(request, sample, source[step], step, output)
                sample.done = output.HasField("finish")
                output.usage.prompt_tokens = len(prompt)
                output.usage.completion_tokens = len(sample.token_ids)
                output.usage.cached_tokens = len(prompt) // 2
                response = router_pb2.GenerateResponse(request_id=request_id, output=output)
                if step == 0:
                    response.route.decode_worker = "stub-decode:0"
                yield response
            step += 1
            if delay:
                await asyncio.sleep(delay)

    async def _scripted(
        self, request: router_pb2.GenerateRequest, request_id: int, script: Script
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        n = request.n or 1
        streams = [list(script.pieces(i)) or [""] for i in range(n)]
        counts = [0] * n
        for step in range(max(len(s) for s in streams)):
            for index, pieces in enumerate(streams):
                if step >= len(pieces):
                    continue
                output = common_pb2.Output(index=index, text=pieces[step])
                token_ids = self.tokenizer.encode(pieces[step], add_special_tokens=False).ids
                output.token_ids.extend(token_ids)
                for token_id in token_ids if request.return_logprob else ():
                    output.logprobs.add(token_id=token_id, logprob=-0.5)
                counts[index] += len(token_ids)
                if step == len(pieces) - 1:
                    output.finish.reason = _FINISH[script.finish_reason(index)]
                output.usage.prompt_tokens = len(request.token_ids)
                output.usage.completion_tokens = counts[index]
                yield router_pb2.GenerateResponse(request_id=request_id, output=output)
            await asyncio.sleep(0)

    def _next_token(
        self,
        request: router_pb2.GenerateRequest,
        sample: _Sample,
        token_id: int,
        step: int,
        out: common_pb2.Output,
    ) -> None:
        params = request.sampling_params
        sample.token_ids.append(token_id)
        out.token_ids.append(token_id)
        if request.return_logprob:
            entry = out.logprobs.add(token_id=token_id, logprob=-0.1 * (step + 1))
            for j in range(request.top_logprobs_num):
                entry.top_logprobs.add(
                    token_id=(token_id + j) % self.vocab_size, logprob=-0.1 * (step + 1) - j
                )
        skip = params.skip_special_tokens if params.HasField("skip_special_tokens") else True
        text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=skip)
        if text.endswith("\ufffd"):
            return  # hold back half a character
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                text = text if params.no_stop_trim else text[:at]
                out.finish.reason = common_pb2.FINISH_REASON_STOP
                out.finish.matched_stop = stop
                break
        out.text = text[len(sample.text) :]
        sample.text = text


class _Sample:
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.done = False


class StubRouter:
    """Runs `StubRouterService` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, tokenizer_dir: Path, max_context_len: int = 256, port: int = 0) -> None:
        self.service = StubRouterService(tokenizer_dir, max_context_len)
        self.port = port  # 0: a free one
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stub-router", daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> StubRouter:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(self.service, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    def stop(self) -> None:
        """Stop serving (idempotent): open calls fail, new ones find nobody listening."""
        if not self._thread.is_alive():
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def script(self, *samples: Sequence[str], finish: str | Sequence[str] = "stop") -> None:
        """Make the next Generate call stream these pieces back instead of echoing the prompt.

        One sequence of pieces per sample (a single one serves every sample); `finish` is "stop" or
        "length", or one of those per sample. Call it again to script the calls after that.
        """
        finishes = (finish,) if isinstance(finish, str) else tuple(finish)
        self.service.scripts.append(Script(tuple(tuple(s) for s in samples), finishes))

    @property
    def last_request(self) -> router_pb2.GenerateRequest:
        """The last GenerateRequest the stub received."""
        return self.service.requests[-1]

    def reset(self) -> None:
        """Forget recorded requests, scripts and cancellations (between tests sharing one stub)."""
        self.service.requests.clear()
        self.service.scripts.clear()
        self.service.metadata.clear()
        self.service.cancelled.clear()
        self.service.cancelled_count = 0
        self.service.multiplexing = True
        self.service.generate_calls = self.service.generate_many_calls = 0

    def wait_cancelled(self, timeout: float) -> bool:
        """True once the stub saw a client-cancelled call, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return self.service.cancelled.wait(max(0.0, deadline - time.monotonic()))
