"""The DeepSeek-V3, Mistral, Qwen3-Coder XML and pythonic tool-call formats, and `required` /
named choices ending the output with the calls: each format's outputs parse the same whole and
cut at every position, streamed deltas reassemble to the whole message, and xgrammar's compiled
structural tag accepts exactly what the parser reads."""

from __future__ import annotations

import json
from typing import Any

import pytest
import xgrammar
from xgrammar.testing import _is_grammar_accept_string

from services.gateway.tool_calls.formats import TOOL_CALL_FORMATS, tool_call_format
from services.gateway.tool_calls.output import ToolCallStream, ToolParsing, parse_message
from services.gateway.tool_calls.request import FunctionTool, ToolRequest
from tests.gateway.test_tool_calls import TOOLS

NAMES = tuple(t.name for t in TOOLS)
PARAMETERS = {t.name: t.parameters for t in TOOLS}

PARIS = {"city": "Paris", "days": 2}
ZONE = {"zone": 'a]}"[{ ) \\ x'}  # brackets, quotes and a backslash inside a string

DS_CALLS = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜>\n'
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
    + json.dumps(ZONE)
    + "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
)
MISTRAL_CALLS = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
    '{"name": "get_time", "arguments": ' + json.dumps(ZONE) + "}]"
)
QWEN_CALLS = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_time>\n<parameter=zone>\n" + ZONE["zone"] + "\n</parameter>\n"
    "</function>\n</tool_call>"
)
PYTHONIC_CALLS = '[get_weather(city="Paris", days=2), get_time(zone=' + repr(ZONE["zone"]) + ")]"

CALLS = {
    "deepseek_v3": DS_CALLS,
    "mistral": MISTRAL_CALLS,
    "qwen3_coder": QWEN_CALLS,
    "pythonic": PYTHONIC_CALLS,
}
EXPECTED = [("get_weather", PARIS), ("get_time", ZONE)]


def _parsing(name: str) -> ToolParsing:
    return ToolParsing(TOOL_CALL_FORMATS[name], NAMES, PARAMETERS)


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.tool_calls]


def _stream(parsing: ToolParsing, pieces: list[str]) -> tuple[str | None, list[tuple[str, Any]], int]:
    stream = ToolCallStream(parsing)
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        for delta in stream.deltas(piece, last=i == len(pieces) - 1):
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    calls[call["index"]] = [call["function"]["name"], ""]
                calls[call["index"]][1] += call["function"]["arguments"]
    return content or None, [(n, json.loads(a)) for n, a in calls.values()], stream.complete_calls


@pytest.mark.parametrize("name", sorted(CALLS))
def test_whole_output_parses_into_the_calls(name: str) -> None:
    parsing = _parsing(name)
    message = parse_message(parsing, "Let me look. " + CALLS[name])
    assert (message.content or "").strip() == "Let me look." and _calls(message) == EXPECTED
    only = parse_message(parsing, CALLS[name])
    assert only.content is None and _calls(only) == EXPECTED
    text = parse_message(parsing, "No [call] here: <tool_call> (x) {y}.")
    assert text.content == "No [call] here: <tool_call> (x) {y}." and text.tool_calls == []


@pytest.mark.parametrize("name", sorted(CALLS))
def test_streamed_output_cut_at_every_position_reassembles(name: str) -> None:
    parsing = _parsing(name)
    text = "Sure. " + CALLS[name]
    whole = parse_message(parsing, text)
    for cut in range(1, len(text)):
        content, calls, complete = _stream(parsing, [text[:cut], text[cut:]])
        assert (content, calls, complete) == (whole.content, _calls(whole), 2), cut
    content, calls, _ = _stream(parsing, list(text))
    assert (content, calls) == (whole.content, _calls(whole))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_cut_output_keeps_complete_calls_and_the_rest_as_text(name: str) -> None:
    parsing = _parsing(name)
    for cut in range(1, len(CALLS[name])):
        message = parse_message(parsing, CALLS[name][:cut])
        assert len(message.tool_calls) <= 2
        for call in message.tool_calls:
            json.loads(call["function"]["arguments"])


def test_unknown_or_malformed_calls_are_text() -> None:
    for name, text in [
        ("mistral", '[TOOL_CALLS] [{"name": "nope", "arguments": {}}]'),
        ("mistral", "[TOOL_CALLS] not a list"),
        ("qwen3_coder", "<tool_call>\n<function=nope>\n</function>\n</tool_call>"),
        ("pythonic", "[1, 2, get_weather(city='x')]"),
        ("pythonic", "[get_weather('positional')]"),
        ("pythonic", "[nope(a=1)]"),
    ]:
        message = parse_message(_parsing(name), text)
        assert message.content == text and message.tool_calls == [], (name, text)


