"""Install specgate's hooks into the `mlx_lm.server` module namespace.

Each hook replaces one module-level name that mlx_lm.server looks up at call time, with a subclass or
a wrapper of the original: its code runs unchanged, only observed or corrected at these points.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from mlx_lm import server

from app.launcher.abandon import watching_speculative_step
from app.launcher.cache_fixes import FixedPromptCache
from app.launcher.disk_tier import DiskTier, DiskTieredPromptCache, launcher_numerics
from app.launcher.generation import (
    AbandonAwareTimeBudget,
    SpecgateResponseGenerator,
    WatchedGenerationContext,
    counting_batch_generator,
    counting_stream_generate,
    current_request_stats,
)
from app.launcher.http_handler import handler_class
from app.launcher.loading import casting_load, model_provider_class
from app.launcher.lookup import dispatching_speculative_step
from app.launcher.options import LauncherOptions
from app.launcher.rank_cache import agreed_prompt_cache
from app.launcher.ranks import world
from app.launcher.stats import BackendCounters

# Typed as Any: these assignments replace names mlx_lm.server does not declare as replaceable.
_server: Any = server
# The module, not the `generate` function that mlx_lm's package namespace exports under that name.
_generate: Any = importlib.import_module("mlx_lm.generate")


def install(
    options: LauncherOptions, counters: BackendCounters, blas: str = "", attention: str = "", ranks: str = ""
) -> DiskTier | None:
    """Replace the hooked names in `mlx_lm.server`; call once, before `mlx_lm.server.main()`.

    `blas` and `attention` (what serves the matmuls, how verification attention runs) decide KV values
    too: they are part of the disk cache's identity, and so is `ranks`, this rank's shard in a
    distributed run. Returns the disk tier when there is one."""
    tier = _install_cache(options, blas, attention, ranks)
    if world().distributed:
        # Every rank must start each request from the same cached prefix (rank_cache.py).
        _server.LRUPromptCache = agreed_prompt_cache(_server.LRUPromptCache, lambda: _count_restored_tokens(0))
    # Loading: `_load` calls `load` for the main and the draft model; `_generate` calls `load_default`.
    _server.load = casting_load(_server.load, options.dtype)
    # A distributed run loads the main model with `sharded_load` (ranks.py): the same cast.
    _server.sharded_load = casting_load(_server.sharded_load, options.dtype)
    _server.ModelProvider = model_provider_class(counters)
    # Generation: with a draft every request goes through `stream_generate`; without one, through
    # the batch generator (unless a request is not batchable, which takes `stream_generate` too).
    _server.stream_generate = counting_stream_generate(_server.stream_generate, counters, options.prompt_lookup)
    _server.BatchGenerator = counting_batch_generator(_server.BatchGenerator, counters)
    _server.ResponseGenerator = SpecgateResponseGenerator
    # A client gone mid-prompt stops the prefill (abandon.py): the batch generator asks the context.
    _server.GenerationContext = WatchedGenerationContext
    WatchedGenerationContext.counters = counters
    _server.TimeBudget = AbandonAwareTimeBudget
    AbandonAwareTimeBudget.counters = counters
    # Prompt lookup: `stream_generate` calls this name for any draft; ours runs the n-gram drafter.
    SpecgateResponseGenerator.prompt_lookup = options.prompt_lookup
    SpecgateResponseGenerator.single_stream = options.single_stream
    # Both speculative paths prefill in chunks with no progress callback: the watch wraps their models.
    _generate.speculative_generate_step = watching_speculative_step(
        dispatching_speculative_step(_generate.speculative_generate_step)
    )
    # `run` ignores its own `handler_class` argument and calls `_run_http_server` with the default.
    _server._run_http_server = functools.partial(_server._run_http_server, handler_class=handler_class(counters))
    if tier is not None:
        counters.add_section("prompt_cache_disk", tier.snapshot)
    return tier


def _install_cache(options: LauncherOptions, blas: str, attention: str, ranks: str) -> DiskTier | None:
    """The prompt cache: mlx_lm's with the B1/B2 fixes, and the disk tier behind it when asked for."""
    if not options.cache_fixes:
        return None
    _server.LRUPromptCache = FixedPromptCache
    if options.disk_cache is None:
        return None
    # The disk tier stands behind the fixed cache: without the fixes (diagnostics) it stays off.
    single_path = options.single_stream or options.prompt_lookup is not None
    numerics = launcher_numerics(options.dtype, single_path, blas, attention, ranks)
    tier = DiskTier(options.disk_cache, numerics, _count_restored_tokens)
    _server.LRUPromptCache = functools.partial(DiskTieredPromptCache, tier=tier)
    return tier


def _count_restored_tokens(tokens: int) -> None:
    # Restores happen while `_serve_single` serves the request; the batch path has no per-request
    # stats there, and its requests report disk tokens only inside `cached_tokens`.
    stats = current_request_stats()
    if stats is not None:
        stats.disk_cached_tokens = tokens
