"""`specgate opencode-config`: the OpenCode provider block for this gateway, printed or merged into a file.

    specgate opencode-config                              # print a complete opencode.json for every profile
    specgate opencode-config --profiles a b               # only these profiles (names or aliases)
    specgate opencode-config --url http://host:8000       # the profiles a running gateway serves
    specgate opencode-config --write ~/.config/opencode/opencode.json

Merging (`--write`) keeps everything already in the file: other providers, other keys, comments and the
file's own layout (JSONC is edited in place, see app/integrations/jsonc.py). Inside an existing provider
block of the same id, specgate owns `npm`, `name`, `options.baseURL`, `options.apiKey` (when keys are on)
and `models` (exactly the listed profiles, each with its `name` and `limit`); any other key a user added
there, such as a model's `options`, is kept. OpenCode's request timeouts (`options.timeout`,
`headerTimeout`, `chunkTimeout`) are written only where the block has none: a user's value wins.

Profiles that cannot serve (a model that is neither on disk nor a catalog model `specgate serve` pulls;
`not_present` in a running gateway) are left out, with a warning. The top-level `small_model`, which
OpenCode uses for session titles, is set (where the file has none) to a profile on another backend than
the others, so a title request never queues in front of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.integrations import jsonc
from app.models.sources import describe_source
from app.profiles import Profile, ProfileError, load_profiles
from app.settings import Settings

SCHEMA_URL = "https://opencode.ai/config.json"
PROVIDER_NPM = "@ai-sdk/openai-compatible"
DEFAULT_PROVIDER_ID = "specgate"
DEFAULT_PROVIDER_NAME = "specgate (local MLX, speculative decoding)"
DEFAULT_KEY_ENV = "SPECGATE_API_KEY"
# OpenCode's defaults wait 300 s for response headers and 300 s between chunks. On a CPU a 7,000-token
# agent prompt can take minutes before the first token (and the gateway answers a stream's headers with
# it), so wait as long as the gateway's own first-token bound (SPECGATE_FIRST_TOKEN_TIMEOUT, 900 s) and put
# no limit on a whole answer, which may be thousands of tokens at a few tokens per second.
TIMEOUT_DEFAULTS: dict[str, Any] = {"timeout": False, "headerTimeout": 900_000, "chunkTimeout": 900_000}


class ConfigError(Exception):
    """Something the user must fix; the message says what."""


@dataclass(frozen=True)
class ModelEntry:
    """One profile as OpenCode will list it."""

    id: str
    name: str
    context: int | None
    output: int | None
    # Whether the profile can serve: its models are on disk, or `specgate serve` pulls them (catalog).
    servable: bool = True
    # The main model and whether a draft is used: which profiles share a backend, for `small_model`.
    model: str | None = None
    speculative: bool = False

    def as_config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name}
        # OpenCode reads both limits together (context for compaction, output for max tokens).
        if self.context is not None and self.output is not None:
            entry["limit"] = {"context": self.context, "output": self.output}
        return entry


def _model_context(profile: Profile, store: Path) -> int | None:
    """The profile's `context_length`, else the model's own `max_position_embeddings` when it is on disk."""
    if profile.context_length is not None:
        return profile.context_length
    if not profile.local:
        return None  # the nodes' own profile knows
    status = describe_source(profile.model, store)
    if not status.present or status.path is None:
        return None
    try:
        config = json.loads((Path(status.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def _servable(profile: Profile, store: Path) -> bool:
    """On disk, or a catalog model that `specgate serve` pulls before it takes traffic (or served by nodes)."""
    if not profile.local:
        return True
    values = [profile.model]
    if profile.uses_draft_weights and profile.draft_model is not None:
        values.append(profile.draft_model)
    statuses = [describe_source(value, store) for value in values]
    return all(status.present or status.kind == "catalog" for status in statuses)


def entries_from_profiles(profiles: Iterable[Profile], store: Path) -> list[ModelEntry]:
    return [
        ModelEntry(
            id=profile.name,
            name=profile.display_name or profile.name,
            context=_model_context(profile, store),
            output=profile.max_output_tokens,
            servable=_servable(profile, store),
            model=profile.model,
            speculative=profile.is_speculative,
        )
        for profile in profiles
    ]


def entries_from_gateway(listing: dict[str, Any]) -> list[ModelEntry]:
    """From a running gateway's `/v1/models` (which adds name, context_length, max_output_tokens)."""
    entries = []
    for item in listing.get("data") or ():
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        context = item.get("context_length")
        output = item.get("max_output_tokens")
        entries.append(
            ModelEntry(
                id=item["id"],
                name=item.get("name") or item["id"],
                context=context if isinstance(context, int) else None,
                output=output if isinstance(output, int) else None,
                servable=item.get("state") != "not_present",
                model=item.get("model") if isinstance(item.get("model"), str) else None,
                speculative=item.get("draft_model") is not None,
            )
        )
    return entries


