"""Profiles: what a requested model name means (models, draft, sampling, limits), loaded from TOML.

A profile file holds any number of profiles:

    [profiles."speculative/tiny-balanced"]
    model = "/path/to/main"
    draft_model = "/path/to/draft"
    num_draft_tokens = 5

`draft_model = "prompt-lookup"` drafts without a draft model, by n-gram matching of prompt and output
in the launcher; its settings go in an optional `prompt_lookup = { min_ngram = 2, max_ngram = 4 }`.

`distributed = { ranks = 2, backend = "ring", mode = "pipeline" }` (or `hosts = [...]`, or `hostfile = "..."`)
runs the backend as several MLX ranks started by MLX's launcher, `mlx.launch` (app/backends/distributed.py).

Profiles whose backend settings are equal (`BackendSpec`) share one backend process; they may
differ in `num_draft_tokens`, sampling, prompts and limits, which the gateway applies per request.
"""

from __future__ import annotations

import json
import stat
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.blas import validate_value as validate_blas
from app.node_urls import FieldProblem, check_node_fields

Dtype = Literal["float32", "float16", "bfloat16"]
# "auto": the gateway picks k per request from what it measures (app/adaptive/), 0 included.
DraftLength = Annotated[int, Field(ge=0, le=64)] | Literal["auto"]
# The `draft_model` value that means "draft by prompt lookup": not a model to resolve or load.
PROMPT_LOOKUP = "prompt-lookup"


class ProfileError(Exception):
    """A profile file that cannot be used; the message names the file, the profile and the field."""


def _no_nul(value: Any) -> Any:
    """Paths, programs, arguments and environment reach the OS, which cannot take a NUL in them."""
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if isinstance(item, tuple | list):
            _no_nul(item)
        elif isinstance(item, str) and "\x00" in item:
            raise ValueError("must not contain a NUL character")
    return value


