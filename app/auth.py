"""Optional API keys: `Authorization: Bearer <key>` on the /v1 and /logs routes.

Keys come from `SPECGATE_API_KEYS` (comma- or whitespace-separated) and/or `SPECGATE_API_KEY_FILE`
(one key a line, `#` comments). With neither set the gateway is open, as a loopback service is.
Comparison is constant-time (hmac.compare_digest) against every key, so timing reveals nothing about
which key or prefix matched. Keys are never logged; a refusal logs only the path and the reason.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.error_response import send_error
from app.errors import InvalidRequest
from app.settings import Settings

logger = logging.getLogger("specgate.auth")


class KeyFileError(Exception):
    pass


class Unauthorized(InvalidRequest):
    status_code = 401
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="specgate"'}


def load_keys(settings: Settings) -> list[bytes]:
    """Every configured key, as bytes (compare_digest wants bytes or ASCII str)."""
    keys = [key for key in settings.api_keys.replace(",", " ").split() if key]
    if settings.api_key_file is not None:
        path = Path(settings.api_key_file)
        try:
            text = path.read_text()
        except OSError as error:
            raise KeyFileError(f"cannot read the API key file {path}: {error.strerror}") from error
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.append(line)
        if not keys:
            raise KeyFileError(f"the API key file {path} holds no keys")
    return [key.encode() for key in keys]


def reload_keys(settings: Settings, keys: list[bytes]) -> None:
    """Replace `keys` in place from the settings' sources; on an error keep the current keys and say why."""
    if settings.api_key_file is None:
        return  # keys from the environment cannot change under a running process
    try:
        fresh = load_keys(settings)
    except KeyFileError as error:
        logger.error("API keys not reloaded, keeping the %d current keys: %s", len(keys), error)
        return
    keys[:] = fresh
    logger.info("API keys reloaded: %d keys", len(fresh))


def protected_prefixes(settings: Settings) -> tuple[str, ...]:
    prefixes = ["/v1", "/logs"]
    if settings.auth_metrics:
        prefixes.append("/metrics")
    if settings.auth_health:
        prefixes.append("/health")
    return tuple(prefixes)


def key_matches(given: bytes, keys: list[bytes]) -> bool:
    # No early exit: every key is compared, so the time taken does not say which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


class ApiKeyMiddleware:
    """ASGI middleware (not BaseHTTPMiddleware: streaming responses pass through untouched)."""

    def __init__(self, app: ASGIApp, keys: list[bytes], prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys
        self.prefixes = prefixes

    def _needs_key(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = self.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
        else:
            await send_refusal(scope, send, reason)

    def refusal(self, scope: Scope) -> str | None:
        """Why this request may not pass (missing or wrong key), or None when it may."""
        if scope["type"] != "http" or not self.keys or not self._needs_key(scope["path"]):
            return None
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if not header:
            return "missing Authorization header; send 'Authorization: Bearer <key>'"
        if scheme.lower() != b"bearer" or not token.strip():
            return "the Authorization header must be 'Bearer <key>'"
        if not key_matches(token.strip(), self.keys):
            return "invalid API key"
        return None


async def send_refusal(scope: Scope, send: Send, reason: str) -> None:
    """The 401 answer (app/error_response.py renders it)."""
    logger.warning("refused %s %s: %s", scope.get("method"), scope["path"], reason)
    await send_error(send, Unauthorized(reason))
