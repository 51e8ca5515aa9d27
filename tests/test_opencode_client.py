"""The real OpenCode client (npm `opencode-ai`) against the gateway, in front of a scripted fake backend.

The backend answers OpenCode's first turn with a tool call written as Qwen2.5-Coder writes one (a fenced
JSON object), which the gateway turns into OpenAI `tool_calls`; OpenCode must run its `read` tool and send
the file back, and the backend answers that turn with text OpenCode prints. The backend records every
request body it receives, so the test sees what OpenCode really sent.

The script picks a reply by the number of assistant turns in a request (fake_backend's "Scripted replies"),
not by request count, so the extra requests do not shift it: the gateway's warm-up, and OpenCode's
title request (no tools, no assistant turn), which gets the first reply as plain text since a request
without tools is never given tool calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import FAKE_BACKEND, PYTHON, ROOT, GatewayProcess, fake_model_dir, running_gateway
from tests.npm import ensure_npm_program

OPENCODE_VERSION = "1.18.33"  # the version this test was written against; the cache keeps one per version
PROFILE = "coder/fake"
PROVIDER = "specgate"
HELLO = 'print("hi from specgate")\n'
FINAL_TEXT = "It prints: hi from specgate"
RUN_TIMEOUT_S = 90

# OpenCode with nothing from this machine and nothing from the network: its own config, data and cache
# folders, no models.dev fetch, no update check, no sharing, no plugins or LSP downloads.
OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}


def toml_command(items: list[str]) -> str:
    # JSON string escapes are TOML basic-string escapes: newlines and quotes in replies survive.
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def tool_call_text(path: Path) -> str:
    call = {"name": "read", "arguments": {"filePath": str(path)}}
    return f"I will read the file.\n```json\n{json.dumps(call)}\n```"


@dataclass
class Setup:
    gateway: GatewayProcess
    project: Path
    hello: Path
    requests_log: Path
    env: dict[str, str]

    def backend_requests(self) -> list[dict[str, Any]]:
        lines = self.requests_log.read_text().splitlines() if self.requests_log.exists() else []
        return [json.loads(line) for line in lines]


@pytest.fixture
def opencode(request: pytest.FixtureRequest) -> str:
    return ensure_npm_program(request.config.cache, "opencode", "opencode-ai", OPENCODE_VERSION)


def isolated_env(home: Path, config: Path) -> dict[str, str]:
    folders = {
        name: home / name.lower() for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        **{name: str(folder) for name, folder in folders.items()},
        "OPENCODE_CONFIG": str(config),
        **OFFLINE_ENV,
    }


def write_opencode_config(gateway: GatewayProcess, path: Path) -> None:
    command = [PYTHON, "-m", "app.cli", "opencode-config", "--url", gateway.url, "--write", str(path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    config = json.loads(path.read_text())
    config.update({"autoupdate": False, "share": "disabled"})
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    project = tmp_path / "project"
    project.mkdir()
    hello = project / "hello.py"
    hello.write_text(HELLO)
    requests_log = tmp_path / "backend-requests.jsonl"
    flags = ["--reply-text", tool_call_text(hello), "--reply-text", FINAL_TEXT, "--record-requests", str(requests_log)]
    model = fake_model_dir(tmp_path)
    backend = toml_command([*FAKE_BACKEND, *flags])
    profiles = f'[profiles."{PROFILE}"]\nmodel = "{model}"\nbackend = {{ command = {backend} }}\n'
    with running_gateway(tmp_path / "gateway", profiles) as gateway:
        config = tmp_path / "opencode.json"
        write_opencode_config(gateway, config)
        yield Setup(gateway, project, hello, requests_log, isolated_env(tmp_path / "home", config))


def run_opencode(opencode: str, setup: Setup, prompt: str) -> subprocess.CompletedProcess[str]:
    command = [opencode, "run", "-m", f"{PROVIDER}/{PROFILE}", prompt]
    try:
        return subprocess.run(
            command, cwd=setup.project, env=setup.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"opencode run did not finish in {RUN_TIMEOUT_S}s\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}\n"
            f"backend saw: {setup.backend_requests()!r}\ngateway log: {setup.gateway.log()[-3000:]}"
        ) from None


def tool_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "tool"]


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def test_opencode_runs_the_tool_and_prints_the_answer(opencode: str, setup: Setup) -> None:
    started = time.monotonic()
    result = run_opencode(opencode, setup, "Read hello.py and tell me what it prints")
    elapsed = time.monotonic() - started
    seen = setup.backend_requests()
    context = f"\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}\nbackend saw: {json.dumps(seen)[:4000]}"
    assert result.returncode == 0, f"opencode exited {result.returncode} after {elapsed:.1f}s{context}"
    assert FINAL_TEXT in result.stdout, context

    with_tools = [body for body in seen if body.get("tools")]
    assert with_tools, f"no request carried OpenCode's tools{context}"
    read_tools = [t for t in with_tools[0]["tools"] if t.get("function", {}).get("name") == "read"]
    assert read_tools, f"OpenCode offered no `read` tool{context}"
    assert "filePath" in read_tools[0]["function"]["parameters"]["properties"]

    # OpenCode ran the tool: its next request carries the gateway's call back, and the file's text as the result.
    answered = [body for body in seen if tool_messages(body)]
    assert answered, f"no request carried a tool result{context}"
    calls = [c for m in answered[0]["messages"] if m.get("role") == "assistant" for c in m.get("tool_calls") or ()]
    assert [c["function"]["name"] for c in calls] == ["read"], context
    # The gateway hands the backend the arguments as an object (app/proxy/tools.py: the chat template wants one).
    assert calls[0]["function"]["arguments"] == {"filePath": str(setup.hello)}
    result_message = tool_messages(answered[0])[0]
    assert result_message.get("tool_call_id") == calls[0]["id"]
    assert "hi from specgate" in message_text(result_message), context

    status = httpx.get(f"{setup.gateway.url}/status.json", timeout=5.0).json()
    reasons = [r["finish_reason"] for r in status["requests"] if r["profile"] == PROFILE]
    assert "tool_calls" in reasons, reasons
    assert "stop" in reasons, reasons
