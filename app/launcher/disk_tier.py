"""The prompt cache's disk tier: prefix KV caches that outlive the backend process (issue 16, item 4).

mlx_lm.server keeps prompt caches in memory only, so a restart, a TTL unload or an eviction throws away
minutes of prompt processing on a CPU (OpenCode's first request: ~7,200 tokens of system prompt and tools,
the same in every session). The launcher puts `DiskTieredPromptCache` where the server builds its
`LRUPromptCache`: the in-memory LRU (with the B1/B2 fixes) stays first; the disk is asked only when it
offers at least `min_tokens` more of the prompt than memory does.

Decisions, and why:

- **What is saved: the prompt, never the completion.** When a request's cache is stored (after its answer
  has been sent), the prompt's part is saved if at least `min_tokens` of it are not on disk yet. The
  completion's KV came from decode steps; the prompt's from prefill, as any later prompt's would. Most
  turns add a few hundred tokens, written as a child of the entry they extend (prompt_store.py), so a
  session does not rewrite its whole context each turn.
- **One directory per identity.** The identity hashes everything that decides the KV values: the main
  and draft model (path, config.json, weight files' sizes and times), the dtype the launcher casts to,
  the BLAS, MKL's reproducibility mode, MLX and mlx-lm versions, the device and serving path. A cache of
  another model or settings is never looked at; each file also carries the identity, checked on read.
- **Not on the generation thread.** Saving takes NumPy views of the new tokens' KV on the generation thread
  (no copy: milliseconds), then one background thread checksums and writes them. That thread runs no MLX
  operation (MLX streams belong to the thread that uses them); it reads memory the views keep alive.
  Copying on the generation thread instead paused it 1.7 s for a 7,200-token root of the 1.5B + 0.5B pair
  (590 MB) on the 2-core machine. Restoring reads, checks and concatenates on the generation thread, which
  is waiting for exactly that cache anyway (0.4 s for that root).
- **A request is never failed by the disk.** Every error is logged and the request runs as on a miss.
- **Only plain KV caches.** Quantized (`--kv-bits`), rotating or recurrent layer caches are not saved.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.models.cache import KVCache

from app.launcher.cache_fixes import FixedPromptCache
from app.launcher.prompt_files import FORMAT, SAFETENSORS_DTYPES, Tensor
from app.launcher.prompt_store import PromptStore, SavePlan

logger = logging.getLogger("specgate.launcher")

# Files written while the launcher is told to stop still land if they finish within this; the gateway
# waits its stop grace (5 s by default) before SIGKILL.
DRAIN_SECONDS = 4.0
# Saves waiting for the writer at once; more are skipped (each holds its KV in memory until written).
MAX_PENDING_SAVES = 2


@dataclass(frozen=True)
class DiskTierSettings:
    """From the launcher's flags: where, how much, and from how many new tokens on."""

    directory: Path  # one subdirectory per identity below it
    max_bytes: int
    min_tokens: int


def launcher_numerics(dtype: str, single_path: bool, blas: str, attention: str, ranks: str = "") -> dict[str, str]:
    """Everything besides the weights that decides the KV values this backend computes. `ranks` names
    this rank's shard in a distributed run ("tensor 0/2"): its KV is that of its shard only."""
    rank_part = {"ranks": ranks} if ranks else {}
    return {
        **rank_part,
        "dtype": dtype,
        "blas": blas,
        # MKL's reproducibility mode changes its rounding (README, "Exactness").
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "attention": attention,
        # The batch generator prefills in other shapes than `stream_generate`.
        "path": "single" if single_path else "batch",
        "mlx": str(getattr(mx, "__version__", "")),
        "mlx_lm": str(mlx_lm.__version__),
        "device": str(mx.default_device()),
    }


def model_fingerprint(path: str | None) -> dict[str, Any] | None:
    """What identifies a model directory's weights without reading them."""
    if path is None:
        return None
    directory = Path(path)
    if not directory.is_dir():
        return {"path": path}
    config = directory / "config.json"
    weights = []
    for file in sorted(directory.glob("*.safetensors")):
        stat = file.stat()
        weights.append([file.name, stat.st_size, stat.st_mtime_ns])
    return {
        "path": str(directory.resolve()),
        "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": weights,
    }


