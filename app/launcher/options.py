"""The launcher's own flags; every other flag is mlx_lm.server's and passes through untouched."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from app.launcher.disk_tier import DiskTierSettings
from app.launcher.loading import DTYPES
from app.launcher.lookup import LookupSettings
from app.launcher.verify_attention import MODES as VERIFY_ATTENTION_MODES

DEFAULT_DISK_BYTES = 4 << 30
DEFAULT_MIN_TOKENS = 256


@dataclass(frozen=True)
class LauncherOptions:
    """What the hooks need to know."""

    dtype: str = "float32"
    cache_fixes: bool = True
    # Draft by prompt lookup (n-gram) when there is no draft model; None: off.
    prompt_lookup: LookupSettings | None = None
    # How verification rounds compute attention (app/launcher/verify_attention.py).
    verify_attention: str = "auto"
    # Serve every request through `stream_generate` (one at a time), never the batch generator.
    single_stream: bool = False
    # Prompt caches on disk (app/launcher/disk_tier.py); None: memory only.
    disk_cache: DiskTierSettings | None = None


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
    parser.add_argument(
        "--prompt-lookup",
        action="store_true",
        help="draft by prompt lookup (n-gram matching of prompt + output) instead of a draft model",
    )
    parser.add_argument("--lookup-min-ngram", type=int, default=LookupSettings.min_ngram, help="shortest n-gram")
    parser.add_argument("--lookup-max-ngram", type=int, default=LookupSettings.max_ngram, help="longest n-gram")
    parser.add_argument(
        "--verify-attention",
        choices=VERIFY_ATTENTION_MODES,
        default="auto",
        help="attention of verification rounds: auto (plain ops on CUDA, where mlx builds a cuDNN plan per "
        "round shape; the fused kernel elsewhere), fused, or unfused (default: auto; the environment "
        "variable SPECGATE_VERIFY_ATTENTION overrides it)",
    )
    parser.add_argument(
        "--single-stream",
        action="store_true",
        help="serve requests one at a time through the single-stream path, never mlx_lm's batch generator "
        "(the gateway sets it where it sends one request at a time: that path decodes faster)",
    )
    parser.add_argument(
        "--prompt-cache-dir",
        type=Path,
        help="keep prompt caches on disk below this directory (one subdirectory per model identity), so that "
        "they survive a restart; default: memory only",
    )
    parser.add_argument(
        "--prompt-cache-disk-bytes",
        type=int,
        default=DEFAULT_DISK_BYTES,
        help=f"most bytes the disk cache of this model identity may take (default {DEFAULT_DISK_BYTES})",
    )
    parser.add_argument(
        "--prompt-cache-min-tokens",
        type=int,
        default=DEFAULT_MIN_TOKENS,
        help="save a prompt when at least this many of its tokens are not on disk yet, and restore from disk "
        f"when that gives at least this many more than memory (default {DEFAULT_MIN_TOKENS})",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[LauncherOptions, list[str]]:
    """Split `argv` into the launcher's options and the arguments left for mlx_lm.server."""
    parser = build_parser()
    namespace, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    lookup = None
    if namespace.prompt_lookup:
        if "--draft-model" in rest or any(arg.startswith("--draft-model=") for arg in rest):
            parser.error("--prompt-lookup and --draft-model cannot be combined")
        try:
            lookup = LookupSettings(namespace.lookup_min_ngram, namespace.lookup_max_ngram)
        except ValueError as error:
            parser.error(str(error))
    disk_cache = None
    if namespace.prompt_cache_dir is not None:
        if namespace.prompt_cache_disk_bytes < 0 or namespace.prompt_cache_min_tokens < 1:
            parser.error("--prompt-cache-disk-bytes must be >= 0 and --prompt-cache-min-tokens >= 1")
        if any(arg.startswith("--kv-b") for arg in rest):  # mlx_lm.server also takes abbreviations
            # Quantized KV caches are not saved, and plain ones must not be restored into a run that
            # quantizes: its cold KV values differ. Off rather than wrong.
            print("specgate launcher: --kv-bits: prompt caches stay in memory only", file=sys.stderr)
        elif namespace.prompt_cache_disk_bytes > 0:
            disk_cache = DiskTierSettings(
                namespace.prompt_cache_dir, namespace.prompt_cache_disk_bytes, namespace.prompt_cache_min_tokens
            )
    options = LauncherOptions(
        dtype=namespace.dtype,
        cache_fixes=namespace.cache_fixes,
        prompt_lookup=lookup,
        verify_attention=namespace.verify_attention,
        single_stream=namespace.single_stream,
        disk_cache=disk_cache,
    )
    return options, rest
