"""How model families write tool calls, one class per format, and `--tool-call-parser`'s choice.

    format        calls look like                                                   parser
    hermes        <tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>    streaming
    llama3_json   {"name": "NAME", "parameters": {...}}                              streaming
    deepseek_v3   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME   streaming
                  \\n```json\\n{...}\\n```<｜tool▁call▁end｜>(\\n<next call>)*<｜tool▁calls▁end｜>
    mistral       [TOOL_CALLS] [{"name": "NAME", "arguments": {...}}, ...]            block
    qwen3_coder   <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>  block
                  ...</function>\\n</tool_call>
    pythonic      [NAME(key=value, ...), ...]                                        block

"streaming" formats send a call's arguments as they arrive (`parser.py`), "block" formats a whole
block of calls at once (`block_parser.py`). Each builds xgrammar's structural tag (`base.py`) as
plain JSON, so the gateway does not import xgrammar (and torch). For hermes, `auto` and named
choices equal `xgrammar.get_model_structural_tag("qwen_3", ..., reasoning="disabled",
exclude_special_tokens=False)`; the tests check that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.tool_calls.base import ToolCallFormat
from services.gateway.tool_calls.block_parser import BlockToolCallFormat, ParsedCall, bracket_end
from services.gateway.tool_calls.pythonic import PythonicFormat
from services.gateway.tool_calls.qwen_xml import Qwen3CoderFormat

__all__ = ["TOOL_CALL_FORMATS", "TOOL_CALL_PARSERS", "ToolCallFormat", "tool_call_format"]


class HermesFormat(ToolCallFormat):
    """Hermes / Qwen2.5 / Qwen3 (and the tiny ChatML test model): JSON inside <tool_call> tags."""

    name = "hermes"
    trigger = "<tool_call>"
    end = "}\n</tool_call>"

    def begin(self, function: str) -> str:
        return '<tool_call>\n{"name": ' + json.dumps(function) + ', "arguments": '


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1+ JSON tool calls: a bare `{"name": ..., "parameters": {...}}` object."""

    name = "llama3_json"
    trigger = '{"name": '
    end = "}"

    def begin(self, function: str) -> str:
        return '{"name": ' + json.dumps(function) + ', "parameters": '


class DeepSeekV3Format(ToolCallFormat):
    """DeepSeek-V3 (and R1): a section of calls, each a fenced JSON block after special tokens."""

    name = "deepseek_v3"
    trigger = "<｜tool▁call▁begin｜>"
    end = "\n```<｜tool▁call▁end｜>"
    separator = "\n"
    section_begin = "<｜tool▁calls▁begin｜>"
    section_end = "<｜tool▁calls▁end｜>"

    def begin(self, function: str) -> str:
        return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{function}\n```json\n"


class MistralFormat(BlockToolCallFormat):
    """Mistral (v0.3 tokenizer and its chat template): `[TOOL_CALLS]` and a JSON list of calls."""

    name = "mistral"
    trigger = "[TOOL_CALLS]"
    end = "}"
    separator = ", "
    section_begin = "[TOOL_CALLS] ["
    section_end = "]"

    def begin(self, function: str) -> str:
        return '{"name": ' + json.dumps(function) + ', "arguments": '

    def header(self, buf: str, names: Sequence[str]) -> bool | None:
        rest = buf[len(self.trigger) :].lstrip()
        return None if not rest else rest.startswith("[")

    def block_end(self, buf: str) -> int | None:
        return bracket_end(buf, buf.index("[", len(self.trigger)))

    def parse_block(
        self, block: str, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]
    ) -> list[ParsedCall] | None:
        try:
            items = json.loads(block[len(self.trigger) :])
        except ValueError:
            return None
        calls: list[ParsedCall] = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):  # some fine-tunes write the arguments as JSON text
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls or None


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    f.name: f
    for f in (
        HermesFormat(),
        Llama3JsonFormat(),
        DeepSeekV3Format(),
        MistralFormat(),
        Qwen3CoderFormat(),
        PythonicFormat(),
    )
}
TOOL_CALL_PARSERS = ("auto", *TOOL_CALL_FORMATS)  # the values of --tool-call-parser


def tool_call_format(parser: str, chat_template: str | None) -> ToolCallFormat:
    """The format `--tool-call-parser` names; for "auto", the one the chat template writes.

    In this order: DeepSeek's `<｜tool▁calls▁begin｜>` is deepseek_v3, `[TOOL_CALLS]` mistral,
    `<function=` with `<parameter=` qwen3_coder, `<tool_call>` or ChatML's `im_start` hermes, Llama
    3's header tokens llama3_json; anything else falls back to hermes. Pythonic is never guessed
    (its calls look like any Python list): name it.
    """
    if parser != "auto":
        return TOOL_CALL_FORMATS[parser]
    template = chat_template or ""
    if DeepSeekV3Format.section_begin in template:
        return TOOL_CALL_FORMATS["deepseek_v3"]
    if MistralFormat.trigger in template:
        return TOOL_CALL_FORMATS["mistral"]
    if "<function=" in template and "<parameter=" in template:
        return TOOL_CALL_FORMATS["qwen3_coder"]
    if "<tool_call>" in template or "im_start" in template:
        return TOOL_CALL_FORMATS["hermes"]
    if "<|start_header_id|>" in template:
        return TOOL_CALL_FORMATS["llama3_json"]
    return TOOL_CALL_FORMATS["hermes"]