def test_qwen_xml_values_follow_the_schema_types() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    (call,) = parse_message(_parsing("qwen3_coder"), text).tool_calls
    assert json.loads(call["function"]["arguments"]) == {"city": "42", "days": 3}

    # The grammar lets any whitespace pad a value; an enum or a number is read without it.
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo"]}, "days": {"type": "integer"}}}
    parsing = ToolParsing(TOOL_CALL_FORMATS["qwen3_coder"], ("get_weather",), {"get_weather": schema})
    padded = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n Oslo\n\r\n</parameter>\n"
        "<parameter=days>\n\t3 \n</parameter>\n</function>\n</tool_call>"
    )
    (call,) = parse_message(parsing, padded).tool_calls
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": 3}


def _accepts(name: str, request: ToolRequest, text: str) -> bool:
    tag = TOOL_CALL_FORMATS[name].structural_tag(request)
    return bool(_is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(json.dumps(tag)), text))


ALL = sorted(TOOL_CALL_FORMATS)
ONE_CALL = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "deepseek_v3": DS_CALLS.split("\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time")[0]
    + "<｜tool▁calls▁end｜>",
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
    "qwen3_coder": QWEN_CALLS.split("\n<tool_call>\n<function=get_time>")[0],
    "pythonic": '[get_weather(city="Paris", days=2)]',
}


@pytest.mark.parametrize("name", ALL)
def test_the_grammar_accepts_what_the_parser_reads(name: str) -> None:
    one = ONE_CALL[name]
    assert _calls(parse_message(_parsing(name), one)) == EXPECTED[:1]
    auto = ToolRequest(TOOLS, "auto")
    assert _accepts(name, auto, "Let me check. " + one)
    assert _accepts(name, auto, "Only text.")
    if name in CALLS:
        assert _accepts(name, auto, CALLS[name])


@pytest.mark.parametrize("name", ALL)
def test_required_and_named_choices_end_with_the_calls(name: str) -> None:
    one = ONE_CALL[name]
    for request in (ToolRequest(TOOLS, "required"), ToolRequest(TOOLS, "named", named="get_weather")):
        assert _accepts(name, request, one), request
        assert not _accepts(name, request, one + " and then free text"), request
        assert not _accepts(name, request, "Text first. " + one), request
        assert not _accepts(name, request, ""), request
    if name in CALLS:
        assert _accepts(name, ToolRequest(TOOLS, "required"), CALLS[name])
        assert not _accepts(name, ToolRequest(TOOLS, "required", parallel=False), CALLS[name])


def test_format_detection_of_the_new_formats() -> None:
    assert tool_call_format("auto", "{{'<｜tool▁calls▁begin｜>'}}").name == "deepseek_v3"
    assert tool_call_format("auto", "[AVAILABLE_TOOLS] ... [TOOL_CALLS] [").name == "mistral"
    coder = "<|im_start|> <tool_call>\n<function={{ name }}>\n<parameter={{ key }}>"
    assert tool_call_format("auto", coder).name == "qwen3_coder"
    assert tool_call_format("pythonic", coder).name == "pythonic"


def test_pythonic_arguments_follow_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "note": {"type": "string"},
            "count": {"type": "integer", "minimum": 1},
            "flag": {"type": "boolean"},
        },
        "required": ["city", "days"],
    }
    request = ToolRequest((FunctionTool("get_weather", schema),), "required")
    for ok in (
        '[get_weather(city="Paris", days=2)]',
        "[get_weather(city=\"Oslo\", days=7, note='x', count=12, flag=True)]",
        '[get_weather(city="Oslo", days=1, flag=False)]',
    ):
        assert _accepts("pythonic", request, ok), ok
    for bad in (
        '[get_weather(city="Paris")]',  # a required argument missing
        '[get_weather(days=2, city="Paris")]',  # out of the schema's order
        '[get_weather(city="Lima", days=2)]',  # not in the enum
        '[get_weather(city="Paris", days=9)]',  # out of range
        '[get_weather(city="Paris", days="2")]',  # a string for an integer
        '[get_weather(city="Paris", days=2, count=0)]',  # under the minimum
        '[get_weather(city="Paris", days=2, flag=1)]',  # not a boolean
    ):
        assert not _accepts("pythonic", request, bad), bad
