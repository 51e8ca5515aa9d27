"""Refuse a prompt longer than the model's context before it reaches the backend.

mlx_lm.server does not check: it processes any length (slowly, on a CPU for minutes) and then
generates garbage past the positions the model was trained on. The gateway counts the prompt's
text with the model's own tokenizer (`tokenizer.json`, the `tokenizers` library) and answers 400
`context_length_exceeded` when the text alone fills the context. The count leaves out the chat
template's few tokens, so it never refuses a prompt the model could take.

Cheap for ordinary requests: a byte-level tokenizer makes at least one byte per token, so a prompt
of fewer UTF-8 bytes than the context cannot fill it and is never tokenized.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from app.errors import InvalidRequest
from app.profiles import Profile

T = TypeVar("T")


def prompt_texts(body: dict[str, Any]) -> list[str]:
    """The text the model will read: message contents (strings and text parts) or the prompt."""
    texts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return texts


# Facts read from disk, by (reader, model directory): the only cache of them. After the first request they
# are at hand on the event loop, without a thread hop per request (a few hundred microseconds on a busy
# 2-core machine). Bounded by the configured models: the gateway passes only present model directories.
_read: dict[tuple[str, str], Any] = {}


async def _facts(reader: Callable[[str], T], model_dir: str) -> T:
    key = (reader.__name__, model_dir)
    if key not in _read:
        _read[key] = await asyncio.to_thread(reader, model_dir)
    value: T = _read[key]
    return value


def _positive_int(config: Any, key: str) -> int | None:
    value = config.get(key) if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config_facts(model_dir: str) -> tuple[int | None, int | None]:
    """(max_position_embeddings, vocab_size) from a local model's config.json (read once, through `_facts`)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    # Multimodal models keep the language model's sizes under text_config.
    text = config.get("text_config") if isinstance(config, dict) else None
    positions = _positive_int(config, "max_position_embeddings") or _positive_int(text, "max_position_embeddings")
    return positions, _positive_int(config, "vocab_size") or _positive_int(text, "vocab_size")


async def model_sizes(model_dir: str) -> tuple[int | None, int | None]:
    """(max_position_embeddings, vocab_size) of a local model: its context and the logits' width."""
    return await _facts(_config_facts, model_dir)


async def fit_top_k(model_dir: str | None, forward: dict[str, Any]) -> None:
    """A top_k at or over the vocabulary filters nothing: send 0 (off), since mlx_lm refuses it in its
    generation thread, which then dies and fails every request the backend holds."""
    top_k = forward.get("top_k")
    if not isinstance(top_k, int) or top_k <= 0 or model_dir is None:
        return
    _, vocab = await _facts(_config_facts, model_dir)
    if vocab is not None and top_k >= vocab:
        forward["top_k"] = 0


def _model_facts(model_dir: str) -> tuple[int | None, Any]:
    """(max_position_embeddings, tokenizer or None) of a local model directory (read once, through `_facts`)."""
    directory = Path(model_dir)
    limit, _ = _config_facts(model_dir)
    tokenizer: Any = None
    if (directory / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception:  # an unreadable tokenizer only disables the check
            tokenizer = None
    return limit, tokenizer


def _count(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False))


async def check_prompt_length(profile: Profile, model_dir: str | None, body: dict[str, Any]) -> None:
    """Raise InvalidRequest (400, code context_length_exceeded) when the prompt fills the context."""
    texts = prompt_texts(body)
    size = sum(len(text.encode("utf-8", errors="surrogatepass")) for text in texts)
    limit = profile.context_length
    if limit is not None and size < limit:
        return
    if model_dir is None:
        return
    config_limit, tokenizer = await _facts(_model_facts, model_dir)
    limit = limit or config_limit
    if limit is None or size < limit or tokenizer is None:
        return
    tokens = await asyncio.to_thread(_count, tokenizer, texts)
    if tokens >= limit:
        raise InvalidRequest(
            f"the prompt has at least {tokens} tokens, more than the {limit}-token context of {profile.name!r}; "
            "shorten it",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
