r"""Gateway logging: plain text or one JSON object per line, with the request id of the request being served.

The request id is decided once, at the edge (app/edge.py), which sets `current_request_id` for the code
of the request; every log record made meanwhile carries it.

Log lines hold what clients sent (a refused path, a backend's echo of a request), so both formats escape
control characters in every message (`\n` -> `\x0a`, ESC -> `\x1b`, ...): a client cannot forge a log
line or send escape sequences to the terminal that shows the log (issue 19 item 9). Tracebacks keep
their line breaks and lose every other control character.

    SPECGATE_LOG_FORMAT=json specgate serve
    {"time": "2026-11-01T12:00:00.123Z", "level": "INFO", "logger": "specgate.requests",
     "message": "req-1 speculative/x success, ...", "request_id": "req-1"}
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
from typing import Any

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


# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the bidirectional overrides
# and isolates (they reorder what a terminal shows: "Trojan Source", CVE-2021-42574).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` on one line with every control character written as an escape."""
    return _CONTROLS.sub(_escape, text)


def printable_lines(text: str) -> str:
    """Like `printable`, but line breaks stay (tracebacks)."""
    return _CONTROLS_BUT_NEWLINE.sub(_escape, text)


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
            "message": printable(record.getMessage()),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = printable_lines(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = printable_lines(self.formatStack(record.stack_info))
        # default=str: an extra that is not JSON (a Path, an enum) must not lose the whole line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with the message escaped (`printable`) and tracebacks kept to their own lines."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() has just set `record.message` from getMessage(), as every formatter's format() does.
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return printable_lines(super().formatStack(stack_info))


def configure_logging(level: str, log_format: str) -> None:
    """Install one handler on the root logger; uvicorn's loggers propagate to it when it is given no config."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