def choose_small_model(entries: list[ModelEntry]) -> ModelEntry | None:
    """A profile for OpenCode's `small_model` (session titles): no draft, and a main model other than the one
    most profiles use, so that its requests go to another backend than the work. None when there is none."""
    models = [entry.model for entry in entries if entry.model is not None]
    if not models:
        return None
    main = max(set(models), key=models.count)
    for entry in entries:
        if entry.model is not None and entry.model != main and not entry.speculative:
            return entry
    return None


def select(entries: list[ModelEntry], wanted: list[str] | None, aliases: dict[str, str]) -> list[ModelEntry]:
    """Keep the wanted profiles (names or aliases), in the order asked; all of them when none are named."""
    if not wanted:
        return entries
    by_id = {entry.id: entry for entry in entries}
    chosen: list[ModelEntry] = []
    unknown = []
    for name in wanted:
        entry = by_id.get(aliases.get(name, name))
        if entry is None:
            unknown.append(name)
        elif entry not in chosen:
            chosen.append(entry)
    if unknown:
        available = ", ".join(sorted(by_id)) or "(none)"
        raise ConfigError(f"no profile named {', '.join(map(repr, unknown))}; available: {available}")
    return chosen


def provider_block(entries: list[ModelEntry], base_url: str, key_env: str | None, name: str) -> dict[str, Any]:
    options: dict[str, Any] = {**TIMEOUT_DEFAULTS, "baseURL": base_url}
    if key_env:
        # OpenCode substitutes "{env:VAR}" when it loads the file: the key itself is never written here.
        options["apiKey"] = f"{{env:{key_env}}}"
    return {
        "npm": PROVIDER_NPM,
        "name": name,
        "options": options,
        "models": {entry.id: entry.as_config() for entry in entries},
    }


def merge_provider(old: Any, new: dict[str, Any]) -> dict[str, Any]:
    """`new` over a previous block of the same id, keeping the keys specgate does not own."""
    if not isinstance(old, dict):
        return new
    merged = {**old, **{key: value for key, value in new.items() if key not in ("options", "models")}}
    old_options = old["options"] if isinstance(old.get("options"), dict) else {}
    owned = {key: value for key, value in new["options"].items() if key not in TIMEOUT_DEFAULTS}
    defaults = {key: value for key, value in new["options"].items() if key in TIMEOUT_DEFAULTS}
    merged["options"] = {**defaults, **old_options, **owned}
    old_models: dict[str, Any] = old["models"] if isinstance(old.get("models"), dict) else {}
    models = {}
    for model_id, entry in new["models"].items():
        previous = old_models.get(model_id)
        kept = {k: v for k, v in previous.items() if k not in ("name", "limit")} if isinstance(previous, dict) else {}
        models[model_id] = {**kept, **entry}
    merged["models"] = models
    return merged


@dataclass
class MergeResult:
    text: str
    added: list[str]
    updated: list[str]
    removed: list[str]
    comments_dropped: bool


def new_document(provider_id: str, block: dict[str, Any], small_model: str | None = None) -> str:
    document: dict[str, Any] = {"$schema": SCHEMA_URL, "provider": {provider_id: block}}
    if small_model is not None:
        document["small_model"] = small_model
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def merge_into(text: str, provider_id: str, block: dict[str, Any], small_model: str | None = None) -> MergeResult:
    """The file's text with the provider block merged in (and `small_model` where the file has none);
    everything else byte for byte as it was."""
    result = _merge_provider_into(text, provider_id, block, small_model)
    if small_model is not None and text.strip():
        document = jsonc.parse(result.text)
        if "small_model" not in document.root.members:
            result.text = jsonc.insert_member(document, document.root, "small_model", small_model)
    return result


