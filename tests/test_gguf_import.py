"""GGUF import: synthetic files from known weights come back as the same weights, load and generate."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.models import safetensors_stream
from app.models.errors import GGUFImportError, UnsupportedModel
from app.models.gguf_import import import_gguf
from app.models.store import ModelStore
from app.testing.tiny_model import CHAT_TEMPLATE
from tests.models_helpers import (
    HEADS,
    KV_HEADS,
    TEXTS,
    TinyGGUF,
    llama_cpp_permute,
    transformers_reference,
    write_tiny_gguf,
)


def _load_weights(directory: Path) -> dict[str, np.ndarray[Any, Any]]:
    import mlx.core as mx

    weights: dict[str, np.ndarray[Any, Any]] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        for name, value in mx.load(str(file)).items():
            weights[name] = np.array(value.astype(mx.float32))
    return weights


def _assert_store_clean(store: ModelStore) -> None:
    leftovers = [p.name for p in store.root.iterdir() if not p.name.startswith(".")] if store.root.exists() else []
    staging = list((store.root / ".staging").iterdir()) if (store.root / ".staging").exists() else []
    assert leftovers == []
    assert staging == []


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_float32_import_returns_the_exact_weights(tmp_path: Path, store: ModelStore, architecture: str) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", architecture)
    directory = import_gguf(tiny.path, store, "tiny", dtype="float32")
    weights = _load_weights(directory)
    assert set(weights) == set(tiny.expected)
    for name, expected in tiny.expected.items():
        assert weights[name].shape == expected.shape, name
        np.testing.assert_array_equal(weights[name], expected, err_msg=name)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == architecture
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"


def test_llama_q8_0_undoes_the_rotary_permutation(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", quant="Q8_0")
    weights = _load_weights(import_gguf(tiny.path, store, "tiny", dtype="float32"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert q in tiny.quantized
    np.testing.assert_array_equal(weights[q], tiny.expected[q])
    # The forward permutation applied once more (the classic bug) is measurably different.
    assert not np.allclose(weights[q], llama_cpp_permute(tiny.expected[q], HEADS))
    # Within Q8_0's error of the original, unquantized weights.
    original = _original_weights(tiny)
    for name in tiny.quantized:
        scale = np.abs(original[name]).max()
        np.testing.assert_allclose(weights[name], original[name], atol=scale / 100, err_msg=name)


def _original_weights(tiny: TinyGGUF) -> dict[str, np.ndarray[Any, Any]]:
    from tests.models_helpers import tiny_weights

    return tiny_weights(tiny.architecture, tiny.expected["model.embed_tokens.weight"].shape[0])


@pytest.mark.parametrize(("dtype", "rtol"), [("float16", 2**-10), ("bfloat16", 2**-7)])
def test_half_precision_storage_is_within_rounding(tmp_path: Path, store: ModelStore, dtype: str, rtol: float) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", quant="Q8_0")
    directory = import_gguf(tiny.path, store, "tiny", dtype=dtype)
    weights = _load_weights(directory)
    for name, expected in tiny.expected.items():
        np.testing.assert_allclose(weights[name], expected, rtol=rtol, atol=1e-7, err_msg=name)
    assert json.loads((directory / "specgate.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize(("architecture", "quant", "tied"), [("qwen2", "Q8_0", False), ("llama", "Q4_1", True)])
def test_imported_model_loads_and_computes_the_reference_logits(
    tmp_path: Path, store: ModelStore, architecture: str, quant: str, tied: bool
) -> None:
    import mlx.core as mx
    from mlx_lm import generate, load

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", architecture, quant=quant, tied=tied)
    model, tokenizer = load(str(import_gguf(tiny.path, store, "tiny", dtype="float32")))
    reference = _reference_model(tiny, tied)
    tokens = mx.array([[5, 17, 42, 99, 3, 250]])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), rtol=1e-4, atol=1e-4)
    text = generate(model, tokenizer, "The quick brown fox", max_tokens=8)
    assert isinstance(text, str)
    assert len(tokenizer.encode(text)) > 0


def _reference_model(tiny: TinyGGUF, tied: bool) -> Any:
    """The same network built directly by mlx_lm from the known weights, independent of config.json."""
    import importlib

    import mlx.core as mx

    from tests.models_helpers import HIDDEN, INTERMEDIATE, LAYERS

    module = importlib.import_module(f"mlx_lm.models.{tiny.architecture}")
    args = module.ModelArgs.from_dict(
        {
            "model_type": tiny.architecture,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "intermediate_size": INTERMEDIATE,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-6,
            "vocab_size": tiny.expected["model.embed_tokens.weight"].shape[0],
            "rope_theta": 10000.0,
            "tie_word_embeddings": tied,
        }
    )
    model = module.Model(args)
    model.load_weights([(name, mx.array(value)) for name, value in tiny.expected.items()])
    return model


def test_sharded_output_has_an_index_and_loads(
    tmp_path: Path, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_lm import load

    monkeypatch.setattr(safetensors_stream, "DEFAULT_SHARD_BYTES", 40_000)
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    directory = import_gguf(tiny.path, store, "tiny", dtype="float32")
    shards = sorted(p.name for p in directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny.expected)
    assert set(index["weight_map"].values()) == set(shards)
    load(str(directory))


def test_progress_reports_tensors_and_bytes(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    messages: list[str] = []
    import_gguf(tiny.path, store, "tiny", progress=messages.append)
    count = len(tiny.expected)
    assert any(f"tensor {count}/{count}" in m and "MB" in m for m in messages)
    assert messages[0].startswith("importing tiny.gguf: qwen2")


def test_existing_name_needs_replace(tmp_path: Path, store: ModelStore) -> None:
    first = write_tiny_gguf(tmp_path / "a" / "tiny.gguf", "qwen2", seed=1)
    second = write_tiny_gguf(tmp_path / "b" / "tiny.gguf", "qwen2", seed=2)
    import_gguf(first.path, store, "tiny", dtype="float32")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(second.path, store, "tiny")
    directory = import_gguf(second.path, store, "tiny", dtype="float32", replace=True)
    np.testing.assert_array_equal(_load_weights(directory)["model.norm.weight"], second.expected["model.norm.weight"])
    assert [m.manifest.source for m in store.models()] == [f"gguf:{second.path.resolve()}"]


def test_leftovers_of_a_killed_import_are_removed(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    stale = store.root / ".staging" / "tiny+abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    other = store.root / ".staging" / "tiny-7b+abc123"  # another model's import: not ours to touch
    other.mkdir()
    import_gguf(tiny.path, store, "tiny")
    assert not stale.exists()
    assert other.exists()


# --- broken files: a clear error and nothing left in the store --------------------------------


def test_not_a_gguf_file(tmp_path: Path, store: ModelStore) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        import_gguf(path, store, "bad")
    _assert_store_clean(store)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_file(tmp_path: Path, store: ModelStore, keep: float) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", quant="Q8_0")
    data = tiny.path.read_bytes()
    tiny.path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFImportError, match="truncated"):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_corrupt_header(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    data = bytearray(tiny.path.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    tiny.path.write_bytes(bytes(data))
    with pytest.raises(GGUFImportError, match="corrupt or truncated"):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_corrupt_tensor_values(tmp_path: Path, store: ModelStore) -> None:
    import gguf

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    reader = gguf.GGUFReader(tiny.path)
    norm = next(t for t in reader.tensors if t.name == "blk.1.ffn_norm.weight")
    data = bytearray(tiny.path.read_bytes())
    data[norm.data_offset : norm.data_offset + 4] = np.float32(np.inf).tobytes()
    tiny.path.write_bytes(bytes(data))
    with pytest.raises(GGUFImportError, match=r"blk\.1\.ffn_norm\.weight.*non-finite"):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_unknown_architecture(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "mamba")
    with pytest.raises(UnsupportedModel, match=r"architecture 'mamba' is not supported; supported: llama, qwen2"):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_missing_layers(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", block_count=3)
    with pytest.raises(GGUFImportError, match=r"tensors missing \(first: model\.layers\.2\."):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_unknown_pre_tokenizer(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", pre="chatglm-bpe")
    with pytest.raises(UnsupportedModel, match="pre-tokenizer 'chatglm-bpe'"):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


# --- tokenizer: agrees with references independent of the importer ---------------------------


def _imported_tokenizer(tiny: TinyGGUF, store: ModelStore) -> Any:
    """The tokenizer as mlx_lm (and so the backend) loads it from the imported directory."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(import_gguf(tiny.path, store, "tiny"))


