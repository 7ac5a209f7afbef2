"""An incremental tool-call parser: output text in, events out, whatever the pieces' boundaries.

The text not consumed yet sits in a buffer; the state says what it may be:

    TEXT     free text: everything before a possible trigger is a `Text` event; a suffix that
             could still grow into the trigger is held back
    HEADER   the buffer starts with the trigger: wait until it holds a whole `begin(name)` of a
             known tool (-> `CallStart`, ARGS), or until it cannot become one (then its first
             character is text and the search goes on after it)
    ARGS     the arguments object, passed on as `CallArguments` pieces until its braces balance
             outside JSON strings (-> END)
    END      wait for the format's `end` (whitespace before it is skipped) -> `CallEnd`, TEXT

A format's section markers (DeepSeek-V3's `<｜tool▁calls▁begin｜>` / `<｜tool▁calls▁end｜>`) are
dropped where they appear in TEXT. Formats whose calls are not a literal header and a JSON object
(Mistral's list, Qwen3-Coder's XML, pythonic) use `block_parser.BlockParser` instead.

`finish()` flushes: held text and a partial header become `Text`; a call still open (cut by
max_tokens) becomes `CallCut` with its raw text. Under the engine's structural tag the output
always follows this grammar; other text never makes the parser fail, it just stays text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from services.gateway.tool_calls.base import ToolCallFormat


@dataclass(frozen=True)
class Text:
    """Free text outside calls."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """Call `index` (0, 1, ... within one output) to `name` has begun; its arguments follow."""

    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next piece of call `index`'s arguments (JSON text; the pieces concatenate to it)."""

    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    """Call `index` is complete."""

    index: int


@dataclass(frozen=True)
class CallCut:
    """The output ended inside call `index`; `raw` is all of its text."""

    index: int
    raw: str


Event = Text | CallStart | CallArguments | CallEnd | CallCut


class JsonObjectScanner:
    """Finds where a JSON object (or array) ends, fed piece by piece: brackets counted outside strings."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str) -> int | None:
        """The index just past the closing bracket in `text`, or None when the value goes on."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


class ToolCallParser:
    """Parses one output (one sample) of a tool-calling request; see the module docstring."""

    def __init__(self, fmt: ToolCallFormat, names: Sequence[str]) -> None:
        self._trigger = fmt.trigger
        self._end = fmt.end.lstrip()  # whitespace before the end is skipped anyway
        # A section's markers around the calls (DeepSeek-V3's) are neither text nor calls.
        self._markers = tuple(m for m in (fmt.section_begin, fmt.section_end) if m)
        self._in_section = False  # between the markers: whitespace separates calls, it is no text
        self._begins = {fmt.begin(name): name for name in names}
        self._state: Literal["text", "header", "args", "end"] = "text"
        self._buffer = ""
        self._raw = ""  # the open call's text so far
        self._calls = 0  # calls started
        self._scanner = JsonObjectScanner()
        self._args_open = False  # the arguments' first bracket was seen

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of output text."""
        self._buffer += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        """Events for the end of the output: whatever was held back."""
        rest, self._buffer = self._buffer, ""
        events: list[Event] = []
        if self._state in ("text", "header"):
            _push(events, Text(rest))
        else:
            events.append(CallCut(self._calls - 1, self._raw + rest))
        self._state, self._raw = "text", ""
        return events

    def _step(self, events: list[Event]) -> bool:
        """Consume what the buffer allows in the current state; True to go on."""
        buf = self._buffer
        if not buf:
            return False
        if self._state == "text":
            at, hit = _find_first(buf, (self._trigger, *self._markers))
            if hit is None:
                keep = max(_prefix_suffix_len(buf, s) for s in (self._trigger, *self._markers))
                self._text(events, buf[: len(buf) - keep])
                self._buffer = buf[len(buf) - keep :]
                return False
            self._text(events, buf[:at])
            if hit != self._trigger:  # a section marker: dropped
                self._in_section = hit == self._markers[0]
                self._buffer = buf[at + len(hit) :]
                return True
            self._buffer, self._state = buf[at:], "header"
            return True
        if self._state == "header":
            return self._header(buf, events)
        if self._state == "args":
            return self._arguments(buf, events)
        return self._call_end(buf, events)

    def _text(self, events: list[Event], text: str) -> None:
        if not (self._in_section and not text.strip()):
            _push(events, Text(text))

    def _header(self, buf: str, events: list[Event]) -> bool:
        for begin, name in self._begins.items():
            if buf.startswith(begin):
                events.append(CallStart(self._calls, name))
                self._calls += 1
                self._buffer, self._raw, self._state = buf[len(begin) :], begin, "args"
                self._scanner, self._args_open = JsonObjectScanner(), False
                return True
        if any(begin.startswith(buf) for begin in self._begins):
            return False  # wait for more
        # Not a call after all: the trigger's first character is text; look again after it.
        _push(events, Text(buf[0]))
        self._buffer, self._state = buf[1:], "text"
        return True

    def _arguments(self, buf: str, events: list[Event]) -> bool:
        if not self._args_open:
            stripped = buf.lstrip()  # whitespace before the object is not part of the arguments
            self._raw += buf[: len(buf) - len(stripped)]
            self._buffer = buf = stripped
            if not buf:
                return False
            self._args_open = True
        end = self._scanner.scan(buf)
        piece = buf if end is None else buf[:end]
        _push(events, CallArguments(self._calls - 1, piece))
        self._raw += piece
        self._buffer = buf[len(piece) :]
        if end is None:
            return False
        self._state = "end"
        return True

    def _call_end(self, buf: str, events: list[Event]) -> bool:
        stripped = buf.lstrip()
        if stripped.startswith(self._end):
            consumed = len(buf) - len(stripped) + len(self._end)
            events.append(CallEnd(self._calls - 1))
            self._buffer, self._raw, self._state = buf[consumed:], "", "text"
            return True
        if not stripped or self._end.startswith(stripped):
            return False  # wait for more
        # No end (only without the grammar): the arguments are whole, so is the call; the rest is text.
        events.append(CallEnd(self._calls - 1))
        self._raw, self._state = "", "text"
        return True


def _push(events: list[Event], event: Event) -> None:
    """Append `event`, merging it into the previous one when both are text or the same call's arguments."""
    if isinstance(event, Text | CallArguments) and not event.text:
        return
    last = events[-1] if events else None
    if isinstance(event, Text) and isinstance(last, Text):
        events[-1] = Text(last.text + event.text)
    elif isinstance(event, CallArguments) and isinstance(last, CallArguments) and last.index == event.index:
        events[-1] = CallArguments(event.index, last.text + event.text)
    else:
        events.append(event)


def _find_first(text: str, needles: Sequence[str]) -> tuple[int, str | None]:
    """Where the first of `needles` occurs in `text` (the longest one on a tie), and which."""
    best, hit = len(text), None
    for needle in needles:
        at = text.find(needle)
        if at >= 0 and (at < best or (at == best and hit is not None and len(needle) > len(hit))):
            best, hit = at, needle
    return best, hit


def _prefix_suffix_len(text: str, trigger: str) -> int:
    """The length of the longest end of `text` that is a proper start of `trigger`."""
    for size in range(min(len(text), len(trigger) - 1), 0, -1):
        if text.endswith(trigger[:size]):
            return size
    return 0
