"""The one renderer of an error answer: every refusal and failure the client gets as an HTTP status goes here.

An error becomes a GatewayError first (the edge's own refusals are subclasses: 401 app/auth.py, 421 and 415
app/browser_guard.py, 431 and 408 app/http_limits.py; starlette's HTTPException and FastAPI's validation
errors through `as_gateway_error`; a bug is `internal_error`), then `render_error` writes its status, its
headers (`Retry-After`, `WWW-Authenticate`) and the OpenAI envelope. The edge (app/edge.py) adds the
request's `X-Request-Id` to every answer on its way out; the connection-level refusals of app/http_limits.py,
which come before any request exists, get a fresh id from here.

An error after a streaming answer's headers is the stream's last event instead (`GatewayError.body()`,
app/proxy/handler.py and relay.py): the status line is already out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from app.errors import GatewayError, InvalidRequest, internal_error


@dataclass(frozen=True)
class RenderedError:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RoutingError(InvalidRequest):
    """starlette's HTTPException: no such route (404), a method the route does not take (405)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None) -> None:
        super().__init__(message)
        self.status_code = status
        self.error_type = "not_found_error" if status == 404 else "invalid_request_error"
        self._headers = dict(headers or {})  # 405's Allow

    def headers(self) -> dict[str, str]:
        return self._headers


def as_gateway_error(error: BaseException, method: str, path: str) -> GatewayError:
    """Any exception as the GatewayError the client is answered with."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, HTTPException):
        return RoutingError(error.status_code, f"{method} {path}: {error.detail}", error.headers)
    if isinstance(error, RequestValidationError):
        return InvalidRequest(str(error))
    return internal_error(error)


def render_error(error: GatewayError, request_id: bytes | None = None) -> RenderedError:
    """Status, headers and OpenAI-shaped body of the answer to `error`."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers().items()]
    if request_id is not None:
        headers.append((b"x-request-id", request_id))
    return RenderedError(error.status_code, headers, body)


async def send_error(send: Send, error: GatewayError) -> None:
    """The answer to `error`, as ASGI messages (the edge adds the request id)."""
    rendered = render_error(error)
    await send({"type": "http.response.start", "status": rendered.status, "headers": rendered.headers})
    await send({"type": "http.response.body", "body": rendered.body})


def error_response(error: GatewayError) -> Response:
    """The answer to `error` as a starlette Response, for FastAPI's exception handlers."""
    rendered = render_error(error)
    response = Response(rendered.body, status_code=rendered.status)
    response.raw_headers = rendered.headers
    return response
