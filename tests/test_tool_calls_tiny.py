"""Tool calls on real backends: specgate's launcher (mlx_lm.server) on the tiny generated pair.

The pair gets a Qwen2.5-shaped tool template (tools in the system turn, earlier calls as `<tool_call>`
JSON with `arguments | tojson`, tool results as `<tool_response>`), so mlx_lm.server renders tools and
earlier calls as it does for the real model and infers the same `<tool_call>` parser. What is checked:
the gateway's parse leaves greedy output identical with and without the draft; a second turn's earlier
call renders the same whether its arguments came as a JSON string or an object; a forced call's
opening is in the prompt (and the same for both backends).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import GatewayProcess, running_gateway

SPEC = "tools/speculative"
BASE = "tools/baseline"

QWEN_TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    '\n<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} a file",
            "parameters": {"type": "object", "properties": {"filePath": {"type": "string"}}, "required": ["filePath"]},
        },
    }
    for name in ("read", "write")
]
ASK = [{"role": "user", "content": "Read the file /x/hello.py and tell me what it does."}]


def with_tool_template(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = QWEN_TOOL_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))
    return target


@pytest.fixture(scope="module")
def gateway(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("tools-tiny")
    main = with_tool_template(tiny_pair.main, workdir / "main")
    draft = with_tool_template(tiny_pair.draft, workdir / "draft")
    profiles = f"""
[profiles."{SPEC}"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 3
sampling = {{ temperature = 0.0 }}

[profiles."{BASE}"]
model = "{main}"
sampling = {{ temperature = 0.0 }}
"""
    env = {"SPECGATE_MAX_BACKENDS": "2", "SPECGATE_PRELOAD": f'["{SPEC}", "{BASE}"]'}
    with running_gateway(workdir, profiles, env) as running:
        yield running


def answer(gateway: GatewayProcess, model: str, messages: list[Any], **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": 40, **extra}
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def streamed_answer(gateway: GatewayProcess, model: str, messages: list[Any], **extra: Any) -> tuple[str, list[Any]]:
    body = {"model": model, "messages": messages, "max_tokens": 40, "stream": True, **extra}
    content, calls = [], []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    content.append(choice["delta"].get("content") or "")
                    calls.extend(choice["delta"].get("tool_calls") or ())
    return "".join(content), calls


def decision(body: dict[str, Any]) -> tuple[Any, ...]:
    """What greedy equality compares: text, calls (names and arguments, not their random ids), finish."""
    choice = body["choices"][0]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or ()]
    return choice["message"]["content"], calls, choice["finish_reason"], body["usage"]["completion_tokens"]


def test_greedy_output_with_tools_is_the_same_with_and_without_the_draft(gateway: GatewayProcess) -> None:
    baseline = answer(gateway, BASE, ASK, tools=TOOLS)
    speculative = answer(gateway, SPEC, ASK, tools=TOOLS)
    assert decision(speculative) == decision(baseline)
    assert speculative["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0
    # The same through a stream, and the parse changed nothing for this (random) model's text.
    assert streamed_answer(gateway, SPEC, ASK, tools=TOOLS)[0] == (baseline["choices"][0]["message"]["content"] or "")
    plain = answer(gateway, BASE, ASK)
    assert plain["usage"]["prompt_tokens"] < baseline["usage"]["prompt_tokens"]  # the template rendered the tools


def second_turn(arguments: Any) -> list[Any]:
    call = {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": arguments}}
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "print('hello')"},
    ]


def test_second_turn_renders_the_earlier_call_for_the_template(gateway: GatewayProcess) -> None:
    as_string = answer(gateway, BASE, second_turn(json.dumps({"filePath": "/x/hello.py"})), tools=TOOLS)
    as_object = answer(gateway, BASE, second_turn({"filePath": "/x/hello.py"}), tools=TOOLS)
    speculative = answer(gateway, SPEC, second_turn(json.dumps({"filePath": "/x/hello.py"})), tools=TOOLS)
    # Arguments sent as a JSON string render as the object (`tojson` of a string would quote it again).
    assert as_string["usage"]["prompt_tokens"] == as_object["usage"]["prompt_tokens"]
    assert decision(as_string) == decision(as_object) == decision(speculative)
    first_turn = answer(gateway, BASE, ASK, tools=TOOLS)
    assert as_string["usage"]["prompt_tokens"] > first_turn["usage"]["prompt_tokens"]


def test_forced_call_opening_is_prefilled_for_both_backends(gateway: GatewayProcess) -> None:
    named = {"type": "function", "function": {"name": "read"}}
    auto = answer(gateway, BASE, ASK, tools=TOOLS)
    baseline = answer(gateway, BASE, ASK, tools=TOOLS, tool_choice=named)
    speculative = answer(gateway, SPEC, ASK, tools=TOOLS, tool_choice=named)
    assert decision(speculative) == decision(baseline)
    # The opening `<tool_call>\n{"name": "read", "arguments": ` is in the prompt: more prompt tokens.
    assert baseline["usage"]["prompt_tokens"] > auto["usage"]["prompt_tokens"]
    content, calls, _, _ = decision(baseline)
    if calls:
        assert [name for name, _ in calls] == ["read"]
    else:
        # A random model does not finish the call: the opening and what followed come back as text.
        assert content.startswith('<tool_call>\n{"name": "read", "arguments": ')
    required = answer(gateway, SPEC, ASK, tools=TOOLS, tool_choice="required")
    assert decision(required) == decision(answer(gateway, BASE, ASK, tools=TOOLS, tool_choice="required"))
