"""The `nodes` and `local` fields of a profile (issue 18 item 3): what a node entry may be, checked at load.

A node is another specgate gateway or any OpenAI-compatible server, named by its base URL without `/v1`
(`http://mac-studio-2:8000`); the gateway adds `/v1/...` itself. Entries are normalized (scheme and host in
lower case, no trailing slash) so that two spellings of one node are caught as a duplicate. A node's API key
never goes in a profile (profiles are shared, shown, committed): it comes from the environment or a key file
(app/backends/node_keys.py), so a profile that names a key, or a URL that carries credentials, is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

# Fields someone might use to put a node's key in a profile: refused with a pointer to the right place.
KEY_FIELDS = frozenset({"api_key", "api_keys", "key", "keys", "node_key", "node_keys", "node_api_key", "token"})
KEY_HINT = "a node's API key never goes in a profile: set SPECGATE_NODE_API_KEY or SPECGATE_NODE_KEYS_FILE"
# Fields that only shape what a local backend is sent or runs: with `local = false` the nodes' own profile
# decides them, so setting them here would be silently ignored.
LOCAL_ONLY_FIELDS = (
    "draft_model", "num_draft_tokens", "dtype", "system_prompt", "system_prompt_file", "context_length",
    "max_output_tokens", "sampling", "backend", "routing", "prompt_lookup",
)  # fmt: skip


def normalize_node_url(value: object) -> str:
    """`value` as a node base URL (`scheme://host[:port]`), or ValueError saying what is wrong with it."""
    if isinstance(value, dict) and KEY_FIELDS & set(value):
        raise ValueError(KEY_HINT)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a node is a base URL such as 'http://mac-studio-2:8000'")
    if any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise ValueError(f"{value!r}: a node URL has no spaces or control characters")
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{value!r}: a node URL starts with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r}: credentials in a node URL are refused; {KEY_HINT}")
    host = parts.hostname
    if not host:
        raise ValueError(f"{value!r}: a node URL names a host")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"{value!r}: {error}") from None
    path = parts.path.rstrip("/")
    if path.lower() in ("/v1", "/v1/chat/completions", "/v1/completions"):
        raise ValueError(f"{value!r}: give the node's base URL without /v1 (the gateway adds /v1/...)")
    if path:
        raise ValueError(f"{value!r}: a node URL has no path (give scheme://host:port)")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: a node URL has no query or fragment")
    try:
        bracketed = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        bracketed = host
    return f"{scheme}://{bracketed}" + (f":{port}" if port is not None else "")


def check_nodes(values: Iterable[str]) -> tuple[str, ...]:
    """Every entry normalized; ValueError on a bad one or a duplicate (after normalizing)."""
    seen: dict[str, str] = {}
    for value in values:
        url = normalize_node_url(value)
        if url in seen:
            raise ValueError(f"{value!r} is listed twice (as {seen[url]!r} too)")
        seen[url] = value
    return tuple(seen)


class FieldProblem(ValueError):
    """A profile check over several fields that knows which field is wrong (app/profiles.py names it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_node_fields(data: object) -> object:
    """A profile's raw fields with `nodes` normalized; FieldProblem for a key in the profile, a bad node
    entry, `local = false` without nodes or with local-only fields, and a local profile without `model`."""
    if not isinstance(data, dict):
        return data
    for field in sorted(KEY_FIELDS & set(data)):
        raise FieldProblem(field, KEY_HINT)
    local = data.get("local", True)
    nodes = data.get("nodes", ())
    if not isinstance(nodes, list | tuple):
        raise FieldProblem("nodes", 'a list of base URLs, such as ["http://mac-studio-2:8000"]')
    try:
        normalized = check_nodes(nodes)
    except ValueError as error:
        raise FieldProblem("nodes", str(error)) from None
    if local is False:
        if not normalized:
            raise FieldProblem("nodes", "local = false needs at least one node to serve the profile")
        for field in LOCAL_ONLY_FIELDS:
            if field in data:
                raise FieldProblem(
                    field, "applies to a local backend only; with local = false the nodes' own profile decides it"
                )
    elif not data.get("model"):
        raise FieldProblem("model", "required (a profile served only by nodes says local = false and lists them)")
    return {**data, "nodes": normalized} if "nodes" in data else data
