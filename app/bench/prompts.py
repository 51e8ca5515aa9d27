"""Prompt sets: the built-in ones (coding, chat, editing, the five queries) and prompt files (JSONL/JSON).

A prompt file holds objects, one per JSONL line or as a JSON list (or `{"prompts": [...]}`):

    {"id": "reverse", "prompt": "Write a Python function that reverses a string."}
    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}

`prompt` is shorthand for one user message. Optional fields: `id`, `max_tokens` (overrides the bench's
`--max-tokens` for this prompt), `tools` (OpenAI tools list), `expect` (`"tool"` or `"answer"`, used by the
discrimination check).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.bench.editing import EDITING

Expectation = Literal["tool", "answer"]


class PromptSetError(Exception):
    """A prompt set that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    expect: Expectation | None = None


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[Prompt] = field(default_factory=list)

    def limited(self, count: int | None) -> PromptSet:
        return self if count is None else PromptSet(self.name, self.prompts[:count])


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _set(name: str, texts: list[tuple[str, str]]) -> PromptSet:
    return PromptSet(name, [Prompt(id=f"{name}/{key}", messages=_user(text)) for key, text in texts])


# Short prompts on purpose: on a CPU a prompt token costs as much as a generated one, and the bench is
# about decoding speed. Coding answers are where drafts are expected to do well (predictable syntax).
CODING = [
    ("reverse", "Write a Python function that reverses a string. Reply with code only."),
    ("fizzbuzz", "Write FizzBuzz in Python for 1 to 100. Reply with code only."),
    ("dataclass", "Write a Python dataclass Point with x and y floats and a distance method. Code only."),
    ("sql", "Write a SQL query that returns the ten most recent orders with their customer names."),
]
CHAT = [
    ("di", "Explain in two sentences what dependency injection is."),
    ("tcp", "What is the difference between TCP and UDP? Answer briefly."),
    ("haiku", "Write a haiku about compilers."),
    ("advice", "Give three short tips for writing readable code."),
]

# The project's original five-query plan: three want a tool, two a direct answer.
FIVE_QUERIES: list[tuple[str, str, Expectation]] = [
    ("django-views", "Find all Django views in the codebase", "tool"),
    ("user-serializer", "Show me the UserSerializer implementation", "tool"),
    ("dependency-injection", "What is dependency injection?", "answer"),
    ("async-await", "Find all uses of async/await", "tool"),
    ("orm-vs-sql", "What's the difference between ORM and raw SQL?", "answer"),
]

# The tool set of the discrimination check: what a coding agent offers a model.
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "search_code",
            "description": "Search the project's source files for a text or regular expression pattern; "
            "returns matching lines with file paths and line numbers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "text or regular expression to look for"},
                    "path": {"type": "string", "description": "directory to search, default the project root"},
                },
                "required": ["pattern"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the project and return its contents.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "description": "path relative to the project root"}},
                "required": ["path"],
            },
        },
    },
]


def five_queries(with_tools: bool) -> PromptSet:
    return PromptSet(
        "queries",
        [
            Prompt(
                id=f"queries/{key}",
                messages=_user(text),
                tools=TOOLS if with_tools else None,
                expect=expect,
            )
            for key, text, expect in FIVE_QUERIES
        ],
    )


BUILTIN: dict[str, Callable[[], PromptSet]] = {
    "coding": lambda: _set("coding", CODING),
    "chat": lambda: _set("chat", CHAT),
    "queries": lambda: five_queries(with_tools=False),
    # "Return the whole file" edits: answers that mostly repeat the prompt (prompt lookup's case).
    "editing": lambda: _set("editing", EDITING),
}


def load_prompt_set(spec: str) -> PromptSet:
    """A built-in set by name, a JSONL/JSON file by path, or several of either joined by commas.

    Prompt ids start with their set's name, so a report can be split by prompt class later.
    """
    if "," in spec:
        parts = [load_prompt_set(part.strip()) for part in spec.split(",") if part.strip()]
        return PromptSet("+".join(part.name for part in parts), [p for part in parts for p in part.prompts])
    builtin = BUILTIN.get(spec)
    if builtin is not None:
        return builtin()
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(BUILTIN)
        raise PromptSetError(f"{spec!r} is neither a built-in prompt set ({names}) nor a file")
    return parse_prompt_file(path.read_text(encoding="utf-8"), path.stem, str(path))


def parse_prompt_file(text: str, name: str, source: str = "<string>") -> PromptSet:
    items = _items(text, source)
    if not items:
        raise PromptSetError(f"{source}: no prompts in the file")
    return PromptSet(name, [_prompt(item, f"{name}/{index}", f"{source}: prompt {index}") for index, item in items])


def _items(text: str, source: str) -> list[tuple[int, Any]]:
    # A whole-file JSON document (list, or {"prompts": [...]}, or one prompt) first; else JSONL.
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return _jsonl_items(text, source)
    if isinstance(document, dict):
        document = document.get("prompts", [document])
    if not isinstance(document, list):
        raise PromptSetError(f"{source}: expected a list of prompts")
    return list(enumerate(document))


def _jsonl_items(text: str, source: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{source}: line {number}: invalid JSON: {error.msg}") from error
    return items


def _prompt(item: Any, default_id: str, where: str) -> Prompt:
    if not isinstance(item, dict):
        raise PromptSetError(f"{where}: expected an object")
    if isinstance(item.get("prompt"), str):
        messages = _user(item["prompt"])
    elif isinstance(item.get("messages"), list) and item["messages"]:
        messages = item["messages"]
    else:
        raise PromptSetError(f"{where}: needs 'prompt' (a string) or 'messages' (a non-empty list)")
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise PromptSetError(f"{where}: 'max_tokens' must be a positive integer")
    expect = item.get("expect")
    if expect not in (None, "tool", "answer"):
        raise PromptSetError(f'{where}: \'expect\' must be "tool" or "answer"')
    tools = item.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise PromptSetError(f"{where}: 'tools' must be a list")
    identifier = str(item.get("id", default_id))
    return Prompt(id=identifier, messages=messages, max_tokens=max_tokens, tools=tools, expect=expect)
