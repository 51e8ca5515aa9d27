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
from app.launcher.stats import BackendCounters
from app.launcher.verify_attention import install as install_verify_attention
from app.launcher.verify_attention import resolve_mode


def main(argv: list[str] | None = None) -> None:
    options, server_argv = parse_args(sys.argv[1:] if argv is None else argv)
    # Before the model loads: a slow BLAS is reported at once, not after minutes of loading.
    blas = probe_and_report()
    emit_event("blas", **blas.as_event())
    mode = resolve_mode(options.verify_attention)
    unfused = install_verify_attention(mode)
    if unfused:
        print(f"specgate launcher: verification attention unfused ({mode}): no cuDNN plan per shape", file=sys.stderr)
    tier = install(options, BackendCounters(), blas=blas.identity, attention="unfused" if unfused else "fused")
    install_sigterm_drain(tier)
    # mlx_lm.server.main() parses sys.argv itself: hand it exactly the flags that are its own.
    sys.argv = ["python -m app.launcher", *server_argv]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