class _Strict(BaseModel):
    # TOML has inf and nan; no field of a profile means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Sampling(_Strict):
    """Defaults filled into a request for every field the client did not send."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)

    def as_request_fields(self) -> dict[str, Any]:
        return {name: value for name, value in self.model_dump().items() if value is not None}


class BackendOptions(_Strict):
    """How the backend process is run. Equal options (with equal models) mean a shared process."""

    # Program to run instead of specgate's launcher (it receives the same flags; see docs).
    command: Annotated[tuple[str, ...], Field(min_length=1)] | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    # Backends run with HF_HUB_OFFLINE=1 unless this is set: a request must never trigger a download.
    allow_hub: bool = False
    # Requests the backend is sent at once. A backend with a draft model runs one at a time anyway.
    max_concurrency: int = Field(default=1, ge=1, le=64)
    # The BLAS for this backend (app/blas.py); None: the gateway's SPECGATE_BLAS.
    blas: str | None = None
    # Bytes of prompt caches this backend's models may keep on disk (app/launcher/disk_tier.py); None: the
    # gateway's SPECGATE_PROMPT_CACHE_DISK_BYTES; 0: memory only.
    prompt_cache_disk_bytes: int | None = Field(default=None, ge=0)

    @field_validator("blas")
    @classmethod
    def _blas_usable(cls, value: str | None) -> str | None:
        return None if value is None else validate_blas(value)

    @field_validator("env", mode="before")
    @classmethod
    def _env_from_table(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(item, Mapping | list):
                    raise ValueError(f"the value of {key!r} must be a string, number or boolean")
            return tuple(sorted((str(k), str(v)) for k, v in value.items()))
        return value

    @field_validator("command", "args", "env")
    @classmethod
    def _reaches_the_os(cls, value: Any) -> Any:
        return _no_nul(value)


DistributedBackend = Literal["ring", "mpi", "jaccl", "jaccl-ring", "nccl"]
# Backends whose hosts must be given with their RDMA devices, which only a hostfile can say.
_NEEDS_HOSTFILE = ("jaccl", "jaccl-ring")


class Distributed(_Strict):
    """One model over several MLX ranks (`mlx.launch`): `ranks` on this host, or one rank per host of
    `hosts`, or the hosts of an MLX `hostfile` (JSON). Rank 0 serves HTTP; the gateway talks to it alone."""

    ranks: int | None = Field(default=None, ge=1, le=64, strict=True)
    hosts: Annotated[tuple[str, ...], Field(min_length=1, max_length=64)] | None = None
    # A path; relative paths are relative to the profile file's directory (resolved when loaded).
    hostfile: str | None = None
    backend: DistributedBackend = "ring"
    # tensor: every layer split across the ranks; pipeline: the layers divided among them (`--pipeline`).
    mode: Literal["tensor", "pipeline"] = "tensor"
    # Set on every rank (`mlx.launch --env`), remote ones included.
    env: tuple[tuple[str, str], ...] = ()

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # a tuple of pairs (made in code); anything else fails the type check
        for key, item in value.items():
            if not isinstance(item, str):
                raise ValueError(f"the value of {key!r} must be a string")
            if not key or not all(ch.isascii() and (ch.isalnum() or ch == "_") for ch in key) or key[0].isdigit():
                # mlx.launch silently drops a name it cannot export; say so here instead.
                raise ValueError(f"{key!r} is not an environment variable name (letters, digits, _)")
        return tuple(sorted(value.items()))

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for host in value or ():
            if (
                not host
                or host.startswith("-")
                or any(ch.isspace() or ch in ",\x00" or not ch.isprintable() for ch in host)
            ):
                raise ValueError(f"{host!r} is not a host name (no spaces, commas or a leading '-')")
        return value

    @field_validator("hostfile", "env")
    @classmethod
    def _reaches_the_os(cls, value: Any) -> Any:
        return _no_nul(value)

    @model_validator(mode="after")
    def _one_placement(self) -> Distributed:
        given = [name for name in ("ranks", "hosts", "hostfile") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of ranks, hosts or hostfile (got {', '.join(given) or 'none'})")
        if self.backend in _NEEDS_HOSTFILE and self.hostfile is None:
            raise ValueError(f'backend "{self.backend}" needs a hostfile that lists each host\'s RDMA devices')
        return self


class PromptLookup(_Strict):
    """N-gram sizes of prompt-lookup drafting (tokens); k per round is `num_draft_tokens`."""

    min_ngram: int = Field(default=2, ge=1, le=16)
    max_ngram: int = Field(default=4, ge=1, le=16)

    @model_validator(mode="after")
    def _ordered(self) -> PromptLookup:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")
        return self


class Routing(_Strict):
    """Under contention, send requests to the baseline twin (same main model, no draft) instead."""

    # A profile with the same model and dtype and no draft model.
    twin: str = Field(min_length=1)
    # Route a request when at least this many requests already wait for the speculative backend.
    queue_threshold: int = Field(default=1, ge=1)


class Profile(_Strict):
    """One servable model name."""

    name: str
    # Required unless `local = false` (checked with the node fields below).
    model: str = ""
    draft_model: str | None = None
    num_draft_tokens: DraftLength = 3
    dtype: Dtype = "float32"
    description: str = ""
    display_name: str | None = None
    aliases: tuple[str, ...] = ()
    system_prompt: str | None = None
    system_prompt_file: str | None = None
    context_length: int | None = Field(default=None, ge=16)
    max_output_tokens: int | None = Field(default=None, ge=1)
    # Seconds a backend may sit idle before it is unloaded; 0 keeps it loaded.
    ttl: float = Field(default=600.0, ge=0)
    # Requests this profile may have running plus waiting; beyond it, 429.
    max_queue: int = Field(default=64, ge=1)
    sampling: Sampling = Sampling()
    backend: BackendOptions = BackendOptions()
    # Off unless set: see Routing.
    routing: Routing | None = None
    # Settings of `draft_model = "prompt-lookup"` (defaults when absent); only with that draft.
    prompt_lookup: PromptLookup | None = None
    # Several MLX ranks instead of one process (app/backends/distributed.py); None: one process.
    distributed: Distributed | None = None
    source_file: str = ""

    # ----- Upstream nodes (issue 18 item 3): app/node_urls.py checks them; app/backends/nodes.py serves them.
    # Base URLs (without /v1) of other specgate gateways or OpenAI-compatible servers that serve this profile.
    nodes: tuple[str, ...] = ()
    # False: no local backend; every request goes to a node (whose own profile of this name serves it).
    local: bool = True

    @model_validator(mode="before")
    @classmethod
    def _node_fields(cls, data: Any) -> Any:
        return check_node_fields(data)

    @property
    def remote_only(self) -> bool:
        return not self.local

    # ----- end of the node fields

    @field_validator("model", "draft_model", "system_prompt_file")
    @classmethod
    def _reaches_the_os(cls, value: str | None) -> str | None:
        return _no_nul(value)  # type: ignore[no-any-return]

    @model_validator(mode="after")
    def _one_prompt_source(self) -> Profile:
        if self.system_prompt is not None and self.system_prompt_file is not None:
            raise ValueError("set system_prompt or system_prompt_file, not both")
        return self

    @model_validator(mode="after")
    def _lookup_settings_need_lookup(self) -> Profile:
        if self.prompt_lookup is not None and self.draft_model != PROMPT_LOOKUP:
            raise ValueError(f'prompt_lookup settings need draft_model = "{PROMPT_LOOKUP}"')
        return self

    @property
    def is_speculative(self) -> bool:
        return self.draft_model is not None

    @property
    def uses_draft_weights(self) -> bool:
        """A draft model to resolve and load (prompt lookup has none)."""
        return self.draft_model is not None and self.draft_model != PROMPT_LOOKUP

    @property
    def lookup_settings(self) -> PromptLookup | None:
        if self.draft_model != PROMPT_LOOKUP:
            return None
        return self.prompt_lookup or PromptLookup()

    @property
    def adaptive(self) -> bool:
        return self.is_speculative and self.num_draft_tokens == "auto"

    @property
    def default_draft_tokens(self) -> int:
        """k for a request that names none; an `auto` profile's planner overrides the 0 here."""
        return 0 if self.num_draft_tokens == "auto" else self.num_draft_tokens

    @property
    def backend_spec(self) -> BackendSpec:
        return BackendSpec(
            self.model, self.draft_model, self.dtype, self.backend, self.lookup_settings, self.distributed
        )


