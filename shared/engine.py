"""The offline engine: `Engine(model_path=...).generate(...)`, shaped like SGLang's.

    with Engine(model_path="path/to/hf-dir") as engine:
        out = engine.generate("The capital of France is", {"max_new_tokens": 16})
        print(out["text"], out["meta_info"])

The `EngineCore` runs on a loop thread owned by the engine; callers on any thread (or event loop)
submit requests and receive increments through per-request sinks. Bad input raises
`InvalidRequest` (a `ValueError`) in the caller; a failure inside a step fails the requests of
that engine, and it keeps serving.

With `tp_size > 1` the core runs in the engine process instead (`EngineClient`), which is rank 0
and starts the other ranks (shared/distributed/); the API is the same, outputs reach the sinks
from the client's receiver thread. A failed step fails the running requests there too, and then
the engine is gone (a broken rank group cannot be resumed): later calls raise `Unavailable`."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.config import EngineConfig
from shared.engine_client import EngineClient
from shared.engine_core import EngineCore, RequestOutput
from shared.errors import InternalError, InvalidRequest, Unavailable
from shared.inputs import Prompt
from shared.pooling import PoolingParams
from shared.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
_POLL_BACKGROUND_S = 0.002  # how often an otherwise idle loop looks at compiling grammars

PromptInput = str | list[str] | None
IdsInput = list[int] | list[list[int]] | None
ParamsInput = dict[str, Any] | list[dict[str, Any]] | None


class _Sink:
    """Where a request's outputs go: a thread-safe queue, or an asyncio queue via its loop.

    A non-streaming sink folds increments together and delivers once, at the finish: waking the
    caller's thread for every token would take a core from the engine's thread pool.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None, stream: bool) -> None:
        self.loop = loop
        self.stream = stream
        self.pending: RequestOutput | None = None
        self.queue: (
            queue.SimpleQueue[RequestOutput | BaseException] | asyncio.Queue[RequestOutput | BaseException]
        )
        self.queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and not self.stream:
            self.pending = item if self.pending is None else self.pending.then(item)
            if not item.finished:
                return
            item, self.pending = self.pending, None
        if self.loop is not None:
            q = self.queue
            assert isinstance(q, asyncio.Queue)
            self.loop.call_soon_threadsafe(q.put_nowait, item)
        else:
            assert isinstance(self.queue, queue.SimpleQueue)
            self.queue.put(item)


@dataclass
class _Result:
    """Accumulates one sample's increments into the dict `generate` returns."""

    rid: str
    index: int
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, int, None]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int, None]]] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> dict[str, Any]:
        """Fold an increment in; return it as a stream chunk."""
        self.text += out.new_text
        self.output_ids += out.new_ids
        lps = [(lp, tok, None) for lp, tok in zip(out.new_logprobs, out.new_ids)]
        tops = [[(v, t, None) for v, t in row] for row in out.new_top_logprobs]
        self.logprobs += lps
        self.top_logprobs += tops
        self.last = out
        return self._as_dict(out.new_text, out.new_ids, lps, tops)

    def final(self) -> dict[str, Any]:
        return self._as_dict(self.text, self.output_ids, self.logprobs, self.top_logprobs)

    def _as_dict(self, text: str, ids: list[int], lps: list[Any], tops: list[Any]) -> dict[str, Any]:
        out = self.last
        assert out is not None
        meta: dict[str, Any] = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason,
        }
        if lps or self.logprobs:
            meta["output_token_logprobs"] = lps
        if tops or self.top_logprobs:
            meta["output_top_logprobs"] = tops
        return {"text": text, "output_ids": list(ids), "meta_info": meta, "index": self.index}


