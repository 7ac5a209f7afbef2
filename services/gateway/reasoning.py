"""Reasoning output (`--reasoning-parser`): the text between `<think>` and `</think>` goes to
`reasoning_content`, the rest to `content`.

    format        reasoning starts                                       models
    deepseek_r1   at the start of the output (a leading `<think>` is     DeepSeek-R1 (its template
                  skipped): the output begins inside the reasoning       may open the tag itself)
    qwen3         where the output opens `<think>` (first thing after    Qwen3, QwQ
                  whitespace), or at the start when the prompt ends with
                  `<think>` (thinking templates that open it themselves)

Reasoning ends at `</think>`; whitespace right after it is dropped. An output that never closes the
reasoning is all reasoning. `ReasoningSplitter` is incremental: fed pieces cut anywhere (a tag
split across pieces included), it yields the same split as the whole text.

`reasoning_effort`: "none"/"minimal" turn thinking off in templates that read `enable_thinking`
(Qwen3), unless `chat_template_kwargs` sets it; any value is passed to templates that read a
`reasoning_effort` variable. Otherwise it is accepted and changes nothing.

Output constraints (response_format, regex, ebnf, tools) apply after the reasoning, as vLLM does:
`after_reasoning` wraps the constraint in a structural tag whose first part is the reasoning
(free text up to `</think>`) and the second the constraint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from services.gateway.constraints import Constraint

REASONING_PARSERS = ("off", "auto", "deepseek_r1", "qwen3")  # the values of --reasoning-parser
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
THINK, END_THINK = "<think>", "</think>"
ReasoningFormat = Literal["deepseek_r1", "qwen3"]


def reasoning_format(parser: str, chat_template: str | None) -> ReasoningFormat | None:
    """The format `--reasoning-parser` names; "auto" reads the chat template (DeepSeek's tokens and
    `<think>`: deepseek_r1; `<think>` otherwise: qwen3; none: off)."""
    if parser == "off":
        return None
    if parser != "auto":
        return parser  # type: ignore[return-value]
    template = chat_template or ""
    if THINK not in template and "enable_thinking" not in template:
        return None
    return "deepseek_r1" if "<｜Assistant｜>" in template else "qwen3"


def starts_inside(fmt: ReasoningFormat, prompt: str) -> bool:
    """Whether the output begins inside the reasoning."""
    return fmt == "deepseek_r1" or prompt.rstrip().endswith(THINK)


def template_kwargs(
    effort: str | None, kwargs: dict[str, Any] | None, chat_template: str | None
) -> dict[str, Any] | None:
    """`chat_template_kwargs` with what `reasoning_effort` means for this template."""
    if effort is None:
        return kwargs
    out = dict(kwargs or {})
    template = chat_template or ""
    if effort in ("none", "minimal") and "enable_thinking" in template:
        out.setdefault("enable_thinking", False)
    if "reasoning_effort" in template:
        out.setdefault("reasoning_effort", effort)
    return out


def after_reasoning(constraint: Constraint, inside: bool) -> Constraint:
    """`constraint` applied after the reasoning: a structural tag of the reasoning, then it."""
    if constraint.field == "structural_tag":
        rest = json.loads(constraint.value)["format"]
    elif constraint.field == "json_schema":
        rest = {"type": "json_schema", "json_schema": json.loads(constraint.value)}
    elif constraint.field == "regex":
        rest = {"type": "regex", "pattern": constraint.value}
    else:
        rest = {"type": "grammar", "grammar": constraint.value}
    thinking: dict[str, Any] = {
        "type": "tag",
        "begin": "" if inside else THINK,
        "content": {"type": "any_text"},
        "end": END_THINK,
    }
    if not inside:  # the model may answer without thinking
        thinking = {"type": "optional", "content": thinking}
    spacing = {"type": "regex", "pattern": r"\s{0,2}"}  # models put a blank line after </think>
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [thinking, spacing, rest]}}
    return Constraint("structural_tag", json.dumps(tag), constraint.param)


@dataclass
class ReasoningSplitter:
    """One sample's output split into (reasoning, content) pieces, fed incrementally."""

    fmt: ReasoningFormat
    inside: bool
    _state: Literal["start", "reasoning", "after", "content"] = "start"
    _buffer: str = ""

    def __post_init__(self) -> None:
        self.inside = self.inside or self.fmt == "deepseek_r1"

    def feed(self, text: str, last: bool = False) -> tuple[str, str]:
        """The reasoning and content of the next piece; `last` flushes what was held back."""
        self._buffer += text
        reasoning, content = [], []
        while True:
            buf = self._buffer
            if self._state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK):
                    self._buffer, self._state = stripped[len(THINK) :], "reasoning"
                elif THINK.startswith(stripped) and not last:
                    break  # may still become `<think>`
                else:
                    self._state = "reasoning" if self.inside else "content"
                continue
            if self._state == "reasoning":
                at = buf.find(END_THINK)
                if at >= 0:
                    reasoning.append(buf[:at])
                    self._buffer, self._state = buf[at + len(END_THINK) :], "after"
                    continue
                keep = 0 if last else _partial_suffix(buf, END_THINK)
                reasoning.append(buf[: len(buf) - keep])
                self._buffer = buf[len(buf) - keep :]
                break
            if self._state == "after":
                stripped = buf.lstrip()
                self._buffer = stripped
                if stripped:
                    self._state = "content"
                    continue
                break
            content.append(buf)
            self._buffer = ""
            break
        return "".join(reasoning), "".join(content)


def split_reasoning(fmt: ReasoningFormat, inside: bool, text: str) -> tuple[str | None, str]:
    """A whole output's reasoning (None when there is none) and content."""
    reasoning, content = ReasoningSplitter(fmt, inside).feed(text, last=True)
    return reasoning or None, content


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
