"""Formats whose calls are parsed a whole block at a time: Mistral's JSON list, Qwen3-Coder's XML
and the pythonic list.

Their arguments are not one JSON object after a literal header (XML parameters, Python keyword
arguments, a list whose items carry the names), so the parser finds a block's end, then parses the
block whole:

    TEXT     free text up to the format's `trigger` (a suffix that could grow into it is held)
    BLOCK    the buffer starts with the trigger: `header` says whether it can still be a call
             (else its first character is text), `block_end` where the block ends; then
             `parse_block` gives its calls -> `CallStart`, `CallArguments` (the whole arguments
             JSON), `CallEnd` per call; a block that parses into no known call is text

Streamed, a block's calls therefore arrive together when the block is complete. A block cut by
max_tokens is text (nothing of it was sent as a call).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.tool_calls.base import CallParser, ToolCallFormat
from services.gateway.tool_calls.parser import (
    CallArguments,
    CallEnd,
    CallStart,
    Event,
    Text,
    _prefix_suffix_len,
    _push,
)

ParsedCall = tuple[str, str]  # the function's name, its arguments as JSON text


class BlockToolCallFormat(ToolCallFormat):
    """A format parsed block by block (see the module docstring)."""

    @abstractmethod
    def header(self, buf: str, names: Sequence[str]) -> bool | None:
        """For a buffer starting with the trigger: True if it starts a block of calls, False if it
        cannot, None while it is too short to tell."""

    @abstractmethod
    def block_end(self, buf: str) -> int | None:
        """The index just past the block that `buf` starts with, None while it goes on."""

    @abstractmethod
    def parse_block(
        self, block: str, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]
    ) -> list[ParsedCall] | None:
        """The calls in a whole block; None when it is not a valid block of known calls."""

    def parser(self, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]) -> CallParser:
        return BlockParser(self, names, parameters)


class BlockParser:
    """Parses one output of a `BlockToolCallFormat`."""

    def __init__(
        self, fmt: BlockToolCallFormat, names: Sequence[str], parameters: Mapping[str, dict[str, Any]]
    ) -> None:
        self._fmt = fmt
        self._names = tuple(names)
        self._parameters = parameters
        self._buffer = ""
        self._in_block = False
        self._calls = 0

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        _push(events, Text(self._buffer))  # held text, or a block cut short
        self._buffer, self._in_block = "", False
        return events

    def _step(self, events: list[Event]) -> bool:
        buf = self._buffer
        if not buf:
            return False
        trigger = self._fmt.trigger
        if not self._in_block:
            at = buf.find(trigger)
            if at < 0:
                keep = _prefix_suffix_len(buf, trigger)
                _push(events, Text(buf[: len(buf) - keep]))
                self._buffer = buf[len(buf) - keep :]
                return False
            _push(events, Text(buf[:at]))
            self._buffer, self._in_block = buf[at:], True
            return True
        starts = self._fmt.header(buf, self._names)
        if starts is None:
            return False
        end = self._fmt.block_end(buf) if starts else None
        if starts and end is None:
            return False  # wait for the rest of the block
        calls = self._fmt.parse_block(buf[:end], self._names, self._parameters) if end else None
        if calls is None:  # not a block of calls: its first character is text, look on after it
            _push(events, Text(buf[0]))
            self._buffer, self._in_block = buf[1:], False
            return True
        for name, arguments in calls:
            index = self._calls
            events += [CallStart(index, name), CallArguments(index, arguments), CallEnd(index)]
            self._calls += 1
        self._buffer, self._in_block = buf[end:], False
        return True


def bracket_end(text: str, start: int, quotes: str = '"') -> int | None:
    """The index just past the bracket closing the one at `start` (brackets inside strings quoted
    with any of `quotes` are skipped), None when the text ends first."""
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in quotes:
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
