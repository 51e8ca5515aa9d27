"""Gateway settings: one pydantic-settings model, built in the entry point and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_cache_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.blas import validate_value as validate_blas


def default_model_store() -> Path:
    return Path(user_cache_dir("specgate")) / "models"


class Settings(BaseSettings):
    """Everything about the gateway that is not a profile. Environment: `SPECGATE_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="SPECGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # Used when no port was given and `port` is taken: the behaviour users had from launcher scripts.
    fallback_port: int = 8080
    profiles_dir: Path = Path("profiles")
    model_store: Path = Field(default_factory=default_model_store)

    max_backends: int = Field(default=2, ge=1, description="backend processes running at once (LRU)")
    preload: list[str] = Field(default_factory=list, description="profiles whose backends start at once")
    prepare_models: bool = Field(default=True, description="pull catalog models before taking traffic")

    backend_start_timeout: float = Field(default=300.0, gt=0, description="seconds to load a model")
    backend_stop_grace: float = Field(default=5.0, ge=0, description="SIGTERM -> SIGKILL grace")
    backend_log_lines: int = Field(default=2000, ge=10)
    # BLAS under the backends' float32 matmuls (app/blas.py): "auto", "off" or a library path.
    blas: str = "auto"
    # Seconds without a byte from a generating backend before the request fails (a hung backend).
    inactivity_timeout: float = Field(default=120.0, gt=0)
    # Prompt processing sends nothing until the first token, and is slow on a CPU: a longer bound.
    first_token_timeout: float = Field(default=900.0, gt=0)
    # Seconds a backend may send nothing at all (to any request) while a request waits for its response head;
    # then it is taken for hung: the request gets 504 and the backend is restarted. mlx_lm.server sends a
    # stream's head before it processes the prompt, so this covers its queue, not prompt processing; it waits
    # out work the gateway gave up on (a long prompt whose client left), hence minutes (app/proxy/relay.py).
    head_timeout: float = Field(default=300.0, gt=0)
    # A streaming request gets its headers once admitted, then an SSE comment at least this often while it
    # waits (queue, backend start, prompt processing): clients such as OpenCode give up without headers.
    keepalive_seconds: float = Field(default=10.0, gt=0)
    restart_backoff_initial: float = Field(default=1.0, ge=0)
    restart_backoff_max: float = Field(default=60.0, ge=0)

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Seconds a connection may stay unable to take more of its answer (the client reads nothing); then it is
    # aborted and its request ends as if the client had left: one that stops reading holds no backend slot.
    client_write_timeout: float = Field(default=60.0, gt=0)
    # A request's head (request line and headers): beyond this many bytes 431; not complete within this
    # many seconds of the connection's start (or the request's first byte): 408; its body not complete
    # within body_timeout seconds of the head: 408 (app/http_limits.py).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout: float = Field(default=30.0, gt=0)
    body_timeout: float = Field(default=120.0, gt=0)

    # Prompt caches on disk (app/launcher/disk_tier.py): backends keep prompts' KV caches below this
    # directory (default: `.prompt-cache` in the model store), one subdirectory per model identity of at
    # most `prompt_cache_disk_bytes` (0: memory only; a profile's `backend.prompt_cache_disk_bytes` wins),
    # and restore them after a restart, TTL unload or eviction. A prompt is saved when at least
    # `prompt_cache_min_tokens` of it are not on disk yet.
    prompt_cache_dir: Path | None = None
    prompt_cache_disk_bytes: int = Field(default=4 << 30, ge=0)
    prompt_cache_min_tokens: int = Field(default=256, ge=1)

    # Access (app/auth.py). Keys: comma- or whitespace-separated here, and/or one a line in the file.
    api_keys: str = Field(default="", repr=False)
    api_key_file: Path | None = None
    # /v1 and /logs always need a key when keys are on; these two only when asked (scrapers, probes).
    auth_metrics: bool = False
    auth_health: bool = False
    # Browser origins allowed by CORS (comma-separated, "*" for any); empty: no CORS headers at all.
    cors_origins: str = ""
    # Host names answered besides those of the bound address (app/browser_guard.py): comma- or
    # space-separated, "*.example.com" for a domain and its subdomains, "*" for any (no check).
    allowed_hosts: str = ""

    # Upstream nodes of profiles with `nodes` (app/backends/nodes.py). Their keys never come from a profile:
    # one key for every node here, and/or a file of `URL KEY` lines (a node's own line wins).
    node_api_key: str = Field(default="", repr=False)
    node_keys_file: Path | None = None
    # Seconds between health checks of each node (a down node is asked as often: it comes back when it answers).
    node_health_seconds: float = Field(default=2.0, gt=0)
    # Seconds to open a connection to a node (a refused or timed-out connect is tried on another node).
    node_connect_timeout: float = Field(default=5.0, gt=0)
    # A session's turns stay on the node that holds its prompt cache while that node's queue is at most this
    # many requests longer than the shortest (app/backends/nodes.py); 0: only among the least loaded.
    node_affinity_slack: int = Field(default=1, ge=0)

    # Change without downtime: SIGHUP reloads profiles; optionally also when a profile file changes.
    reload_on_change: bool = False
    reload_poll_seconds: float = Field(default=2.0, gt=0)
    # SIGTERM: in-flight requests may finish for this long before backends are stopped.
    shutdown_grace: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    # "json": one JSON object per log line, with the request id (app/logging_setup.py).
    log_format: Literal["text", "json"] = "text"

    # Files the gateway writes for its backends (a distributed profile's hostfile); default: `.run` in the
    # model store.
    run_dir: Path | None = None

    @property
    def run_root(self) -> Path:
        return self.run_dir or self.model_store / ".run"

    @property
    def prompt_cache_root(self) -> Path:
        # The store's layout (app/models/store.py) names this directory.
        return self.prompt_cache_dir or self.model_store / ".prompt-cache"

    @field_validator("blas")
    @classmethod
    def _blas_usable(cls, value: str) -> str:
        return validate_blas(value)