def identity_of(model_key: Any, numerics: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(short hash, what it hashes) for mlx_lm's model key `(model path, adapter path, draft path)`."""
    main, adapter, draft = (*tuple(model_key), None, None, None)[:3]
    parts = {
        "format": FORMAT,
        "model": model_fingerprint(main),
        "adapter": model_fingerprint(adapter),
        "draft": model_fingerprint(draft),
        **numerics,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


def plain_kv_layers(cache: Sequence[Any]) -> bool:
    """Only caches of plain `KVCache` layers, one sequence each, are saved and restored."""
    return bool(cache) and all(
        type(layer) is KVCache and layer.keys is not None and layer.keys.shape[0] == 1 for layer in cache
    )


def host_tensors(cache: Sequence[Any], start: int, stop: int) -> list[Tensor]:
    """Tokens [start, stop) of every layer as NumPy views of the cache's own memory (no copy).

    Called on the generation thread, which evaluates the slices; the writer thread then only reads memory
    through the views, which also keep it alive. MLX never writes into an array that another one still
    references (it donates a buffer only to its last user), so the bytes stay as they are until written.
    """
    parts = []
    for index, layer in enumerate(cache):
        for kind, array in (("k", layer.keys), ("v", layer.values)):
            part = array[..., start:stop, :]
            dtype = str(part.dtype).removeprefix("mlx.core.")
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"KV dtype {dtype} cannot be saved")
            # NumPy has no bfloat16: its bits travel as uint16 and the header says BF16.
            parts.append((f"{kind}.{index}", dtype, part.view(mx.uint16) if dtype == "bfloat16" else part))
    mx.eval([part for _, _, part in parts])
    return [Tensor(name, dtype, tuple(part.shape), np.asarray(part)) for name, dtype, part in parts]


class BackgroundWriter:
    """One daemon thread that runs saves in order, so that generation never waits for the disk."""

    def __init__(self, max_pending: int = MAX_PENDING_SAVES) -> None:
        self._max_pending = max_pending
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._pending = 0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue `job`; False (and not queued) when too many wait already."""
        with self._condition:
            if self._pending >= self._max_pending:
                return False
            self._pending += 1
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="specgate-prompt-cache-writer", daemon=True)
                self._thread.start()
            self._condition.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("prompt cache on disk: a save failed")
            finally:
                with self._condition:
                    self._pending -= 1
                    self._condition.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until every queued save is written; False if that takes longer than `timeout`."""
        with self._condition:
            return self._condition.wait_for(lambda: self._pending == 0, timeout)


class DiskTier:
    """The disk side for every model key the server loads (normally one)."""

    def __init__(
        self,
        settings: DiskTierSettings,
        numerics: dict[str, str],
        on_restored: Callable[[int], None] = lambda tokens: None,
    ) -> None:
        self.settings = settings
        self.numerics = numerics
        self.on_restored = on_restored
        self.writer = BackgroundWriter()
        self._stores: dict[Any, PromptStore | None] = {}
        self._lock = threading.Lock()

    def store_for(self, model_key: Any) -> PromptStore | None:
        with self._lock:
            if model_key not in self._stores:
                self._stores[model_key] = self._open(model_key)
            return self._stores[model_key]

    def _open(self, model_key: Any) -> PromptStore | None:
        try:
            identity, parts = identity_of(model_key, self.numerics)
            directory = self.settings.directory / identity
            directory.mkdir(parents=True, exist_ok=True)
            _write_identity_note(directory / "identity.json", parts)
        except OSError as error:
            logger.warning("prompt cache on disk: off for %s: %s", model_key, error)
            return None
        logger.info("prompt cache on disk: %s (at most %d bytes)", directory, self.settings.max_bytes)
        return PromptStore(directory, identity, self.settings.max_bytes, self.settings.min_tokens)

    def restore(self, model_key: Any, tokens: Sequence[int], in_memory: int) -> tuple[list[Any], int] | None:
        """The disk's longest prefix of `tokens` when it beats memory's `in_memory` by `min_tokens`."""
        if len(tokens) - 1 < in_memory + self.settings.min_tokens:
            return None
        store = self.store_for(model_key)
        if store is None:
            return None
        try:
            restored = store.restore(tokens, minimum=in_memory + self.settings.min_tokens)
        except Exception:
            logger.exception("prompt cache on disk: restore failed; computing the prompt instead")
            return None
        if restored is not None:
            self.on_restored(restored[1])
        return restored

    def save(self, model_key: Any, prompt: Sequence[int], cache: Sequence[Any]) -> None:
        """Queue the prompt's KV for writing if the disk lacks at least `min_tokens` of it."""
        if len(prompt) < self.settings.min_tokens or not plain_kv_layers(cache):
            return
        length = min(len(prompt), *(int(layer.offset) for layer in cache))
        store = self.store_for(model_key)
        if store is None or length < self.settings.min_tokens:
            return
        try:
            plan = store.plan_save(list(prompt[:length]))
            if plan is None:
                return
            started = time.perf_counter()
            tensors = host_tensors(cache, plan.parent_length, plan.length)
            store.counters.last_save_pause_seconds = round(time.perf_counter() - started, 3)
        except Exception:
            logger.exception("prompt cache on disk: could not prepare a save")
            return
        size = sum(tensor.data.nbytes for tensor in tensors)
        if size > self.settings.max_bytes:
            logger.info("prompt cache on disk: %d tokens take %d bytes, over the bound; not saved", length, size)
            return
        if not self.writer.submit(_commit_job(store, plan, tensors)):
            logger.info("prompt cache on disk: writer busy; not saving %d tokens", len(plan.tokens))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stores = [store for store in self._stores.values() if store is not None]
        return {
            "max_bytes": self.settings.max_bytes,
            "min_tokens": self.settings.min_tokens,
            "stores": [store.summary() for store in stores],
        }

    def drain_on_sigterm(self) -> None:
        """Let a save in progress finish (bounded) when the gateway stops this backend."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.writer.drain(DRAIN_SECONDS):
                logger.warning("prompt cache on disk: stopping with a save unfinished")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, handler)


def _commit_job(store: PromptStore, plan: SavePlan, tensors: list[Tensor]) -> Callable[[], None]:
    return lambda: store.commit(plan, tensors)


def _write_identity_note(path: Path, parts: dict[str, Any]) -> None:
    """What the directory's name hashes, for a person looking at it (never read back)."""
    if path.exists():
        return
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(parts, indent=1, sort_keys=True) + "\n")
    os.replace(temp, path)


