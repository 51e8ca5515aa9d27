"""Resolve a profile's `model` / `draft_model` value to a directory that mlx_lm loads.

Forms: a local MLX directory, a Hugging Face repo id (used only if already in the local cache:
backends run with HF_HUB_OFFLINE=1), and, see the catalog and GGUF modules, `catalog:NAME`
and `gguf:PATH`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceStatus:
    """What a model value resolves to right now, without touching the network."""

    value: str
    kind: str
    path: str | None
    present: bool
    detail: str


def _looks_like_repo_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _describe_local(value: str) -> SourceStatus:
    path = Path(value).expanduser()
    if (path / "config.json").is_file():
        return SourceStatus(value, "local", str(path), True, "local MLX model directory")
    if path.is_dir():
        detail = f"{path} has no config.json: not an MLX model directory"
    else:
        detail = f"{path} does not exist"
    return SourceStatus(value, "local", str(path), False, detail)


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


def describe_source(value: str, store_dir: Path) -> SourceStatus:
    """Say where `value` points and whether it can be loaded now. Cheap: no downloads."""
    if Path(value).expanduser().exists() or not _looks_like_repo_id(value):
        return _describe_local(value)
    return _describe_hf(value)


def prepare_source(value: str, store_dir: Path, progress: Callable[[str], None]) -> Path:
    """Make `value` loadable (pull or import if needed) and return the directory to load."""
    status = describe_source(value, store_dir)
    if not status.present or status.path is None:
        raise FileNotFoundError(status.detail)
    return Path(status.path)
