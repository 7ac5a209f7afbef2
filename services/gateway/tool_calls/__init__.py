"""Tool calling on /v1/chat/completions: from OpenAI `tools` to a structural tag, and back.

    request.py   `tools`, `tool_choice`, `parallel_tool_calls` -> a validated `ToolRequest`
    formats.py   how a model family writes calls (hermes, llama3_json): the structural tag that
                 forces them (xgrammar's JSON, built here without importing xgrammar) and the
                 literal text the parser looks for
    parser.py    an incremental parser: output text -> text / call start / argument events
    output.py    events -> OpenAI's `message.tool_calls` and streamed `delta.tool_calls`

Nothing here imports more than pydantic: the gateway stays light (xgrammar pulls in torch).
"""