class Engine:
    """Offline inference on one model. Options are `EngineConfig` fields (SGLang's names)."""

    def __init__(self, model_path: str, **options: Any) -> None:
        self.config = EngineConfig.from_options(model_path, **options)
        if self.config.node_rank > 0:
            raise ValueError(
                f"node_rank={self.config.node_rank}: only node 0 runs an engine; start the other nodes'"
                " ranks with the same options on each: python -m services.worker --model DIR --tp-size N"
                " --nnodes M --node-rank R --dist-init-addr HOST:PORT"
            )
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._ids = itertools.count()
        self._closed = False
        # Tensor-parallel ranks need processes of their own and a torch.distributed group: the
        # engine process (rank 0) provides them.
        self._client: EngineClient | None = None
        self.tokenizer: PreTrainedTokenizerBase
        if self.config.tp_size > 1:
            from transformers import AutoTokenizer

            from shared.models.config import ModelConfig

            ModelConfig.from_model_path(model_path)  # no model there: FileNotFoundError, as at tp_size 1
            self._client = EngineClient(self.config)  # other load errors: RuntimeError
            self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer_path or model_path)
            return
        # The core is built on the loop thread that runs it: torch's CPU thread pool belongs to
        # the thread that first uses it, and a second pool on the caller's thread would contend.
        started: Future[EngineCore] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="tandem-engine", daemon=True)
        self._thread.start()
        self.core = started.result()  # re-raises a load error (missing files, bad model) here
        self.tokenizer = self.core.tokenizer

    # ---- public API ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: PromptInput = None,
        sampling_params: ParamsInput = None,
        input_ids: IdsInput = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt (returns a dict) or a list (returns a list, n samples per prompt,
        prompt-major). `stream=True` returns an iterator of increments instead."""
        results, single = self._submit(
            prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, None, stream
        )
        if stream:
            return self._stream(results)
        outputs = [self._wait(r) for r in results]
        return outputs[0] if single and len(outputs) == 1 else outputs

    def encode(
        self,
        prompt: PromptInput = None,
        input_ids: IdsInput = None,
        pooling: str = "last",
        normalize: bool = True,
        dimensions: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Embeddings (shared/pooling.py) of one prompt (a dict) or a list (a list of dicts):
        `{"embedding": [...], "meta_info": {"id", "prompt_tokens", "cached_tokens"}}`."""
        if self._closed:
            raise Unavailable("the engine was shut down")
        prompts, single = self._normalize_inputs(prompt, input_ids)
        options = PoolingParams(pooling, normalize, dimensions)  # type: ignore[arg-type]  # verified by the core
        entries: list[tuple[str, _Sink]] = []
        for ids in prompts:
            rid, sink = f"req-{next(self._ids)}", _Sink(None, stream=False)
            self._add([rid], ids, SamplingParams(), [sink], pooling=options)
            entries.append((rid, sink))
        outputs = []
        for rid, sink in entries:
            assert isinstance(sink.queue, queue.SimpleQueue)
            item = sink.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.embedding is None:
                raise Unavailable(str((item.finish_reason or {}).get("message") or "aborted"))
            meta = {"id": rid, "prompt_tokens": item.prompt_tokens, "cached_tokens": item.cached_tokens}
            outputs.append({"embedding": item.embedding, "meta_info": meta})
        return outputs[0] if single else outputs

    async def async_generate(
        self,
        prompt: PromptInput = None,
        sampling_params: ParamsInput = None,
        input_ids: IdsInput = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """Like `generate`, awaiting on the running event loop; with `stream=True` it returns an
        async iterator: `async for chunk in await engine.async_generate(..., stream=True)`."""
        loop = asyncio.get_running_loop()
        results, single = await loop.run_in_executor(
            None,
            self._submit,
            prompt,
            sampling_params,
            input_ids,
            return_logprob,
            top_logprobs_num,
            loop,
            stream,
        )
        if stream:
            return self._astream(results)
        outputs = [await self._await(r) for r in results]
        return outputs[0] if single and len(outputs) == 1 else outputs

    def abort(self, rid: str) -> None:
        """Abort a request by its `meta_info["id"]`."""
        if self._client is not None:
            self._client.abort(rid)
            return
        self._call(lambda: self.core.abort(rid))

    def shutdown(self) -> None:
        """Stop the loop thread (or the engine process); requests still running fail with
        `Unavailable`."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._client.shutdown()  # the sinks get Unavailable from the client
            return
        self._commands.put(lambda: None)  # wake the loop
        self._thread.join()
        for sink in self._sinks.values():
            sink.put(Unavailable("the engine was shut down"))
        self._sinks.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- submission ----------------------------------------------------------------------------

    def _submit(
        self,
        prompt: PromptInput,
        sampling_params: ParamsInput,
        input_ids: IdsInput,
        return_logprob: bool,
        top_logprobs_num: int,
        loop: asyncio.AbstractEventLoop | None,
        stream: bool,
    ) -> tuple[list[tuple[_Result, _Sink]], bool]:
        if self._closed:
            raise Unavailable("the engine was shut down")
        prompts, single = self._normalize_inputs(prompt, input_ids)
        params = self._normalize_params(sampling_params, len(prompts))
        results: list[tuple[_Result, _Sink]] = []
        for ids, p in zip(prompts, params):
            rids = [f"req-{next(self._ids)}" for _ in range(p.n)]
            sinks = [_Sink(loop, stream) for _ in rids]
            self._add(rids, ids, p, sinks, return_logprob, top_logprobs_num)
            results += [
                (_Result(rid, len(results) + i), sink) for i, (rid, sink) in enumerate(zip(rids, sinks))
            ]
        return results, single

    def _add(
        self,
        rids: list[str],
        ids: list[int],
        params: SamplingParams,
        sinks: list[_Sink],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        pooling: PoolingParams | None = None,
    ) -> None:
        """Queue one prompt (its samples `rids`, their outputs to `sinks`); raises the core's
        refusal (e.g. `InvalidRequest`) here, in the caller."""
        if self._client is not None:
            handlers = {rid: self._deliver_to(sink) for rid, sink in zip(rids, sinks)}
            as_dict = pooling.to_dict() if pooling is not None else None
            prompt = Prompt(ids, dataclasses.asdict(params), return_logprob, top_logprobs_num)
            self._client.submit(rids, prompt, handlers, pooling=as_dict).result()
            return

        def add() -> None:
            self.core.add_request(rids, ids, params, return_logprob, top_logprobs_num, pooling=pooling)
            self._sinks.update(zip(rids, sinks))

        self._call(add).result()

    def _deliver_to(self, sink: _Sink) -> Callable[[RequestOutput | BaseException], None]:
        """The engine process's outputs (on the client's receiver thread) into `sink`."""

        def deliver(item: RequestOutput | BaseException) -> None:
            if isinstance(item, Unavailable) and self._closed:
                item = Unavailable("the engine was shut down")  # what the loop-thread engine says
            sink.put(item)

        return deliver

    def _normalize_inputs(self, prompt: PromptInput, input_ids: IdsInput) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise InvalidRequest("pass exactly one of prompt or input_ids")
        if prompt is not None:
            if isinstance(prompt, str):
                return [self._encode(prompt)], True
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                return [self._encode(p) for p in prompt], False
            raise InvalidRequest("prompt must be a string or a non-empty list of strings", param="prompt")
        assert input_ids is not None
        if isinstance(input_ids, list) and input_ids:
            if all(isinstance(t, int) for t in input_ids):
                return [[t for t in input_ids if isinstance(t, int)]], True
            if all(isinstance(x, list) for x in input_ids):
                return [list(x) for x in input_ids if isinstance(x, list)], False
        raise InvalidRequest(
            "input_ids must be a non-empty list of ints or a non-empty list of lists of ints",
            param="input_ids",
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    @staticmethod
    def _normalize_params(sampling_params: ParamsInput, count: int) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, dict):
            return [SamplingParams.from_dict(sampling_params)] * count
        if isinstance(sampling_params, Sequence) and len(sampling_params) == count:
            return [SamplingParams.from_dict(p) for p in sampling_params]
        raise InvalidRequest(
            f"sampling_params must be a dict or a list of {count} dicts (one per prompt)",
            param="sampling_params",
        )

    # ---- results -------------------------------------------------------------------------------

    def _wait(self, entry: tuple[_Result, _Sink]) -> dict[str, Any]:
        for _chunk in self._stream([entry]):
            pass
        return entry[0].final()

    async def _await(self, entry: tuple[_Result, _Sink]) -> dict[str, Any]:
        async for _chunk in self._astream([entry]):
            pass
        return entry[0].final()

    def _stream(self, entries: list[tuple[_Result, _Sink]]) -> Iterator[dict[str, Any]]:
        open_ = {r.rid for r, _ in entries}
        try:
            for result, sink in entries:
                q = sink.queue
                assert isinstance(q, queue.SimpleQueue)
                while True:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield result.add(item)
                    if item.finished:
                        open_.discard(result.rid)
                        break
        finally:
            for rid in open_:  # the consumer stopped early: free what the requests hold
                self.abort(rid)

    async def _astream(self, entries: list[tuple[_Result, _Sink]]) -> AsyncIterator[dict[str, Any]]:
        open_ = {r.rid for r, _ in entries}
        try:
            for result, sink in entries:
                q = sink.queue
                assert isinstance(q, asyncio.Queue)
                while True:
                    item = await q.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield result.add(item)
                    if item.finished:
                        open_.discard(result.rid)
                        break
        finally:
            for rid in open_:
                self.abort(rid)

    # ---- the loop thread -----------------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> Future[None]:
        """Run fn on the loop thread (the only thread that touches the core)."""
        fut: Future[None] = Future()

        def run() -> None:
            try:
                fn()
                fut.set_result(None)
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

        if self._closed:
            fut.set_exception(Unavailable("the engine was shut down"))
        else:
            self._commands.put(run)
        return fut

    def _run(self, started: Future[EngineCore]) -> None:
        try:
            self.core = EngineCore(self.config)
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(self.core)
        self._loop()

    def _loop(self) -> None:
        while not self._closed:
            busy, waiting = self.core.has_work, self.core.waiting_in_background
            try:
                # Idle: block on commands; a grammar compiling: look again every few ms.
                cmd = self._commands.get(block=not busy, timeout=_POLL_BACKGROUND_S if waiting else None)
                cmd()
                while True:
                    self._commands.get_nowait()()
            except queue.Empty:
                pass
            if self._closed or not (self.core.has_work or self.core.waiting_in_background):
                continue
            try:
                outputs = self.core.step()
            except Exception as e:  # keep serving: fail what was running, reset, go on
                logger.exception("engine step failed")
                self._fail_all(e)
                continue
            for admission in self.core.take_admissions():
                if admission.error is None:
                    continue
                for rid in admission.rids:
                    sink = self._sinks.pop(rid, None)
                    if sink is not None:  # e.g. its grammar did not compile in time
                        sink.put(admission.error)
            for out in outputs:
                sink = self._sinks.get(out.rid)
                if sink is not None:
                    sink.put(out)
                    if out.finished:
                        del self._sinks[out.rid]

    def _fail_all(self, error: Exception) -> None:
        self.core.fail_all(f"engine step failed: {error}")
        for sink in self._sinks.values():
            sink.put(InternalError(f"engine step failed: {error}"))
        self._sinks.clear()
