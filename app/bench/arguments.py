"""Command-line pieces shared by `specgate bench` and its sub-commands (overhead, discrimination)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def parse_k_range(text: str) -> list[int]:
    """`0:8` (both ends included), `2:8:2`, or a list `1,3,5`."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            step = parts[2] if len(parts) == 3 else 1
            values = list(range(parts[0], parts[1] + 1, step))
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:END[:STEP] or a list like 1,3,5") from None
    if not values or any(not 0 <= value <= 64 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: draft lengths must be between 0 and 64")
    return values


def profile_names(groups: list[str] | None) -> list[str] | None:
    """The profiles of repeated `--profiles A,B` options, in order; None when none were given."""
    names = [name.strip() for group in groups or [] for name in group.split(",") if name.strip()]
    return names or None


def write_output(target: str, text: str) -> None:
    """Write a report to a file, or to stdout when `target` is "-"."""
    if target == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(target).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        print(f"bench: wrote {target}", file=sys.stderr)
