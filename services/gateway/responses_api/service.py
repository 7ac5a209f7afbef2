"""`/v1/responses`: create (whole or streamed), retrieve and delete, on top of the chat path.

    prepare(req)        model check, request checks, the previous response's conversation from the
                        store (404 when unknown), the conversation as a chat completion
                        (`conversation.py`), `Handler.prepare_chat` -> a `ResponseRun`
    complete(run)       the chat stream folded into the response object (`output.py`)
      or stream(run)    the same fold, yielding the Responses' events
    then                a `store`d response is kept with its conversation (`store.py`)

Errors keep the chat path's statuses with the Responses' field names (`max_output_tokens`, not
`max_completion_tokens`). A stream raises what fails before its first event (the server answers
with the status); later failures end it with `response.failed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from services.common.tracing import record_error
from services.gateway.errors import to_openai_error
from services.gateway.handler import Handler, RouterCalls
from services.gateway.protocol import OpenAIError
from services.gateway.responses import Job, Metadata
from services.gateway.responses_api.conversation import chat_request, responses_error
from services.gateway.responses_api.output import Event, OutputStream, new_response
from services.gateway.responses_api.request import InputItem, ResponsesRequest, parse_item
from services.gateway.responses_api.store import ResponseStore, StoredResponse


@dataclass
class ResponseRun:
    """A prepared response: the chat job that generates it, the response object, and the
    conversation it answers (kept with the response when `store`)."""

    job: Job
    response: dict[str, Any]
    conversation: tuple[InputItem, ...]
    store: bool


@contextlib.contextmanager
def _responses_errors() -> Iterator[None]:
    """Errors from the chat path, as the Responses' (its field names)."""
    try:
        yield
    except Exception as exc:
        raise responses_error(to_openai_error(exc)) from exc


class Responses:
    """The endpoint's logic; `handler` runs the chat completions, `store` keeps responses."""

    def __init__(self, handler: Handler, store_size: int) -> None:
        self.handler = handler
        self.store = ResponseStore(store_size)

    async def prepare(
        self, req: ResponsesRequest, metadata: Metadata = (), request_id: str | None = None
    ) -> ResponseRun:
        """Validate `req`, continue its previous response, render and tokenize it as a chat."""
        with _responses_errors():
            self.handler.check_model(req.model)
            req.check()
            history = self._previous(req.previous_response_id)
            items = req.input_items()
            tools = req.function_tools()
            chat = chat_request(req, tools, history, items)
            job = await self.handler.prepare_chat(chat, metadata, request_id)
        store = req.store is not False
        response = new_response(req, self.handler.model.name, tools, store)
        return ResponseRun(job, response, (*history, *items), store)

    async def complete(self, run: ResponseRun, calls: RouterCalls) -> dict[str, Any]:
        """Run the response to its end: the response object."""
        output = OutputStream(run.response)
        with _responses_errors():
            async for chunk in self.handler.stream(run.job, calls):
                output.feed(chunk)
        output.finish()
        self._keep(run)
        return run.response

    async def stream(self, run: ResponseRun, calls: RouterCalls) -> AsyncGenerator[Event, None]:
        """Run the response, yielding its events (nothing before the router's first increment)."""
        output = OutputStream(run.response)
        try:
            async for chunk in self.handler.stream(run.job, calls):
                for event in output.feed(chunk):
                    yield event
        except (OpenAIError, grpc.aio.AioRpcError) as exc:
            error = responses_error(to_openai_error(exc))
            if not output.started:
                raise error from exc
            record_error(trace.get_current_span(), exc, f"in the stream: {error.message}")
            for event in output.fail(error):
                yield event
            return
        for event in output.finish():
            yield event
        self._keep(run)

    def retrieve(self, response_id: str) -> dict[str, Any]:
        """A stored response object (404 when not stored)."""
        entry = self.store.get(response_id)
        if entry is None:
            raise self._not_found(response_id, None)
        return entry.body

    def delete(self, response_id: str) -> dict[str, Any]:
        """Forget a stored response (404 when not stored)."""
        if not self.store.delete(response_id):
            raise self._not_found(response_id, None)
        return {"id": response_id, "object": "response", "deleted": True}

    def _previous(self, response_id: str | None) -> tuple[InputItem, ...]:
        if response_id is None:
            return ()
        entry = self.store.get(response_id)
        if entry is None:
            raise self._not_found(response_id, "previous_response_id")
        return entry.conversation

    def _keep(self, run: ResponseRun) -> None:
        if not run.store:
            return
        # A call cut by max_output_tokens was never made: a follow-up does not see it.
        made = tuple(
            parse_item(item, "output")
            for item in run.response["output"]
            if item["type"] != "function_call" or item["status"] == "completed"
        )
        self.store.put(run.response["id"], StoredResponse(run.response, (*run.conversation, *made)))

    def _not_found(self, response_id: str, param: str | None) -> OpenAIError:
        why = "" if self.store.capacity else " (this gateway keeps no responses: --responses-store-size 0)"
        what = "Previous response" if param else "Response"
        return OpenAIError(
            404, f"{what} with id '{response_id}' not found{why}.", param=param, code="not_found"
        )
