"""Tool-call formats and parsing without a server: the structural tags against xgrammar's own
builder and compiler, and the incremental parser fed whole and in every split."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from services.gateway.tool_calls.formats import (
    TOOL_CALL_FORMATS,
    HermesFormat,
    Llama3JsonFormat,
    tool_call_format,
)
from services.gateway.tool_calls.output import ToolCallStream, ToolParsing, parse_message
from services.gateway.tool_calls.parser import (
    CallArguments,
    CallCut,
    CallEnd,
    CallStart,
    Text,
    ToolCallParser,
)
from services.gateway.tool_calls.request import FunctionTool, ToolRequest

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}}
TOOLS = (FunctionTool("get_weather", WEATHER), FunctionTool("get_time", TIME))
OPENAI_TOOLS = [{"type": "function", "function": {"name": t.name, "parameters": t.parameters}} for t in TOOLS]
HERMES = ToolParsing(HermesFormat(), ("get_weather", "get_time"))
LLAMA = ToolParsing(Llama3JsonFormat(), ("get_weather", "get_time"))

CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
CALL_TRICKY = (  # braces, brackets and escaped quotes inside strings
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "a}]\\"{[ \\\\\\" }"}}\n</tool_call>'
)


def _requests() -> list[tuple[ToolRequest, Any]]:
    """Tool requests and the matching `tool_choice` of xgrammar's builder (not `required`: its
    builder lets free text run on after the calls, ours ends the output with them)."""
    named = {"type": "function", "function": {"name": "get_time"}}
    return [
        (ToolRequest(TOOLS, "auto", parallel=True), "auto"),
        (ToolRequest(TOOLS, "auto", parallel=False), "auto"),
        (ToolRequest(TOOLS, "named", parallel=True, named="get_time"), named),
    ]


@pytest.mark.parametrize(("fmt", "model"), [(HermesFormat(), "qwen_3"), (Llama3JsonFormat(), "llama")])
@pytest.mark.parametrize(("request_", "choice"), _requests())
def test_structural_tag_matches_xgrammar_builder(
    fmt: Any, model: str, request_: ToolRequest, choice: Any
) -> None:
    ours = json.dumps(fmt.structural_tag(request_))
    theirs = xgrammar.get_model_structural_tag(
        model,
        tools=OPENAI_TOOLS,
        tool_choice=choice,
        reasoning="disabled",
        exclude_special_tokens=False,
        parallel_tool_calls=request_.parallel,
    )
    assert xgrammar.StructuralTag.model_validate_json(ours).model_dump() == theirs.model_dump()
    xgrammar.Grammar.from_structural_tag(ours)  # compiles


def test_hermes_structural_tag_literal() -> None:
    tag = HermesFormat().structural_tag(ToolRequest(TOOLS[:1], "required", parallel=True))
    assert tag == {
        "type": "structural_tag",
        "format": {
            "type": "tags_with_separator",
            "tags": [
                {
                    "type": "tag",
                    "begin": '<tool_call>\n{"name": "get_weather", "arguments": ',
                    "content": {"type": "json_schema", "json_schema": WEATHER},
                    "end": "}\n</tool_call>",
                }
            ],
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": False,
        },
    }
    assert HermesFormat().structural_tag(ToolRequest(TOOLS, "none")) is None


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("Free text only.", True),
        ("Let me check.\n" + CALL_PARIS, True),
        (CALL_PARIS + "\n" + CALL_TRICKY, True),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>', False),  # no city
        ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', False),
    ],
)
def test_outputs_the_parser_expects_are_what_the_grammar_accepts(text: str, accepted: bool) -> None:
    tag = json.dumps(HermesFormat().structural_tag(ToolRequest(TOOLS, "auto")))
    assert _is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(tag), text) is accepted


def test_format_detection_from_the_chat_template() -> None:
    assert tool_call_format("auto", "{{ '<|im_start|>' + message['role'] }}").name == "hermes"
    assert tool_call_format("auto", "... <tool_call> ...").name == "hermes"
    assert tool_call_format("auto", "<|start_header_id|>user<|end_header_id|>").name == "llama3_json"
    assert tool_call_format("auto", None).name == "hermes"
    assert tool_call_format("llama3_json", "<|im_start|>").name == "llama3_json"
    assert set(TOOL_CALL_FORMATS) == {
        "hermes",
        "llama3_json",
        "deepseek_v3",
        "mistral",
        "qwen3_coder",
        "pythonic",
    }


def _feed(parsing: ToolParsing, pieces: list[str]) -> list[Any]:
    parser = parsing.parser()
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.finish()


def _normalized(events: list[Any]) -> list[Any]:
    """Events with adjacent text / same-call argument pieces joined (their split is not fixed)."""
    out: list[Any] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, Text) and isinstance(last, Text):
            out[-1] = Text(last.text + event.text)
        elif isinstance(event, CallArguments) and isinstance(last, CallArguments):
            out[-1] = CallArguments(event.index, last.text + event.text)
        else:
            out.append(event)
    return out


def _every_split(text: str) -> list[list[str]]:
    splits = [[text[i : i + size] for i in range(0, len(text), size)] for size in range(1, 12)]
    splits += [[text[:cut], text[cut:]] for cut in range(1, len(text))]
    return splits


PARIS_ARGS = '{"city": "Paris", "days": 2}'
TRICKY_ARGS = '{"zone": "a}]\\"{[ \\\\\\" }"}'
CASES = {
    "text and a call": (
        HERMES,
        "Let me check.\n" + CALL_PARIS,
        [Text("Let me check.\n"), CallStart(0, "get_weather"), CallArguments(0, PARIS_ARGS), CallEnd(0)],
    ),
    "two calls": (
        HERMES,
        CALL_PARIS + "\n" + CALL_TRICKY,
        [
            CallStart(0, "get_weather"),
            CallArguments(0, PARIS_ARGS),
            CallEnd(0),
            Text("\n"),
            CallStart(1, "get_time"),
            CallArguments(1, TRICKY_ARGS),
            CallEnd(1),
        ],
    ),
    "a call cut short": (
        HERMES,
        "Hm " + CALL_PARIS[:61],
        [
            Text("Hm "),
            CallStart(0, "get_weather"),
            CallArguments(0, '{"city": "Pa'),
            CallCut(0, CALL_PARIS[:61]),
        ],
    ),
    "a cut header is text": (
        HERMES,
        'x <tool_call>\n{"name": "get_w',
        [Text('x <tool_call>\n{"name": "get_w')],
    ),
    "text like a trigger": (
        HERMES,
        'a <tool b <tool_call>\n{"nom": 1} <',
        [Text('a <tool b <tool_call>\n{"nom": 1} <')],
    ),
    "unknown function is text": (
        HERMES,
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        [Text('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')],
    ),
    "llama3 json": (
        LLAMA,
        'Sure. {"name": "get_time", "parameters": {"zone": "{}"}}{"name": "get_weather", "parameters": {}}',
        [
            Text("Sure. "),
            CallStart(0, "get_time"),
            CallArguments(0, '{"zone": "{}"}'),
            CallEnd(0),
            CallStart(1, "get_weather"),
            CallArguments(1, "{}"),
            CallEnd(1),
        ],
    ),
    "llama3 json-looking text": (
        LLAMA,
        'A {"key": 1} and {"name": 2}',
        [Text('A {"key": 1} and {"name": 2}')],
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_parser_events_do_not_depend_on_the_split(case: str) -> None:
    parsing, text, expected = CASES[case]
    assert _normalized(_feed(parsing, [text])) == expected
    for pieces in _every_split(text):
        assert _normalized(_feed(parsing, pieces)) == expected, pieces


def test_text_is_held_back_only_while_it_could_start_the_trigger() -> None:
    parser = HERMES.parser()
    assert parser.feed("Hello <tool") == [Text("Hello ")]
    assert parser.feed("s are fun") == [Text("<tools are fun")]
    assert parser.feed(" <") == [Text(" ")]
    assert parser.finish() == [Text("<")]


def test_parse_message() -> None:
    message = parse_message(HERMES, "Let me check.\n" + CALL_PARIS)
    assert message.content == "Let me check.\n"
    (call,) = message.tool_calls
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": PARIS_ARGS}
    assert call["id"].startswith("call_") and len(call["id"]) == 29 and call["id"][5:].isalnum()
    both = parse_message(HERMES, CALL_PARIS + "\n" + CALL_TRICKY + "\n")
    assert both.content is None  # only whitespace outside the calls
    assert [json.loads(c["function"]["arguments"]) for c in both.tool_calls] == [
        {"city": "Paris", "days": 2},
        {"zone": 'a}]"{[ \\" }'},
    ]
    assert len({c["id"] for c in both.tool_calls}) == 2
    cut = parse_message(HERMES, CALL_PARIS + "\n" + CALL_TRICKY[:50])
    assert cut.content == "\n" + CALL_TRICKY[:50] and len(cut.tool_calls) == 1
    assert (
        parse_message(HERMES, "  \n") == parse_message(HERMES, "")
        and parse_message(HERMES, "").content is None
    )


def _stream(parsing: ToolParsing, pieces: list[str]) -> tuple[str, dict[int, dict[str, Any]], int]:
    """Stream `pieces` through a `ToolCallStream`: content, calls by index, complete calls."""
    stream = ToolCallStream(parsing)
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for i, piece in enumerate(pieces):
        for delta in stream.deltas(piece, last=i == len(pieces) - 1):
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    assert call["index"] not in calls and call["function"]["arguments"] == ""
                    calls[call["index"]] = {
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "arguments": "",
                    }
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return content, calls, stream.complete_calls


@pytest.mark.parametrize(
    "text",
    [
        "Let me check.\n" + CALL_PARIS,
        "\n" + CALL_PARIS + "\n" + CALL_TRICKY + "\n",
        "Just text, with a <tag> and {braces}.",
        "Before " + CALL_TRICKY + " after",
    ],
)
def test_streamed_deltas_reassemble_to_the_whole_message(text: str) -> None:
    whole = parse_message(HERMES, text)
    for pieces in [[text], *_every_split(text)]:
        content, calls, complete = _stream(HERMES, pieces)
        assert (content or None) == whole.content, pieces
        assert complete == len(whole.tool_calls)
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls
        ]
        for call in calls.values():
            json.loads(call["arguments"])


def test_streamed_call_cut_short_is_not_complete() -> None:
    pieces = ["Hi ", CALL_PARIS[:40], CALL_PARIS[40:61]]
    content, calls, complete = _stream(HERMES, pieces)
    assert content == "Hi " and complete == 0
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == '{"city": "Pa'
    assert "".join(pieces).endswith(calls[0]["arguments"])


def test_parser_accepts_no_output() -> None:
    parser = ToolCallParser(HermesFormat(), ["f"])
    assert parser.feed("") == [] and parser.finish() == []