@dataclass(frozen=True)
class BackendSpec:
    """Everything that decides which backend process serves a profile."""

    model: str
    draft_model: str | None
    dtype: Dtype
    options: BackendOptions
    # Set when draft_model is PROMPT_LOOKUP: the launcher drafts by n-gram lookup with these sizes.
    prompt_lookup: PromptLookup | None = None
    # Several ranks started by mlx.launch; part of the identity: a distributed and a one-process profile of
    # the same model are different backends.
    distributed: Distributed | None = None

    @property
    def draft_path(self) -> str | None:
        """The draft model to resolve and load, if any."""
        return None if self.draft_model == PROMPT_LOOKUP else self.draft_model


class ProfileSet:
    """All profiles, looked up by name or alias."""

    def __init__(self, profiles: Iterable[Profile]) -> None:
        self.profiles: dict[str, Profile] = {}
        self._by_alias: dict[str, Profile] = {}
        for profile in profiles:
            self._add(profile)
        for profile in self.profiles.values():
            self._check_routing(profile)

    def _add(self, profile: Profile) -> None:
        for name in (profile.name, *profile.aliases):
            clash = self.profiles.get(name) or self._by_alias.get(name)
            if clash is not None:
                raise ProfileError(
                    f"{profile.source_file}: profile {profile.name!r}: name {name!r} is already used "
                    f"by profile {clash.name!r} in {clash.source_file}"
                )
        self.profiles[profile.name] = profile
        for alias in profile.aliases:
            self._by_alias[alias] = profile

    def _check_routing(self, profile: Profile) -> None:
        if profile.routing is None:
            return
        where = f"{profile.source_file}: profile {profile.name!r}: field 'routing.twin'"
        twin = self.get(profile.routing.twin)
        if not profile.is_speculative:
            raise ProfileError(f"{where}: only a profile with a draft model can route to a twin")
        if twin is None:
            raise ProfileError(f"{where}: no profile named {profile.routing.twin!r}")
        # Greedy output stays identical only on the same weights in the same dtype.
        if twin.draft_model is not None or twin.model != profile.model or twin.dtype != profile.dtype:
            raise ProfileError(
                f"{where}: {twin.name!r} must have the same model and dtype ({profile.model}, {profile.dtype}) "
                "and no draft model"
            )

    def get(self, name: str) -> Profile | None:
        return self.profiles.get(name) or self._by_alias.get(name)

    def names(self) -> list[str]:
        return list(self.profiles)

    def __iter__(self) -> Any:
        return iter(self.profiles.values())

    def __len__(self) -> int:
        return len(self.profiles)