class DiskTieredPromptCache(FixedPromptCache):
    """mlx_lm's in-memory prompt cache (with the B1/B2 fixes) backed by a `DiskTier`.

    The server calls `fetch_nearest_cache(model_key, prompt)` before prefill and `insert_cache(model_key,
    prompt + completion, cache)` after the answer (the batch path also at the end of a system prompt). To
    save only the prompt's part, this remembers the prompts it was asked for and recognises them as the
    start of what is inserted.
    """

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63, *, tier: DiskTier) -> None:
        super().__init__(max_size, max_bytes)
        self.tier = tier
        # The batch generator serves several requests at once: their prompts, most recent last.
        self._prompts: collections.deque[list[int]] = collections.deque(maxlen=64)

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        cache, rest = super().fetch_nearest_cache(model, tokens)
        self._prompts.append(list(tokens))
        restored = self.tier.restore(model, tokens, in_memory=len(tokens) - len(rest))
        if restored is None:
            return cache, rest
        disk_cache, length = restored
        return disk_cache, list(tokens[length:])

    def insert_cache(
        self,
        model: Any,
        tokens: list[int],
        prompt_cache: list[Any],
        *,
        cache_type: str = "assistant",
    ) -> None:
        prompt_length = self._prompt_length(tokens)
        if prompt_length:
            self.tier.save(model, tokens[:prompt_length], prompt_cache)
        super().insert_cache(model, tokens, prompt_cache, cache_type=cache_type)

    def _prompt_length(self, tokens: list[int]) -> int:
        """How much of `tokens` is prompt: a remembered prompt it starts with, or all of it when it is
        the start of one (a system segment); 0 when it matches none (nothing known to save)."""
        for index in range(len(self._prompts) - 1, -1, -1):
            prompt = self._prompts[index]
            if len(prompt) <= len(tokens) and tokens[: len(prompt)] == prompt:
                del self._prompts[index]
                return len(prompt)
        if any(len(tokens) <= len(prompt) and prompt[: len(tokens)] == tokens for prompt in self._prompts):
            return len(tokens)
        return 0


def install_sigterm_drain(tier: DiskTier | None) -> None:
    if tier is not None:
        with contextlib.suppress(ValueError):  # not the main thread (tests calling install): no handler
            tier.drain_on_sigterm()
