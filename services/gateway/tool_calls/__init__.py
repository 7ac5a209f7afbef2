"""Tool calling on /v1/chat/completions: from OpenAI `tools` to a structural tag, and back.

    request.py       `tools`, `tool_choice`, `parallel_tool_calls` -> a validated `ToolRequest`
    base.py          what every format shares: the structural tag that forces its calls
                     (xgrammar's JSON, built here without importing xgrammar)
    formats.py       the formats (hermes, llama3_json, deepseek_v3, mistral; qwen3_coder in
                     `qwen_xml.py`, pythonic in `pythonic.py`) and `--tool-call-parser`'s choice
    parser.py        the streaming parser: output text -> text / call start / argument events
    block_parser.py  the parser of formats read a whole block at a time (mistral, qwen3_coder,
                     pythonic)
    output.py        events -> OpenAI's `message.tool_calls` and streamed `delta.tool_calls`

Nothing here imports more than pydantic: the gateway stays light (xgrammar pulls in torch).
"""