def _merge_provider_into(text: str, provider_id: str, block: dict[str, Any], small_model: str | None) -> MergeResult:
    if not text.strip():
        return MergeResult(new_document(provider_id, block, small_model), sorted(block["models"]), [], [], False)
    try:
        document = jsonc.parse(text)
    except jsonc.JsoncError as error:
        raise ConfigError(f"cannot read it as JSON or JSONC: {error}; fix it or move it aside") from error
    root = document.root
    if not isinstance(root.value, dict):
        raise ConfigError("its top level is not a JSON object, so it is not an OpenCode config")
    providers = root.members.get("provider")
    if providers is None:
        out = jsonc.insert_member(document, root, "provider", {provider_id: block})
        return MergeResult(out, sorted(block["models"]), [], [], False)
    if not isinstance(providers.node.value, dict):
        raise ConfigError(f"its 'provider' is a {type(providers.node.value).__name__}, not an object")
    existing = providers.node.members.get(provider_id)
    if existing is None:
        out = jsonc.insert_member(document, providers.node, provider_id, block)
        return MergeResult(out, sorted(block["models"]), [], [], False)
    old = existing.node.value
    merged = merge_provider(old, block)
    old_models = set(old["models"]) if isinstance(old, dict) and isinstance(old.get("models"), dict) else set()
    new_models = set(merged["models"])
    inner = document.text[existing.node.start : existing.node.end]
    return MergeResult(
        jsonc.replace_value(document, existing.node, merged),
        added=sorted(new_models - old_models),
        updated=sorted(new_models & old_models),
        removed=sorted(old_models - new_models),
        comments_dropped=jsonc.parse(inner).has_comments,
    )


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one rename, keeping its permissions: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ----- where the profiles come from ----------------------------------------------------------------


def fetch_gateway_models(url: str, key_env: str) -> tuple[dict[str, Any], bool]:
    """`/v1/models` of a running gateway, and whether it wants an API key (it answered 401 without one)."""
    base = url.rstrip("/")
    models_url = f"{base}/v1/models"
    try:
        reply = httpx.get(models_url, timeout=5.0, trust_env=False)
        keys_on = reply.status_code == 401
        if keys_on:
            key = os.environ.get(key_env)
            if not key:
                raise ConfigError(f"{models_url} wants an API key: set {key_env} to one to list its models")
            reply = httpx.get(models_url, timeout=5.0, trust_env=False, headers={"Authorization": f"Bearer {key}"})
        reply.raise_for_status()
        listing = reply.json()
    except httpx.HTTPError as error:
        raise ConfigError(f"cannot list the models of {base}: {error}") from error
    except ValueError as error:
        raise ConfigError(f"{models_url} did not answer JSON") from error
    if not isinstance(listing, dict):
        raise ConfigError(f"{models_url} did not answer a model list")
    return listing, keys_on


def keys_configured(settings: Settings) -> bool:
    """Whether this machine's settings turn API keys on (app/auth.py reads the same settings)."""
    for name in ("api_keys", "api_key_file", "api_keys_file"):
        value = getattr(settings, name, None)
        if value:
            return True
    return False


def public_base_url(settings: Settings) -> str:
    host = settings.host
    # A wildcard bind is reachable on loopback; OpenCode runs on the same machine in the common case.
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/v1"


def build(args: argparse.Namespace) -> tuple[dict[str, Any], str | None, list[str]]:
    """The provider block, the `small_model` value and warnings for the command's arguments."""
    overrides: dict[str, Any] = {}
    if args.profiles_dir is not None:
        overrides["profiles_dir"] = args.profiles_dir
    settings = Settings(**overrides)
    key_env: str | None = args.api_key_env
    warnings: list[str] = []
    aliases: dict[str, str] = {}
    if args.url:
        listing, keys_on = fetch_gateway_models(args.url, key_env or DEFAULT_KEY_ENV)
        entries = entries_from_gateway(listing)
        for item in listing.get("data") or ():
            if isinstance(item, dict):
                for alias in item.get("aliases") or ():
                    aliases[alias] = item["id"]
        base_url = args.base_url or args.url.rstrip("/") + "/v1"
    else:
        try:
            profiles = load_profiles(settings.profiles_dir)
        except ProfileError as error:
            raise ConfigError(f"invalid profiles: {error}") from error
        entries = entries_from_profiles(profiles, settings.model_store)
        for profile in profiles:
            for alias in profile.aliases:
                aliases[alias] = profile.name
        keys_on = keys_configured(settings)
        base_url = args.base_url or public_base_url(settings)
    if keys_on and key_env is None:
        key_env = DEFAULT_KEY_ENV
    chosen = select(entries, args.profiles, aliases)
    unservable = [entry.id for entry in chosen if not entry.servable]
    if unservable:
        warnings.append(
            f"left out (their models are not present, so they cannot serve): {', '.join(unservable)}; "
            "`specgate profiles` says what each needs"
        )
    chosen = [entry for entry in chosen if entry.servable]
    if not chosen:
        raise ConfigError("no profiles to list: none can serve here (see `specgate profiles`)")
    for entry in chosen:
        if entry.context is None or entry.output is None:
            warnings.append(
                f"profile {entry.id!r} has no "
                + " or ".join(
                    name
                    for name, value in (("context_length", entry.context), ("max_output_tokens", entry.output))
                    if value is None
                )
                + "; OpenCode gets no 'limit' for it (set both in the profile to let OpenCode compact in time)"
            )
    return provider_block(chosen, base_url, key_env, args.name), _small_model(args, chosen, warnings), warnings


