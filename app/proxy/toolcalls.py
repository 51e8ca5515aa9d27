"""Find tool calls in a model's text answer, as the answer streams.

Why: mlx_lm.server turns only `<tool_call>...</tool_call>` spans into `tool_calls`, and only for
models whose chat template it recognises. Qwen2.5-Coder (the default model) answers a request with
`tools` by writing the call as JSON in its content, fenced or bare, so an agent such as OpenCode never
runs the tool (issue 16). The formats, as vLLM's `hermes` and `qwen` tool parsers accept them:

- Qwen/Hermes tags: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- a fenced block, ```` ```json ```` or a bare ```` ``` ````, holding such an object;
- such an object (or a JSON list of them) starting the answer or a line.

`parameters` is a synonym of `arguments`, which may also be a string holding a JSON object. A block
is a call only when every object in it names one of the request's function tools and has object
arguments; anything else stays content, byte for byte. Text before, between and after calls stays
content too.

The parser runs on text as it arrives: text streams out at once until something that could start a
call appears; from there it is held until it is a complete call (emitted as a `ToolCall`) or can no
longer be one (emitted as text). Nothing is ever re-tokenised or regenerated, so the backend's
output (and greedy equality with and without a draft) is untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TAG_OPEN = "<tool_call>"
TAG_CLOSE = "</tool_call>"
FENCE = "```"
# Languages a fenced call may be labelled with; any other label is a code block, flushed at once.
_FENCE_LANGUAGES = ("", "json")
_CALL_KEYS = ("name", "arguments", "parameters")
# Characters that can complete a held block: re-examine it only when new text brings one.
_CLOSERS = frozenset("}]`>")
_CANDIDATE = re.compile(r"<|`|[{\[]")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the tool's name and its arguments as JSON text of an object."""

    name: str
    arguments: str


Event = str | ToolCall


class _Verdict:
    """What a held block is: not yet known, not a call, or calls ending at `end`."""

    INCOMPLETE: _Verdict
    REJECT: _Verdict

    def __init__(self, end: int = -1, calls: tuple[ToolCall, ...] = ()) -> None:
        self.end = end
        self.calls = calls


_Verdict.INCOMPLETE = _Verdict()
_Verdict.REJECT = _Verdict()


def calls_from_value(value: Any, tool_names: frozenset[str]) -> tuple[ToolCall, ...] | None:
    """The calls a parsed JSON value stands for, or None unless every element is a valid call."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        call = _call_from_object(item, tool_names)
        if call is None:
            return None
        calls.append(call)
    return tuple(calls) or None


def _call_from_object(item: Any, tool_names: frozenset[str]) -> ToolCall | None:
    if not isinstance(item, dict) or item.get("name") not in tool_names:
        return None
    if "arguments" in item:
        arguments = item["arguments"]
    elif "parameters" in item:
        arguments = item["parameters"]
    elif set(item) == {"name"}:
        arguments = {}  # a tool without parameters, called as {"name": "list"}
    else:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=item["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def _parse_calls(text: str, tool_names: frozenset[str]) -> tuple[ToolCall, ...] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return calls_from_value(value, tool_names)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_string(text: str, i: int) -> int:
    """Index just past the JSON string starting at `text[i]` (a quote), or -1 if it is unfinished."""
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == '"':
            return i + 1
        i += 1
    return -1


def _first_key_fits(text: str, i: int) -> bool | None:
    """Does the object starting at `text[i]` ('{') open with a call's key? None: not known yet."""
    i = _skip_space(text, i + 1)
    if i == len(text):
        return None
    if text[i] != '"':
        return False
    end = _read_string(text, i)
    if end < 0:
        key_so_far = text[i + 1 :]
        return None if any(key.startswith(key_so_far) for key in _CALL_KEYS) else False
    try:
        return json.loads(text[i:end]) in _CALL_KEYS
    except json.JSONDecodeError:
        return False


