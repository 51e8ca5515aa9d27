"""API keys for upstream nodes (issue 18 item 3): from the environment or a file, never from a profile.

`SPECGATE_NODE_API_KEY` is sent to every node; `SPECGATE_NODE_KEYS_FILE` names a file of `URL KEY` lines
(`#` starts a comment), whose key for a node wins over the common one. URLs are normalized as profiles'
are (app/node_urls.py), so `http://Mac:8000/` in the file matches `http://mac:8000` in a profile. A key
goes to its node as `Authorization: Bearer KEY`, over the node's own scheme (use https across networks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.node_urls import normalize_node_url
from app.settings import Settings


class NodeKeyError(Exception):
    """A node key file that cannot be used; start-up stops on it (a reload keeps the keys it had)."""


@dataclass(frozen=True)
class NodeKeys:
    common: str | None = None
    by_url: dict[str, str] = field(default_factory=dict)

    def for_url(self, url: str) -> str | None:
        return self.by_url.get(url, self.common)

    def headers(self, url: str) -> dict[str, str]:
        key = self.for_url(url)
        return {"Authorization": f"Bearer {key}"} if key else {}


def parse_keys_file(text: str, source: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise NodeKeyError(f"{source}: line {number}: expected `URL KEY`")
        try:
            url = normalize_node_url(parts[0])
        except ValueError as error:
            raise NodeKeyError(f"{source}: line {number}: {error}") from None
        keys[url] = parts[1]
    return keys


def load_node_keys(settings: Settings) -> NodeKeys:
    common = settings.node_api_key.strip() or None
    if settings.node_keys_file is None:
        return NodeKeys(common)
    path = Path(settings.node_keys_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise NodeKeyError(
            f"cannot read the node keys file {path}: {getattr(error, 'strerror', None) or error}"
        ) from error
    return NodeKeys(common, parse_keys_file(text, str(path)))
