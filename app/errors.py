"""Errors the gateway itself raises, each carrying its HTTP status, OpenAI error type and outcome label.

    class                             status type                  outcome (records, /metrics, status page)
    GatewayError                      500 internal_error           backend_error
    ├── InvalidRequest                400 invalid_request_error    client_error
    │   └── BodyTooLarge              413
    ├── ModelNotFound                 404 (the available names)    client_error
    ├── ModelUnavailable              503 (model files absent)     backend_error
    ├── QueueFull                     429 (Retry-After)            rejected
    ├── ClientGone                    499 (never sent)             client_gone
    └── BackendError                  502 upstream_error           backend_error
        ├── BackendStartFailed        503 (the backend's own log)
        ├── BackendTimeout            504 (no byte for too long)
        └── BackendDied               502 (connection lost)

The edge's own refusals subclass these where they are decided (app/auth.py 401, app/browser_guard.py 421
and 415, app/http_limits.py 431 and 408). `Outcome` lists every label a request can end with, and
`outcome_of` is the one place that decides it; the metrics, the status page and the planner read it.

Foreign exceptions become gateway errors through the one table below, `FOREIGN_ERRORS`: a broken or
refused backend connection (`UpstreamError`, which app/proxy/upstream.py raises for the `TRANSPORT_FAILURES`
of its socket) is `BackendDied`, a bound on the backend's silence that ran out (`TimeoutError`) is
`BackendTimeout`. The callers (app/proxy/relay.py; app/proxy/handler.py for a client that leaves while it
sends its body) give the message, which says where it happened. Two mappings stay with the code that knows
the facts: the backend's own HTTP answers (`map_backend_status`, app/proxy/relay.py) and a backend that fails
to start (`BackendStartFailed`, app/backends/process.py, with the reason from its log). Every error is
rendered to the client by one function, app/error_response.py (an SSE stream's last event uses `body()`).

A streaming request has its 200 and headers once admitted; an error after that point (a backend that
fails to start, dies, or times out) reaches the client as the stream's last event, `data: <body()>`, with
no status of its own (app/proxy/handler.py). Refusals before admission keep their status.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

# How a request ended. "unknown" only until it does; "internal_error" is a bug (not a GatewayError).
Outcome = Literal["unknown", "success", "client_error", "rejected", "backend_error", "client_gone", "internal_error"]
OUTCOMES: tuple[Outcome, ...] = (
    "success", "client_error", "rejected", "backend_error", "client_gone", "internal_error"
)  # fmt: skip


class UpstreamError(Exception):
    """The connection to the backend failed (refused, reset, closed early, or timed out); never answered as is."""


# What a socket to a backend raises (asyncio streams): each becomes an UpstreamError (app/proxy/upstream.py).
TRANSPORT_FAILURES: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (a connect or write bound) is one too
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
)


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None
    outcome: Outcome = "backend_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, summary: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # What others may read about this error (the request log, /status.json): the message, unless it
        # carries text the gateway did not write (a backend's error, which can quote the request).
        self.summary = message if summary is None else summary

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code}, message={self.message!r})"


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    outcome: Outcome = "client_error"


class BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    outcome: Outcome = "client_error"


class ModelUnavailable(GatewayError):
    status_code = 503
    error_type = "model_unavailable"
    code = "model_not_present"


class QueueFull(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    outcome: Outcome = "rejected"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class ClientGone(GatewayError):
    status_code = 499
    error_type = "client_closed_request"
    outcome: Outcome = "client_gone"


class BackendError(GatewayError):
    status_code = 502
    error_type = "upstream_error"


class BackendStartFailed(BackendError):
    status_code = 503
    code = "backend_start_failed"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BackendTimeout(BackendError):
    status_code = 504
    code = "backend_timeout"


class BackendDied(BackendError):
    status_code = 502
    code = "backend_died"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# Foreign exception -> the gateway error it becomes; the first entry that matches wins.
FOREIGN_ERRORS: tuple[tuple[type[BaseException], type[GatewayError]], ...] = (
    (UpstreamError, BackendDied),
    (TimeoutError, BackendTimeout),
)


def from_foreign(error: BaseException, message: str) -> GatewayError:
    """The gateway error for a foreign exception (FOREIGN_ERRORS), saying `message`; a GatewayError stays as is."""
    if isinstance(error, GatewayError):
        return error
    for foreign, mapped in FOREIGN_ERRORS:
        if isinstance(error, foreign):
            return mapped(message)
    raise TypeError(f"no gateway error for {type(error).__name__}") from error


def internal_error(error: BaseException) -> GatewayError:
    """A bug, by its type only: an exception's text or repr can hold the request, and answers and records
    are shown to others (/status.json)."""
    return GatewayError(f"internal error: {type(error).__name__}")


def outcome_of(error: BaseException | None) -> Outcome:
    """The outcome label of a request that ended with `error` (None: it was served)."""
    if error is None:
        return "success"
    if isinstance(error, GatewayError):
        return error.outcome
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "client_gone"  # the client went away: its stream was cancelled or closed
    return "internal_error"
