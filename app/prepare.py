"""Before the gateway takes traffic: pull or import the models its profiles name but the store lacks.

Only sources specgate can produce itself (`catalog:NAME`, `gguf:PATH`) are prepared; a missing local
directory or Hugging Face repo cannot be, and its profile stays listed as `not_present`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from app.models.sources import describe_source, prepare_source
from app.profiles import ProfileSet

logger = logging.getLogger("specgate.prepare")
PREPARABLE_KINDS = frozenset({"catalog", "gguf"})


def sources_to_prepare(profiles: ProfileSet, store: Path) -> list[str]:
    """Distinct model values, in profile order, that are missing but can be pulled or imported."""
    wanted: list[str] = []
    for profile in profiles:
        if not profile.local:
            continue  # served by nodes: no model here
        # A prompt-lookup "draft" is no model: nothing to pull.
        for value in (profile.model, profile.draft_model if profile.uses_draft_weights else None):
            if value is None or value in wanted:
                continue
            status = describe_source(value, store)
            if status.kind in PREPARABLE_KINDS and not status.present:
                wanted.append(value)
    return wanted


def _print_progress(message: str) -> None:
    print(f"specgate: {message}", file=sys.stderr, flush=True)


def prepare_models(
    profiles: ProfileSet, store: Path, progress: Callable[[str], None] = _print_progress
) -> dict[str, str]:
    """Prepare every missing model; returns {value: error} for those that failed (the rest are ready)."""
    failures: dict[str, str] = {}
    missing = sources_to_prepare(profiles, store)
    for index, value in enumerate(missing, start=1):
        progress(f"preparing model {index}/{len(missing)}: {value}")
        try:
            path = prepare_source(value, store, progress)
        except Exception as error:  # one model failing must not keep the others from being served
            failures[value] = f"{type(error).__name__}: {error}"
            progress(f"could not prepare {value}: {failures[value]}; its profiles stay 'not_present'")
        else:
            progress(f"ready: {value} -> {path}")
    return failures
