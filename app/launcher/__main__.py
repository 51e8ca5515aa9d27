"""`python -m app.launcher [--dtype D] [--no-cache-fixes] <mlx_lm.server flags>`."""

from __future__ import annotations

import sys

from mlx_lm import server

from app.launcher.hooks import install
from app.launcher.options import parse_args
from app.launcher.stats import BackendCounters


def main(argv: list[str] | None = None) -> None:
    options, server_argv = parse_args(sys.argv[1:] if argv is None else argv)
    install(options, BackendCounters())
    # mlx_lm.server.main() parses sys.argv itself: hand it exactly the flags that are its own.
    sys.argv = ["python -m app.launcher", *server_argv]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
