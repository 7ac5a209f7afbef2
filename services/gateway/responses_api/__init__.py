"""`POST /v1/responses` (OpenAI's Responses API, the subset the Agents SDK uses), `GET` and
`DELETE /v1/responses/{id}`, on top of the chat completions path.

    request.py        the request body, its items and tools, the 400s of what is not supported
    conversation.py   items (and a previous response's conversation) -> the chat completion to run
    output.py         the chat stream -> output items, the response object and its stream events
    store.py          stored responses for `previous_response_id` (bounded, in this replica's memory)
    service.py        `Responses`: prepare, complete or stream, retrieve, delete
"""

from services.gateway.responses_api.request import ResponsesRequest
from services.gateway.responses_api.service import ResponseRun, Responses

__all__ = ["ResponseRun", "Responses", "ResponsesRequest"]
