"""`python -m app.launcher [--dtype D] [--no-cache-fixes] [--verify-attention M] [--prompt-cache-dir DIR ...]
<mlx_lm.server flags>`."""

from __future__ import annotations

import sys

from mlx_lm import server

from app.launcher.blas_probe import probe_and_report
from app.launcher.disk_tier import install_sigterm_drain
from app.launcher.hooks import install
from app.launcher.loading import emit_event
from app.launcher.options import parse_args
from app.launcher.ranks import prefix_output, sharding_mode, world
from app.launcher.stats import BackendCounters
from app.launcher.verify_attention import install as install_verify_attention
from app.launcher.verify_attention import resolve_mode


def main(argv: list[str] | None = None) -> None:
    options, server_argv = parse_args(sys.argv[1:] if argv is None else argv)
    ranks = _announce_ranks(server_argv)
    # Before the model loads: a slow BLAS is reported at once, not after minutes of loading.
    blas = probe_and_report()
    emit_event("blas", **blas.as_event())
    mode = resolve_mode(options.verify_attention)
    unfused = install_verify_attention(mode)
    if unfused:
        print(f"specgate launcher: verification attention unfused ({mode}): no cuDNN plan per shape", file=sys.stderr)
    tier = install(
        options, BackendCounters(), blas=blas.identity, attention="unfused" if unfused else "fused", ranks=ranks
    )
    install_sigterm_drain(tier)
    # mlx_lm.server.main() parses sys.argv itself: hand it exactly the flags that are its own.
    sys.argv = ["python -m app.launcher", *server_argv]
    server.main()  # type: ignore[no-untyped-call]


def _announce_ranks(server_argv: list[str]) -> str:
    """Under `mlx.launch` with several ranks: prefix this rank's output and say what it is ("" when alone)."""
    ranks = world()
    if not ranks.distributed:
        return ""
    prefix_output(ranks.rank)
    shard = f"{sharding_mode(server_argv)} {ranks.rank}/{ranks.size}"
    print(
        f"specgate launcher: distributed, rank {ranks.rank} of {ranks.size}, main model sharded ({shard}); "
        "a draft model is loaded whole on every rank",
        file=sys.stderr,
        flush=True,
    )
    return shard


if __name__ == "__main__":
    main()
