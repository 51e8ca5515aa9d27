"""The launcher's own flags; every other flag is mlx_lm.server's and passes through untouched."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from app.launcher.loading import DTYPES


@dataclass(frozen=True)
class LauncherOptions:
    """What the hooks need to know."""

    dtype: str = "float32"
    cache_fixes: bool = True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.launcher",
        description="mlx_lm.server with specgate's hooks. All mlx_lm.server flags are accepted as well.",
        # No -h here (mlx_lm.server prints its own) and no abbreviations, so that no flag of
        # mlx_lm.server can be taken for one of ours.
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        # float32 by default: on the x86 CPUs measured, float16 decodes about 3.5x slower.
        help="cast the main and draft model parameters to this dtype after loading (default: float32)",
    )
    parser.add_argument(
        "--no-cache-fixes",
        dest="cache_fixes",
        action="store_false",
        help="diagnostics only: run with mlx-lm's prompt cache as it is, bugs B1 and B2 included",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[LauncherOptions, list[str]]:
    """Split `argv` into the launcher's options and the arguments left for mlx_lm.server."""
    parser = build_parser()
    namespace, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    return LauncherOptions(dtype=namespace.dtype, cache_fixes=namespace.cache_fixes), rest
