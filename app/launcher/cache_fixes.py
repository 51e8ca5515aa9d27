"""A prompt cache that fixes bugs B1 and B2 of mlx-lm 0.32.2 (see /work/shared/reference/mlx-lm-server.md).

`mlx_lm.server.run` builds its prompt cache as `LRUPromptCache(size)`; the launcher puts this subclass
under that name, so the server's own calls go through the two overrides below and the cache stays on.

B1: after speculative decoding the server stores the cache under `prompt + every emitted token`, but
the target's KV cache lacks the last token when the target made it, and the draft's lags by up to two
(`speculative_generate_step` only feeds a token to a model on the next round). Every later lookup
assumes "cache offset == key length", so reuse silently drops context. Fix: before storing, trim every
layer (target and draft layers are one list) and the key to the smallest offset.

B2: an exact hit returns nothing left to prefill, and neither `speculative_generate_step` nor the batch
generator can start from an empty prompt (the generation thread dies without a draft). Fix: on an exact
hit, trim one token from the cache and hand that token back to be fed again.
"""

from __future__ import annotations

import logging
from typing import Any

from mlx_lm.models.cache import LRUPromptCache

logger = logging.getLogger("specgate.launcher")


def layer_offsets(cache: list[Any]) -> list[int] | None:
    """Token count of each layer, or None when some layer cannot be measured and trimmed."""
    offsets = []
    for layer in cache:
        offset = getattr(layer, "offset", None)
        # Batch caches keep one offset per sequence (an array): not a single-sequence cache.
        if not isinstance(offset, int) or not layer.is_trimmable():
            return None
        offsets.append(offset)
    return offsets


def trim_layers_to(cache: list[Any], length: int) -> bool:
    """Trim every layer in place to hold exactly `length` tokens; False when that is impossible."""
    offsets = layer_offsets(cache)
    if offsets is None or any(offset < length for offset in offsets):
        return False
    for layer, offset in zip(cache, offsets, strict=True):
        if offset > length:
            layer.trim(offset - length)
    return True


class FixedPromptCache(LRUPromptCache):
    """`LRUPromptCache` whose entries always hold exactly as many tokens as their key."""

    def insert_cache(
        self,
        model: Any,
        tokens: list[int],
        prompt_cache: list[Any],
        *,
        cache_type: str = "assistant",
    ) -> None:
        offsets = layer_offsets(prompt_cache)
        if offsets is None or not offsets:
            # Not trimmable (e.g. recurrent layers): nothing speculative ran on it; store as is.
            super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)
            return
        length = min(min(offsets), len(tokens))
        if length == 0:
            return
        if length < len(tokens) or max(offsets) > length:
            logger.debug("prompt cache: storing %d of %d tokens (layer offsets %s)", length, len(tokens), offsets)
            trim_layers_to(prompt_cache, length)
        super().insert_cache(model, list(tokens[:length]), prompt_cache, cache_type=cache_type)

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if cache is None or rest or not tokens:
            return cache, rest
        # Exact hit: give back the last token so that there is something to feed.
        if trim_layers_to(cache, len(tokens) - 1):
            return cache, list(tokens[-1:])
        return None, list(tokens)
