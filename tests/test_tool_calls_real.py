"""Issue 16 on the real default model: Qwen2.5-Coder-1.5B asked, with OpenCode-like tools, to read a file.

Slow (`pytest -m slow`): it loads the 1.5B model (and its 0.5B draft) from the user's model store.
The model writes its call as JSON in its content; the gateway must hand it over as `tool_calls`, the
same with and without the draft; forced calls must name the tool; a second turn with the tool's result
must be rendered and answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from app.models.store import default_store_dir
from tests.harness import running_gateway

pytestmark = pytest.mark.slow

BASE = "baseline/coder-1.5b"
SPEC = "speculative/coder-1.5b"
PROFILES = f"""
[profiles."{BASE}"]
model = "catalog:qwen2.5-coder-1.5b-instruct"
sampling = {{ temperature = 0.0 }}

[profiles."{SPEC}"]
model = "catalog:qwen2.5-coder-1.5b-instruct"
draft_model = "catalog:qwen2.5-coder-0.5b-instruct"
num_draft_tokens = 4
sampling = {{ temperature = 0.0 }}
"""


def _tool(name: str, description: str, **properties: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string", "description": text} for key, text in properties.items()},
                "required": list(properties),
            },
        },
    }


# The shape of OpenCode's tool list (names and arguments as it sends them).
TOOLS = [
    _tool("bash", "Run a shell command", command="The command to run"),
    _tool("read", "Read a file from the filesystem", filePath="The absolute path to the file to read"),
    _tool("write", "Write a file", filePath="The absolute path", content="The content"),
    _tool("edit", "Replace text in a file", filePath="The path", oldString="Text to replace", newString="New text"),
    _tool("glob", "Find files by glob pattern", pattern="The glob pattern"),
    _tool("grep", "Search file contents with a regex", pattern="The regex"),
    _tool("list", "List a directory", path="The directory"),
    _tool("webfetch", "Fetch a URL", url="The URL"),
    _tool("todowrite", "Write the todo list", todos="The todo list as JSON"),
    _tool("task", "Run a sub-agent", prompt="The task"),
]
ASK = [{"role": "user", "content": "Read the file /tmp/project/hello.py."}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    env = {
        "SPECGATE_MODEL_STORE": str(default_store_dir()),
        "SPECGATE_BACKEND_START_TIMEOUT": "900",
        "SPECGATE_MAX_BACKENDS": "1",  # 1.5B float32 with and without a draft: one at a time
    }
    with (
        running_gateway(tmp_path_factory.mktemp("real-tools"), PROFILES, env) as gateway,
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=900) as sdk,
    ):
        yield sdk


def calls_of(reply: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in reply.choices[0].message.tool_calls or ()]


def test_the_default_model_calls_read_the_same_with_and_without_the_draft(client: openai.OpenAI) -> None:
    baseline = client.chat.completions.create(model=BASE, messages=ASK, tools=TOOLS, max_tokens=80)
    assert calls_of(baseline) == [("read", {"filePath": "/tmp/project/hello.py"})], baseline
    assert baseline.choices[0].finish_reason == "tool_calls"
    assert "filePath" not in (baseline.choices[0].message.content or "")

    # Forced calls: the launcher starts the answer with the call's opening (app/launcher/prefill.py).
    question = [{"role": "user", "content": "What does the script /tmp/project/hello.py print?"}]
    named = {"type": "function", "function": {"name": "read"}}
    forced = client.chat.completions.create(
        model=BASE, messages=question, tools=TOOLS, tool_choice=named, max_tokens=80
    )
    assert [name for name, _ in calls_of(forced)] == ["read"], forced
    assert forced.choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(
        model=BASE, messages=question, tools=TOOLS, tool_choice="required", max_tokens=80
    )
    assert calls_of(required), required

    chunks = client.chat.completions.create(model=SPEC, messages=ASK, tools=TOOLS, max_tokens=80, stream=True)
    names, arguments, finish = {}, {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        for piece in chunk.choices[0].delta.tool_calls or ():
            assert piece.function is not None
            if piece.function.name:
                names[piece.index] = piece.function.name
            arguments[piece.index] = arguments.get(piece.index, "") + (piece.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert [(names[i], json.loads(arguments[i])) for i in sorted(names)] == calls_of(baseline)
    assert finish == "tool_calls"

    call = (baseline.choices[0].message.tool_calls or [])[0]
    second = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "print('hello, world')\n"},
    ]
    answer = client.chat.completions.create(model=SPEC, messages=second, tools=TOOLS, max_tokens=60)
    # The turn rendered with the call and its result (what the model does next is its own choice: the 1.5B
    # model, given the file, tends to call another tool rather than answer).
    assert answer.usage is not None
    assert baseline.usage is not None
    assert answer.usage.prompt_tokens > baseline.usage.prompt_tokens + 10
    assert answer.choices[0].finish_reason in ("stop", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
