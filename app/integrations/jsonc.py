"""JSON with comments (JSONC, as OpenCode reads its config): parse with positions, then edit by splicing.

OpenCode parses `opencode.json` and `opencode.jsonc` with `jsonc-parser`, so either may hold `//` and
`/* */` comments and trailing commas. Re-serialising such a file would drop the comments and reformat the
user's file, so edits here replace or insert text at the positions the parser recorded: every byte outside
the edited member stays as it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, cast

# json's own string scanner (the C one): escapes and surrogate pairs exactly as json.loads reads them.
_scanstring = cast(Any, json).decoder.scanstring

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {"true": True, "false": False, "null": None}


class JsoncError(ValueError):
    """Not a JSONC document; the message has the line and column."""


@dataclass
class Member:
    key: str
    key_start: int
    node: Node


@dataclass
class Node:
    """A parsed value and where its text lies: `text[start:end]`."""

    value: Any
    start: int
    end: int
    # Objects only: members by key (the last of duplicate keys wins, as in JSON.parse), in order.
    members: dict[str, Member] = field(default_factory=dict)
    ordered: list[Member] = field(default_factory=list)
    trailing_comma: bool = False


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line} column {column}"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.has_comments = False

    def fail(self, message: str, index: int | None = None) -> JsoncError:
        return JsoncError(f"{message} at {_position(self.text, self.pos if index is None else index)}")

    def skip(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char in " \t\r\n\ufeff":
                self.pos += 1
            elif text.startswith("//", self.pos):
                self.has_comments = True
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif text.startswith("/*", self.pos):
                self.has_comments = True
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.fail("unterminated /* comment")
                self.pos = end + 2
            else:
                return

    def value(self) -> Node:
        self.skip()
        if self.pos >= len(self.text):
            raise self.fail("expected a value, found the end of the file")
        char = self.text[self.pos]
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char == '"':
            start = self.pos
            return Node(self.string(), start, self.pos)
        match = _NUMBER.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return Node(json.loads(match.group()), match.start(), match.end())
        for word, literal in _LITERALS.items():
            if self.text.startswith(word, self.pos):
                start = self.pos
                self.pos += len(word)
                return Node(literal, start, self.pos)
        raise self.fail(f"unexpected character {char!r}")

    def string(self) -> str:
        try:
            value, end = _scanstring(self.text, self.pos + 1, True)
        except json.JSONDecodeError as error:
            raise self.fail(f"invalid string: {error.msg}", error.pos) from error
        self.pos = end
        return str(value)

    def object(self) -> Node:
        node = Node({}, self.pos, -1)
        self.pos += 1
        while True:
            self.skip()
            if self.text.startswith("}", self.pos):
                break
            if not self.text.startswith('"', self.pos):
                raise self.fail("expected a quoted key or '}'")
            key_start = self.pos
            key = self.string()
            self.skip()
            if not self.text.startswith(":", self.pos):
                raise self.fail(f"expected ':' after key {key!r}")
            self.pos += 1
            child = self.value()
            member = Member(key, key_start, child)
            node.members[key] = member
            node.ordered.append(member)
            node.value[key] = child.value
            self.skip()
            node.trailing_comma = False
            if self.text.startswith(",", self.pos):
                self.pos += 1
                node.trailing_comma = True
                continue
            if not self.text.startswith("}", self.pos):
                raise self.fail("expected ',' or '}' in an object")
        self.pos += 1
        node.end = self.pos
        return node

    def array(self) -> Node:
        node = Node([], self.pos, -1)
        self.pos += 1
        while True:
            self.skip()
            if self.text.startswith("]", self.pos):
                break
            child = self.value()
            node.value.append(child.value)
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            if not self.text.startswith("]", self.pos):
                raise self.fail("expected ',' or ']' in an array")
        self.pos += 1
        node.end = self.pos
        return node


@dataclass
class Document:
    text: str
    root: Node
    has_comments: bool


def parse(text: str) -> Document:
    parser = _Parser(text)
    root = parser.value()
    parser.skip()
    if parser.pos != len(text):
        raise parser.fail("unexpected text after the top-level value")
    return Document(text, root, parser.has_comments)


# ----- editing ----------------------------------------------------------------------------------


def indent_unit(text: str) -> str:
    """The file's own indentation step (its first indented line), two spaces when it has none."""
    for line in text.splitlines():
        stripped = line.lstrip(" \t")
        if stripped and len(stripped) < len(line):
            return line[: len(line) - len(stripped)]
    return "  "


def _line_indent(text: str, index: int) -> str:
    line_start = text.rfind("\n", 0, index) + 1
    line = text[line_start:index]
    return line[: len(line) - len(line.lstrip(" \t"))]


def dumps_at(value: Any, indent: str, unit: str) -> str:
    """`value` as JSON laid out for a position whose line is indented by `indent`."""
    return json.dumps(value, indent=unit, ensure_ascii=False).replace("\n", "\n" + indent)


def replace_value(document: Document, node: Node, value: Any) -> str:
    """The text with `node`'s value replaced (comments inside that value go with it)."""
    text = document.text
    indent = _line_indent(text, node.start)
    return text[: node.start] + dumps_at(value, indent, indent_unit(text)) + text[node.end :]


def insert_member(document: Document, obj: Node, key: str, value: Any) -> str:
    """The text with `"key": value` added as the last member of object `obj`, comments kept."""
    text = document.text
    unit = indent_unit(text)
    close = obj.end - 1
    base = _line_indent(text, obj.start)
    member_indent = base + unit
    member = json.dumps(key, ensure_ascii=False) + ": " + dumps_at(value, member_indent, unit)
    # Insert after the last thing before '}' that is not whitespace (a value, a comma or a comment), so
    # a comment that ends the object's last line stays on that line.
    anchor = close
    while anchor > obj.start + 1 and text[anchor - 1] in " \t\r\n":
        anchor -= 1
    closing_on_own_line = "\n" in text[anchor:close]
    insertion = "\n" + member_indent + member
    if not closing_on_own_line:
        insertion += "\n" + base
    if obj.ordered and not obj.trailing_comma:
        # The comma goes right after the last value, before any comment that follows it.
        last_end = obj.ordered[-1].node.end
        text = text[:last_end] + "," + text[last_end:]
        anchor += 1
    return text[:anchor] + insertion + text[anchor:]
