"""A request's id: the client's `X-Request-Id` when it is sane (logs then line up across systems), else a new one.

Decided once per request, by the edge (app/edge.py); the connection-level refusals of app/http_limits.py,
which come before a request exists, take a new one for their answer and log line.
"""

from __future__ import annotations

import re
import uuid

from starlette.types import Scope

REQUEST_ID_HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> bytes:
    return f"sg-{uuid.uuid4().hex[:20]}".encode("ascii")


def decide_request_id(scope: Scope) -> bytes:
    """The client's X-Request-Id when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _SANE.match(value):
                return bytes(value)
            break
    return new_request_id()


def with_request_id(scope: Scope, request_id: bytes) -> Scope:
    """`scope` whose only X-Request-Id header is `request_id`."""
    headers = [(name, value) for name, value in scope["headers"] if name != REQUEST_ID_HEADER]
    return {**scope, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}