def _small_model(args: argparse.Namespace, chosen: list[ModelEntry], warnings: list[str]) -> str | None:
    if args.no_small_model:
        return None
    if args.small_model:
        if args.small_model not in {entry.id for entry in chosen}:
            raise ConfigError(f"--small-model {args.small_model!r} is not among the listed profiles")
        return f"{args.provider}/{args.small_model}"
    small = choose_small_model(chosen)
    if small is None:
        warnings.append(
            "no listed profile runs on a backend of its own without a draft: small_model not set, so OpenCode's "
            "title requests share the work's backend (--small-model NAME picks one)"
        )
        return None
    return f"{args.provider}/{small.id}"


def cmd_opencode_config(args: argparse.Namespace) -> int:
    try:
        block, small_model, warnings = build(args)
        for warning in warnings:
            print(f"specgate: warning: {warning}", file=sys.stderr)
        if args.write is None:
            sys.stdout.write(new_document(args.provider, block, small_model))
            return 0
        path: Path = args.write.expanduser()
        try:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read it: {error}") from error
        try:
            result = merge_into(text, args.provider, block, small_model)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error
        write_atomically(path, result.text)
    except ConfigError as error:
        print(f"specgate: {error}", file=sys.stderr)
        return 2
    parts = [f"added {', '.join(result.added)}" if result.added else ""]
    parts.append(f"updated {', '.join(result.updated)}" if result.updated else "")
    parts.append(f"removed {', '.join(result.removed)}" if result.removed else "")
    summary = "; ".join(part for part in parts if part) or "no models"
    print(f"specgate: wrote provider {args.provider!r} to {path}: {summary}", file=sys.stderr)
    if result.comments_dropped:
        print(
            f"specgate: note: comments inside the previous {args.provider!r} block were replaced with it "
            "(comments elsewhere in the file are kept)",
            file=sys.stderr,
        )
    print(f"specgate: select a model in OpenCode as {args.provider}/<profile>", file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "opencode-config",
        help="print, or merge into opencode.json, an OpenCode provider block for this gateway",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--profiles", nargs="+", metavar="NAME", help="profiles to list (default: all)")
    parser.add_argument("--profiles-dir", type=Path, help="directory of profile TOML files (default ./profiles)")
    parser.add_argument("--url", help="list the profiles a running gateway serves (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--base-url", help="baseURL OpenCode should use (default: the gateway's address + /v1)")
    parser.add_argument(
        "--write",
        type=Path,
        metavar="PATH",
        help="merge into this opencode.json (created if missing) instead of printing",
    )
    parser.add_argument("--provider", default=DEFAULT_PROVIDER_ID, help="provider id (default: specgate)")
    parser.add_argument("--name", default=DEFAULT_PROVIDER_NAME, help="provider display name")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help=f"write options.apiKey as {{env:VAR}} (default when the gateway uses API keys: {DEFAULT_KEY_ENV})",
    )
    parser.add_argument(
        "--small-model",
        metavar="NAME",
        help="profile for OpenCode's small_model (session titles; default: one on another backend, if any)",
    )
    parser.add_argument("--no-small-model", action="store_true", help="do not set small_model")
    parser.set_defaults(func=cmd_opencode_config)
