"""Gateway logging: plain text or one JSON object per line, with the request id of the request being served.

The request id is decided once, at the edge (`RequestIdMiddleware`): the client's `X-Request-Id` when it is
sane, else a fresh one written back into the request's headers, so that the completion handler (which reads
the header), the backend (which receives it) and every log record made while serving the request agree.

    SPECGATE_LOG_FORMAT=json specgate serve
    {"time": "2026-11-01T12:00:00.123Z", "level": "INFO", "logger": "specgate.requests",
     "message": "req-1 speculative/x success, ...", "request_id": "req-1"}
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.proxy.handler import request_id_for

# The id of the request whose code is running now; None outside a request (start-up, reaper, backend pumps).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("specgate_request_id", default=None)

# app.backends.logs.BackendLog logs each backend's lines under this prefix + the backend's name.
BACKEND_OUTPUT_LOGGER = "specgate.backend."
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not "extra" fields passed by the caller.
# uvicorn adds `color_message` (the message with terminal colour codes) to its records: noise in JSON.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` from the context, so any formatter (text or JSON) can use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            # A backend's output is pumped by tasks that inherited the context of whichever request
            # started the backend; that id would be wrong on every later line. Those lines carry their
            # own id in their text (the launcher logs "specgate request <id> ...").
            inherited = record.name.startswith(BACKEND_OUTPUT_LOGGER)
            record.request_id = None if inherited else current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, request_id, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a Path, an enum) must not lose the whole line.
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Install one handler on the root logger; uvicorn's loggers propagate to it when it is given no config."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def tag_request(scope: Scope) -> tuple[Scope, str]:
    """The request's id (the client's sane X-Request-Id, else a new one) and a copy of `scope` whose only
    X-Request-Id header is that id, so that the handler and the backend read the same one."""
    request_id = request_id_for(Request(scope))
    headers = [(name, value) for name, value in scope["headers"] if name != b"x-request-id"]
    return {**scope, "headers": [*headers, (b"x-request-id", request_id.encode("ascii"))]}, request_id


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware) so the context variable also covers a streaming body's generator."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope, request_id = tag_request(scope)
        raw = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            # Every answer names its id, errors included, so a client can quote it in a report.
            if message["type"] == "http.response.start":
                response_headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-request-id" for name, _ in response_headers):
                    response_headers.append((b"x-request-id", raw))
                message = {**message, "headers": response_headers}
            await send(message)

        token = current_request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