def scan_value(text: str, start: int) -> int | _Verdict:
    """End of the JSON object or list of objects at `start` (after spaces), or a verdict.

    Only brackets and strings are followed; whether it is valid JSON is left to `json.loads` once
    the value is complete. A list must hold an object first; the first object must open with a
    call's key, which rejects most code and prose within a few characters.
    """
    i = _skip_space(text, start)
    if i == len(text):
        return _Verdict.INCOMPLETE
    if text[i] == "[":
        first = _skip_space(text, i + 1)
        if first == len(text):
            return _Verdict.INCOMPLETE
        if text[first] != "{":
            return _Verdict.REJECT
        opening = first
    elif text[i] == "{":
        opening = i
    else:
        return _Verdict.REJECT
    fits = _first_key_fits(text, opening)
    if fits is False:
        return _Verdict.REJECT
    return _matching_end(text, i)


def _matching_end(text: str, i: int) -> int | _Verdict:
    depth = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            i = _read_string(text, i)
            if i < 0:
                return _Verdict.INCOMPLETE
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return _Verdict.INCOMPLETE


def _classify_tag(text: str, tool_names: frozenset[str], final: bool) -> _Verdict:
    if len(text) < len(TAG_OPEN):
        return _Verdict.REJECT if final or not TAG_OPEN.startswith(text) else _Verdict.INCOMPLETE
    body = _skip_space(text, len(TAG_OPEN))
    if body < len(text) and text[body] not in "{[":
        return _Verdict.REJECT
    close = text.find(TAG_CLOSE, body)
    if close < 0:
        if not final:
            return _Verdict.INCOMPLETE
        # The answer ended inside the tag (a stop word, or a model that never closes it).
        close = len(text)
    calls = _parse_calls(text[body:close], tool_names)
    if calls is None:
        return _Verdict.REJECT
    return _Verdict(min(close + len(TAG_CLOSE), len(text)), calls)


def _classify_fence(text: str, tool_names: frozenset[str], final: bool) -> _Verdict:
    if len(text) < len(FENCE):
        return _Verdict.REJECT if final or not FENCE.startswith(text) else _Verdict.INCOMPLETE
    newline = text.find("\n", len(FENCE))
    label = text[len(FENCE) : newline if newline >= 0 else len(text)].strip().lower()
    if newline < 0:
        if final or not any(language.startswith(label) for language in _FENCE_LANGUAGES):
            return _Verdict.REJECT
        return _Verdict.INCOMPLETE
    if label not in _FENCE_LANGUAGES:
        return _Verdict.REJECT
    end = scan_value(text, newline + 1)
    if isinstance(end, _Verdict):
        return _Verdict.REJECT if final else end
    after = _skip_space(text, end)
    closing = text[after : after + len(FENCE)]
    if closing == FENCE:
        block_end = after + len(FENCE)
    elif final and closing == "":
        block_end = len(text)  # the answer ended before the closing fence; the call is complete
    elif not final and FENCE.startswith(closing):
        return _Verdict.INCOMPLETE
    else:
        return _Verdict.REJECT
    calls = _parse_calls(text[newline + 1 : end], tool_names)
    return _Verdict.REJECT if calls is None else _Verdict(block_end, calls)


def _classify_bare(text: str, tool_names: frozenset[str], final: bool) -> _Verdict:
    end = scan_value(text, 0)
    if isinstance(end, _Verdict):
        return _Verdict.REJECT if final else end
    calls = _parse_calls(text[:end], tool_names)
    return _Verdict.REJECT if calls is None else _Verdict(end, calls)


def classify(text: str, tool_names: frozenset[str], final: bool) -> _Verdict:
    """Is `text`, which starts at a candidate, a call block? `final`: no more text will come."""
    if text[0] == "<":  # a bare block may start with its line's indentation
        return _classify_tag(text, tool_names, final)
    if text[0] == "`":
        return _classify_fence(text, tool_names, final)
    return _classify_bare(text, tool_names, final)


