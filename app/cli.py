"""The `specgate` command. Each command group lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from app.profiles import Profile, ProfileError, ProfileSet, load_profiles
from app.settings import Settings

# Modules that add command groups: each exposes `register(subparsers) -> None`.
COMMAND_MODULES: list[str] = ["app.models.store_commands", "app.bench.bench_command", "app.integrations.opencode"]


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "profiles_dir", None) is not None:
        overrides["profiles_dir"] = args.profiles_dir
    return Settings(**overrides)


def _load_or_exit(directory: Path) -> ProfileSet:
    try:
        return load_profiles(directory)
    except ProfileError as error:
        print(f"specgate: invalid profiles: {error}", file=sys.stderr)
        raise SystemExit(2) from error


def cmd_serve(args: argparse.Namespace) -> int:
    from app.logging_setup import configure_logging
    from app.server import PortUnavailable, bind_with_fallback, serve

    settings = _settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    profiles = _load_or_exit(settings.profiles_dir)
    from app.auth import KeyFileError, load_keys
    from app.backends.node_keys import NodeKeyError, load_node_keys

    try:
        load_keys(settings)  # a missing or empty key file must stop start-up, not leave the gateway open
        load_node_keys(settings)  # and a node key file that cannot be read, before any node is asked
    except (KeyFileError, NodeKeyError) as error:
        print(f"specgate: {error}", file=sys.stderr)
        return 2
    # Only an unspecified port falls back, as users' launcher scripts did; an explicit one is a promise.
    port_given = args.port is not None or "SPECGATE_PORT" in __import__("os").environ
    try:
        sock = bind_with_fallback(settings.host, settings.port, None if port_given else settings.fallback_port)
    except PortUnavailable as error:
        print(f"specgate: {error}", file=sys.stderr)
        return 1
    if settings.prepare_models and not args.no_prepare:
        # The port is held already, so a clash is reported before a long download, not after it.
        from app.prepare import prepare_models

        prepare_models(profiles, settings.model_store)
    host, port = sock.getsockname()[:2]
    print(
        f"specgate: {len(profiles)} profiles from {settings.profiles_dir}; listening on http://{host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    serve(settings, profiles, sock)
    return 0


def _placement(profile: Profile) -> str:
    """A distributed profile's ranks in a word or two ("2x ring tensor", "mac1,mac2 ring pipeline"); "-" else."""
    table = profile.distributed
    if table is None:
        return "-"
    where = f"{table.ranks}x" if table.ranks is not None else ",".join(table.hosts or ()) or str(table.hostfile)
    return f"{where} {table.backend} {table.mode}"


def _profile_rows(profiles: ProfileSet, states: dict[str, str]) -> list[list[str]]:
    rows = [["PROFILE", "MODEL", "DRAFT", "K", "RANKS", "STATE"]]
    for profile in profiles:
        rows.append(
            [
                profile.name,
                profile.model or "(nodes)",
                profile.draft_model or "-",
                str(profile.num_draft_tokens) if profile.is_speculative else "-",
                _placement(profile),
                states.get(profile.name, "-"),
            ]
        )
    return rows


def cmd_profiles(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    profiles = _load_or_exit(settings.profiles_dir)
    states: dict[str, str] = {}
    commands: dict[str, str] = {}
    url = args.url or f"http://{settings.host}:{settings.port}"
    try:
        listing = httpx.get(f"{url}/v1/models", timeout=3.0, trust_env=False).json()
        states = {item["id"]: item.get("state", "?") for item in listing.get("data", [])}
        # A distributed backend's exact mlx.launch command, once it has started.
        commands = {
            item["id"]: command
            for item in listing.get("data", [])
            if (command := ((item.get("backend") or {}).get("distributed") or {}).get("command"))
        }
    except (httpx.HTTPError, ValueError, AttributeError):
        states = {profile.name: "(gateway not running)" for profile in profiles}
    if args.json:
        print(
            json.dumps(
                [
                    dict(zip(["profile", "model", "draft", "k", "ranks", "state"], row, strict=True))
                    | ({"mlx_launch": commands[row[0]]} if row[0] in commands else {})
                    for row in _profile_rows(profiles, states)[1:]
                ],
                indent=2,
            )
        )
        return 0
    rows = _profile_rows(profiles, states)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for name, command in commands.items():
        print(f"\n{name}: {command}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specgate", description="OpenAI-compatible gateway for speculative decoding on MLX"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000, falling back to 8080 when taken)")
    serve.add_argument("--profiles-dir", type=Path, help="directory of profile TOML files (default ./profiles)")
    serve.add_argument(
        "--no-prepare",
        action="store_true",
        help="do not pull or import missing catalog:/gguf: models before serving (SPECGATE_PREPARE_MODELS=0)",
    )
    serve.set_defaults(func=cmd_serve)

    profiles = sub.add_parser("profiles", help="list profiles and, from a running gateway, their state")
    profiles.add_argument("--profiles-dir", type=Path)
    profiles.add_argument("--url", help="gateway to ask for states (default http://HOST:PORT from settings)")
    profiles.add_argument("--json", action="store_true")
    profiles.add_argument("--host", help=argparse.SUPPRESS)
    profiles.add_argument("--port", type=int, help=argparse.SUPPRESS)
    profiles.set_defaults(func=cmd_profiles)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))


if __name__ == "__main__":
    main()
