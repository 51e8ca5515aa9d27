"""The prompt cache of a distributed run: every rank starts a request from the same cached prefix.

Each rank keeps its own prompt cache (its KV is that of its shard of the model), fed with the same
requests in the same order, so the ranks normally find the same prefix. They can differ: the disk tier
(disk_tier.py, one directory per rank) may hold a prompt on one rank and not on another, and a byte bound
evicts by each rank's own byte count (a pipeline stage with more layers holds more bytes). Ranks starting
from different prefixes would prefill different token counts, and the collectives of their forward passes
would no longer pair up. So after each lookup the ranks compare the prefix length they found
(`agree_equal`): the same on all, each uses its cache; otherwise every rank computes the whole prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from app.launcher.ranks import agree_equal

logger = logging.getLogger("specgate.launcher")


class AgreedPromptCache:
    """A prompt cache (mlx_lm's `LRUPromptCache` interface) whose lookups all ranks agree on."""

    def __init__(self, inner: Any, on_disagreement: Callable[[], None] = lambda: None) -> None:
        self._inner = inner
        self._on_disagreement = on_disagreement

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        cache, rest = self._inner.fetch_nearest_cache(model, tokens)
        if agree_equal(len(rest)):
            return cache, rest
        logger.info(
            "prompt cache: the ranks hold different prefixes (this rank %d of %d tokens); computing it all",
            len(tokens) - len(rest),
            len(tokens),
        )
        self._on_disagreement()
        return None, list(tokens)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        # insert_cache, trim_to, nbytes, stats_by_type...: the inner cache's.
        return getattr(self._inner, name)


def agreed_prompt_cache(factory: Callable[..., Any], on_disagreement: Callable[[], None]) -> Callable[..., Any]:
    """Replacement for the server's `LRUPromptCache` name: builds `factory`'s cache, wrapped."""

    def build(*args: Any, **kwargs: Any) -> AgreedPromptCache:
        return AgreedPromptCache(factory(*args, **kwargs), on_disagreement)

    return build