# A profile file or prompt file larger than this is a mistake (a model file renamed?), not read.
MAX_FILE_BYTES = 1024 * 1024
# Fields that the loader sets itself: a file that sets them would clash with it.
_LOADER_FIELDS = ("name", "source_file")


def _format_validation_error(source: str, name: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(profile)"
        problem = (item.get("ctx") or {}).get("error")
        if isinstance(problem, FieldProblem):  # a check of several fields that knows which one is wrong
            problems.append(f"field {problem.field!r}: {problem}")
            continue
        problems.append(f"field {field!r}: {item['msg']}")
    return f"{source}: profile {name!r}: " + "; ".join(problems)


def read_text_file(path: Path, what: str) -> str:
    """A regular file's text as UTF-8, or a ProfileError that names the file and says what is wrong.

    Checked before opening: a directory named `x.toml` cannot be read, and opening a FIFO would block
    the reload (and start-up) for good."""
    try:
        info = path.stat()
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise ProfileError(f"{path}: cannot read the {what}: {getattr(error, 'strerror', None) or error}") from error
    if not stat.S_ISREG(info.st_mode):
        raise ProfileError(f"{path}: the {what} is not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ProfileError(f"{path}: the {what} is {info.st_size} bytes, over the limit of {MAX_FILE_BYTES}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ProfileError(f"{path}: cannot read the {what}: {error.strerror}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProfileError(f"{path}: the {what} is not UTF-8 text (byte {error.start})") from error


def _read_prompt_file(source: str, name: str, prompts_dir: Path, relative: str) -> str:
    where = f"{source}: profile {name!r}: field 'system_prompt_file'"
    try:
        path = (prompts_dir / relative).resolve()
    except (OSError, ValueError) as error:  # a NUL in the name, a symlink loop
        raise ProfileError(f"{where}: {relative!r}: {error}") from error
    if not path.is_relative_to(prompts_dir.resolve()):
        raise ProfileError(f"{where}: {relative!r} is outside {prompts_dir}")
    try:
        return read_text_file(path, "prompt file")
    except ProfileError as error:
        raise ProfileError(f"{where}: {error}") from error


def _is_one_word(text: str) -> bool:
    """Non-empty, without spaces, line breaks or other control and format characters."""
    return bool(text) and not any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _check_names(source: str, name: str, fields: dict[str, Any]) -> None:
    """Names are what clients send as `model` and what logs and metrics labels show: printable, one word."""
    if not _is_one_word(name):
        raise ProfileError(
            f"{source}: profile {name!r}: a profile name must be non-empty, without spaces or control characters"
        )
    for field in _LOADER_FIELDS:
        if field in fields:
            raise ProfileError(
                f"{source}: profile {name!r}: field {field!r}: not a profile field "
                "(a profile's name is its table's key, [profiles.\"NAME\"])"
            )
    aliases = fields.get("aliases")
    for alias in aliases if isinstance(aliases, list) else ():
        if isinstance(alias, str) and not _is_one_word(alias):
            raise ProfileError(
                f"{source}: profile {name!r}: field 'aliases': {alias!r} must be non-empty, "
                "without spaces or control characters"
            )


def _with_hostfile_checked(profile: Profile, source: str) -> Profile:
    """The profile with `distributed.hostfile` made absolute (relative to the profile file) and checked to be
    an MLX hostfile: a JSON list of hosts, or an object with `hosts` (mlx/_distributed_utils/common.py)."""
    distributed = profile.distributed
    assert distributed is not None
    assert distributed.hostfile is not None
    where = f"{source}: profile {profile.name!r}: field 'distributed.hostfile'"
    path = Path(distributed.hostfile).expanduser()
    if not path.is_absolute():
        path = (Path(source).parent if Path(source).is_file() else Path.cwd()) / path
    try:
        data = json.loads(read_text_file(path, "hostfile"))
    except ProfileError as error:
        raise ProfileError(f"{where}: {error}") from error
    except json.JSONDecodeError as error:
        raise ProfileError(f"{where}: {path} is not JSON: {error}") from error
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise ProfileError(f'{where}: {path} must hold a non-empty list of hosts (or an object with "hosts")')
    for index, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str) or not host["ssh"]:
            raise ProfileError(f'{where}: {path}: host {index} needs an "ssh" name')
        ips = host.get("ips", [])
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ProfileError(f'{where}: {path}: host {index}: "ips" must be a list of strings')
        if distributed.backend == "ring" and not ips:
            raise ProfileError(f'{where}: {path}: host {index} ({host["ssh"]}): the ring backend needs its "ips"')
    checked = distributed.model_copy(update={"hostfile": str(path.resolve())})
    return profile.model_copy(update={"distributed": checked})


def parse_profiles(text: str, source: str = "<string>", prompts_dir: Path | None = None) -> list[Profile]:
    """Parse one TOML document of profiles. `source` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{source}: invalid TOML: {error}") from error
    except RecursionError as error:
        raise ProfileError(f"{source}: invalid TOML: nested too deeply") from error
    unknown = set(document) - {"profiles"}
    if unknown:
        raise ProfileError(
            f'{source}: unknown top-level table(s) {sorted(unknown)}; profiles go under [profiles."NAME"]'
        )
    table = document.get("profiles", {})
    if not isinstance(table, dict):
        raise ProfileError(f"{source}: 'profiles' must be a table of profiles")
    profiles = []
    for name, fields in table.items():
        if not isinstance(fields, dict):
            raise ProfileError(f"{source}: profile {name!r}: must be a table of fields")
        _check_names(source, name, fields)
        try:
            profile = Profile(name=name, source_file=source, **fields)
        except ValidationError as error:
            raise ProfileError(_format_validation_error(source, name, error)) from error
        except Exception as error:  # a validator that raised something other than ValueError
            raise ProfileError(f"{source}: profile {name!r}: {type(error).__name__}: {error}") from error
        if profile.distributed is not None and profile.distributed.hostfile is not None:
            profile = _with_hostfile_checked(profile, source)
        if profile.system_prompt_file is not None:
            base = prompts_dir if prompts_dir is not None else Path.cwd()
            prompt = _read_prompt_file(source, name, base, profile.system_prompt_file)
            profile = profile.model_copy(update={"system_prompt": prompt})
        profiles.append(profile)
    return profiles


def load_profiles(directory: Path) -> ProfileSet:
    """Load every `*.toml` in `directory` (sorted by name); prompt files live in `directory/prompts`.

    Any problem, in any file, is a ProfileError that names the file (and the profile and field where
    there is one): at start it stops `specgate serve`, on reload the running profiles stay."""
    if not directory.is_dir():
        raise ProfileError(f"{directory}: profiles directory does not exist (set --profiles-dir)")
    try:
        paths = sorted(directory.glob("*.toml"))
    except OSError as error:
        raise ProfileError(f"{directory}: cannot list the profiles directory: {error.strerror}") from error
    profiles: list[Profile] = []
    for path in paths:
        profiles.extend(parse_profiles(read_text_file(path, "profile file"), str(path), directory / "prompts"))
    return ProfileSet(profiles)