def _chat_texts(tokenizer: Any) -> list[str]:
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Sort [3, 1, 2] — quickly! 🚀"},
    ]
    return [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]


def test_tokenizer_matches_the_original_tokenizer(tmp_path: Path, store: ModelStore) -> None:
    """The GGUF vocabulary came from a tokenizer.json trained by `tokenizers` (GPT-2 split): the
    rebuilt tokenizer must encode exactly as that original does."""
    from tokenizers import Tokenizer

    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", pre="gpt-2")
    original = Tokenizer.from_file(str(tiny.tokenizer_json))
    imported = _imported_tokenizer(tiny, store)
    texts = TEXTS + _chat_texts(imported)
    assert "<|im_start|>system\nYou write Python.<|im_end|>" in texts[-1]
    for text in texts:
        ids = imported.encode(text)
        assert ids == original.encode(text).ids, text
        assert imported.decode(ids) == text


# transformers forces Qwen2's own tokenizer class on model_type qwen2, so other splits go with llama.
ARCH_AND_PRE = [("qwen2", "qwen2"), ("llama", "gpt-2"), ("llama", "smollm")]


@pytest.mark.parametrize(("architecture", "pre"), ARCH_AND_PRE[:2])
def test_tokenizer_matches_transformers_gguf_converter(
    tmp_path: Path, store: ModelStore, architecture: str, pre: str
) -> None:
    """transformers' own GGUF tokenizer conversion is an independent implementation (it has no
    'smollm' split, so that one is checked against llama.cpp and the real model only)."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", architecture, pre=pre)
    reference = transformers_reference(tiny.path)
    imported = _imported_tokenizer(tiny, store)
    for text in [*TEXTS, *_chat_texts(imported)]:
        assert imported.encode(text) == reference.encode(text).ids, text


@pytest.mark.parametrize(("architecture", "pre"), ARCH_AND_PRE)
def test_tokenizer_matches_llama_cpp(tmp_path: Path, store: ModelStore, architecture: str, pre: str) -> None:
    """llama.cpp's own tokenizer, where llama-cpp-python is installed (it ships no wheel here:
    building it from source takes long, so it is not in the test extra)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", architecture, pre=pre)
    reference = llama_cpp.Llama(str(tiny.path), vocab_only=True, verbose=False)
    imported = _imported_tokenizer(tiny, store)
    for text in [*TEXTS, *_chat_texts(imported)]:
        expected = reference.tokenize(text.encode(), add_bos=False, special=True)
        assert imported.encode(text) == expected, text


def test_tokenizer_that_transformers_would_override_is_refused(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", pre="gpt-2")
    with pytest.raises(
        UnsupportedModel, match=r"loads this tokenizer as Qwen2Tokenizer, which splits text differently"
    ):
        import_gguf(tiny.path, store, "bad")
    _assert_store_clean(store)


def test_tokenizer_config_carries_template_and_special_tokens(tmp_path: Path, store: ModelStore) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", add_bos=True)
    directory = import_gguf(tiny.path, store, "tiny")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<|endoftext|>", "<|im_end|>")
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(directory)
    ids = tokenizer.encode("hello")
    assert ids[0] == 0  # BOS when the file asks for it
    assert ids.count(0) == 1  # and only once
    assert tokenizer.eos_token_id == 2