class ToolCallStream:
    """Splits a streamed answer into text and calls; see the module docstring.

    `feed` takes each new piece of the answer and returns what may be sent now, in order;
    `finish` returns what was still held once the answer has ended.
    """

    def __init__(self, tool_names: frozenset[str], prefix: str = "") -> None:
        self.tool_names = tool_names
        self.calls_made = 0
        # Undecided text; a forced call's opening (the prompt's end) is where the answer starts.
        self._held = prefix
        # True while the text sent so far ends a line (or is empty): a `{` or `[` here starts a line.
        self._line_start = True
        # A held block already past its first-key check only changes verdict when a closer arrives.
        self._awaiting_closer = False
        self._after_call = False

    def feed(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._awaiting_closer and not _CLOSERS.intersection(text):
            self._held += text
            return []
        self._held += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        text = self._held
        sent = 0  # text[:sent] is decided
        self._awaiting_closer = False
        while sent < len(text):
            if self._after_call:
                # Spaces and newlines after a call are layout between calls, not content.
                sent = _skip_space(text, sent)
                if sent == len(text):
                    break
                self._after_call = False
            start = self._next_candidate(text, sent)
            if start < 0:
                self._emit_text(events, text[sent:])
                sent = len(text)
                break
            if start > sent:
                self._emit_text(events, text[sent:start])
                sent = start
            verdict = classify(text[start:], self.tool_names, final)
            if verdict is _Verdict.INCOMPLETE:
                self._awaiting_closer = self._past_opening(text[start:])
                break
            if verdict is _Verdict.REJECT:
                self._emit_text(events, text[start])
                sent = start + 1
                continue
            events.extend(verdict.calls)
            self.calls_made += len(verdict.calls)
            sent = start + verdict.end
            self._after_call = True
            self._line_start = True
        self._held = text[sent:]
        return events

    def _next_candidate(self, text: str, begin: int) -> int:
        """Where the first possible call starts in `text[begin:]`, or -1."""
        for match in _CANDIDATE.finditer(text, begin):
            i = match.start()
            char = text[i]
            if char == "<":
                if TAG_OPEN.startswith(text[i : i + len(TAG_OPEN)]):
                    return i
            elif char == "`":
                if FENCE.startswith(text[i : i + len(FENCE)]):
                    return i
            elif self._starts_line(text, begin, i):
                return _indent_start(text, begin, i)
        # A line's indentation may be followed by a call: held, so that it is not sent as content.
        tail = _indent_start(text, begin, len(text))
        if tail < len(text) and self._starts_line(text, begin, len(text)):
            return tail
        return -1

    def _starts_line(self, text: str, begin: int, i: int) -> bool:
        line = text.rfind("\n", begin, i)
        before = text[line + 1 : i] if line >= 0 else text[begin:i]
        return before.strip(" \t") == "" and (line >= 0 or self._line_start)

    @staticmethod
    def _past_opening(block: str) -> bool:
        # Past the opener and the first key, only a closing bracket, fence or tag can decide it.
        if block.startswith(TAG_OPEN):
            return _first_key_known(block[len(TAG_OPEN) :])
        if block.startswith(FENCE):
            return "\n" in block and _first_key_known(block[block.index("\n") + 1 :])
        return _first_key_known(block)

    def _emit_text(self, events: list[Event], text: str) -> None:
        if not text:
            return
        if events and isinstance(events[-1], str):
            events[-1] += text
        else:
            events.append(text)
        last_line = text.rsplit("\n", 1)
        self._line_start = last_line[-1].strip(" \t") == "" and (len(last_line) > 1 or self._line_start)


def _indent_start(text: str, begin: int, i: int) -> int:
    while i > begin and text[i - 1] in " \t":
        i -= 1
    return i


def _first_key_known(text: str) -> bool:
    i = _skip_space(text, 0)
    if i < len(text) and text[i] == "[":
        i = _skip_space(text, i + 1)
    if i >= len(text) or text[i] != "{":
        return False
    key = _skip_space(text, i + 1)
    return key < len(text) and text[key] == '"' and _read_string(text, key) > 0


def parse_tool_calls(text: str, tool_names: frozenset[str]) -> tuple[str, list[ToolCall]]:
    """A whole answer's content (the text outside calls) and its calls."""
    stream = ToolCallStream(tool_names)
    events = stream.feed(text) + stream.finish()
    content = "".join(event for event in events if isinstance(event, str))
    return content, [event for event in events if isinstance(event, ToolCall)]
