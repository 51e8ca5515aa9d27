"""Errors the gateway itself raises, each carrying its HTTP status and OpenAI error type.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error
    │   └── BodyTooLarge              413
    ├── ModelNotFound                 404 (the available names in the message)
    ├── ModelUnavailable              503 (profile's model files are not present)
    ├── QueueFull                     429 (Retry-After)
    ├── ClientGone                    499 (never sent: the client left)
    └── BackendError                  502 upstream_error
        ├── BackendStartFailed        503 (the reason from the backend's own log)
        ├── BackendTimeout            504 (no byte from the backend for too long)
        └── BackendDied               502 (connection lost mid-response)
            └── BackendUnreachable    502 (no answer at all: connect failed or closed before the status line)

Lower-level exceptions (httpx, OS) are mapped to these in one place: `app.proxy.relay`.

A streaming request has its 200 and headers once admitted; an error after that point (a backend that
fails to start, dies, or times out) reaches the client as the stream's last event, `data: <body()>`, with
no status of its own (app/proxy/handler.py). Refusals before admission keep their status.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

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


class BodyTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ModelUnavailable(GatewayError):
    status_code = 503
    error_type = "model_unavailable"
    code = "model_not_present"


class QueueFull(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class ClientGone(GatewayError):
    status_code = 499
    error_type = "client_closed_request"


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


class BackendUnreachable(BackendDied):
    """The request got no answer at all: if the backend process has died, the request never reached its
    generation, and the handler sends it again once the backend is back (app/proxy/handler.py)."""


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
