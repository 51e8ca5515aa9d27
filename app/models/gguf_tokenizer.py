"""Rebuild a Hugging Face `tokenizer.json` and `tokenizer_config.json` from GGUF tokenizer metadata.

A GGUF carries the vocabulary, the merges, the token types and the name of the pre-tokenizer
(`tokenizer.ggml.pre`, llama.cpp's name for the split pattern), not the tokenizer itself. Only
byte-level BPE (`tokenizer.ggml.model = gpt2`) is rebuilt: it is what Qwen2, SmolLM, Llama 3 and
most current models use. The split patterns below are the ones in those models' own
`tokenizer.json` files, which is what the models were trained with.

Why by hand: transformers can build a tokenizer from a GGUF (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`), but its GGUF reader imports torch, and without it the call fails ("No module named
'torch'" with transformers 5.24). PyTorch is not a dependency (the backends run MLX), so the tokenizer
is built with the `tokenizers` package, which transformers itself wraps, and then checked against how
transformers loads the result (`_check_as_loaded`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from app.models.errors import UnsupportedModel

# llama.cpp token types (gguf.TokenType): 3 = CONTROL (special), 4 = USER_DEFINED (added, not special).
_CONTROL = 3
_USER_DEFINED = 4

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # SmolLM and StarCoder: every digit alone, then GPT-2's pattern (ByteLevel's built-in regex).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> (pre-tokenizer, NFC normalizer?, ignore_merges?)
_PRE: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool, bool]] = {
    # Qwen2's tokenizer.json normalizes to NFC before splitting.
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), True, False),
    "deepseek-r1-qwen": (lambda: _split_then_bytes(_QWEN2_SPLIT), True, False),
    # Llama 3 looks a whole word up in the vocabulary before merging (ignore_merges).
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), False, True),
    "llama3": (lambda: _split_then_bytes(_LLAMA3_SPLIT), False, True),
    "smollm": (_digits_then_gpt2, False, False),
    "starcoder": (_digits_then_gpt2, False, False),
    "refact": (_digits_then_gpt2, False, False),
    "gpt-2": (_gpt2, False, False),
}
SUPPORTED_PRE = tuple(sorted(_PRE))


def build_tokenizer(meta: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer the GGUF metadata `meta` describes (keys as in the file, values decoded)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModel(f"tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2') is converted")
    pre = str(meta.get("tokenizer.ggml.pre", "gpt-2"))
    if pre not in _PRE:
        raise UnsupportedModel(f"pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE)}")
    make_pre, nfc, ignore_merges = _PRE[pre]
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    merges = [_split_merge(merge) for merge in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = make_pre()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)
    _add_special_tokens(tokenizer, tokens, meta.get("tokenizer.ggml.token_type", []))
    return tokenizer


def _split_merge(merge: str) -> tuple[str, str]:
    # Byte-level tokens spell a space as 'Ġ', so the one real space separates the pair.
    left, _, right = merge.partition(" ")
    return left, right


def _post_processor(meta: Mapping[str, Any], tokens: Sequence[str]) -> processors.PostProcessor:
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        return processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    return processors.ByteLevel(trim_offsets=False)


def _add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    # Control and user-defined tokens are matched whole in the text, as llama.cpp does; only
    # control tokens are special (dropped by skip_special_tokens when decoding).
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    added = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    if special:
        tokenizer.add_special_tokens(special)
    if added:
        tokenizer.add_tokens(added)


def eos_token_ids(meta: Mapping[str, Any]) -> list[int]:
    """End-of-sequence ids: eos, and end-of-turn / end-of-message where the file names others."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def tokenizer_config(meta: Mapping[str, Any], context_length: int) -> dict[str, Any]:
    """`tokenizer_config.json`: special tokens by text, the chat template, BOS behaviour."""
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def write_tokenizer_files(meta: Mapping[str, Any], directory: Path, context_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json for the GGUF metadata `meta` into `directory`,
    then check that transformers loads them as written (needs config.json in `directory`)."""
    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = tokenizer_config(meta, context_length)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    _check_as_loaded(directory, tokenizer, meta)


# Probes for the load check: splitting differs on contractions, digits, whitespace runs, CJK, emoji.
_PROBES = [
    "def f(x):\n    return x  +  1\r\n\n\n\tok 12345 3.14",
    "I'm naïve, they'll SAY: café — 日本語 😀👍🏽 ελληνικά",
    "   leading and trailing   ",
]


def _check_as_loaded(directory: Path, tokenizer: Tokenizer, meta: Mapping[str, Any]) -> None:
    """Fail if transformers (which mlx_lm uses) would tokenize differently from what we wrote.

    transformers 5 picks the tokenizer class from config.json's model_type for some types and
    rebuilds the pipeline in code: for `qwen2` it forces Qwen2's split pattern whatever
    tokenizer.json says. A file whose pre-tokenizer differs would be silently mis-tokenized.
    """
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(directory))
    special = [
        token
        for token, kind in zip(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", []), strict=False)
        if kind == _CONTROL
    ]
    for text in [*_PROBES, "".join(special[:3]) + "x"]:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        theirs = loaded.encode(text, add_special_tokens=False)
        if ours != theirs:
            raise UnsupportedModel(
                f"transformers loads this tokenizer as {type(loaded).__name__}, which splits text "
                f"differently from the file's pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} "
                f"(e.g. {text!r}); the model would be mis-tokenized"
            )
