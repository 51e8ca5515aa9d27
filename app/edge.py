"""The outermost ASGI layer: the first and last code of every HTTP request, whatever path it takes.

    Edge -> CompletionFastPath (app/fastpath.py) -> FastAPI: ServerErrorMiddleware -> CORS -> keys -> routes

Here, once per request:
- the request id is decided: the client's `X-Request-Id` when it is sane, else a new `sg-...`. The request's
  headers then hold exactly that one id (the completion handler reads it there and sends it to the
  backend), `current_request_id` holds it for every log line, and every response carries it;
- what a web page could send is refused (app/browser_guard.py: foreign Host names, non-JSON POST bodies);
- an exception that escapes everything inside is logged once, with the id, and answered 500 in the OpenAI
  shape if nothing was sent yet. (starlette's ServerErrorMiddleware sits inside FastAPI, so before this
  layer a 500 from a FastAPI route came back without `X-Request-Id`, and its log line without the id.)
"""

from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.browser_guard import BrowserGuard
from app.errors import GatewayError
from app.logging_setup import current_request_id

logger = logging.getLogger("specgate")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
REQUEST_ID_HEADER = b"x-request-id"


def decide_request_id(scope: Scope) -> bytes:
    """The client's X-Request-Id when it is sane (logs then line up across systems), else a new one."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _REQUEST_ID.match(value):
                return bytes(value)
            break
    return f"sg-{uuid.uuid4().hex[:20]}".encode("ascii")


def with_request_id(scope: Scope, request_id: bytes) -> Scope:
    """`scope` whose only X-Request-Id header is `request_id`."""
    headers = [(name, value) for name, value in scope["headers"] if name != REQUEST_ID_HEADER]
    return {**scope, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}


async def send_error(send: Send, error: GatewayError) -> None:
    """A complete OpenAI-shaped error response."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Edge:
    """Request id, browser guard and last-resort errors around the whole app (pure ASGI: a streaming body's
    generator runs inside this call, so the id's context covers it too)."""

    def __init__(self, app: ASGIApp, guard: BrowserGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        request_id = decide_request_id(scope)
        scope = with_request_id(scope, request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                headers = [item for item in message.get("headers", []) if item[0].lower() != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id)]}
            await send(message)

        token = current_request_id.set(request_id.decode("ascii"))
        try:
            refusal = self.guard.refusal(scope)
            if refusal is not None:
                logger.warning("refused %s %s: %s", scope["method"], scope["path"], refusal.message)
                await send_error(send_with_id, refusal)
                return
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not started:
                await send_error(send_with_id, GatewayError(f"internal error: {type(error).__name__}"))
            # Once the status line is out there is no way to say it failed but to end the connection
            # unfinished, which uvicorn does when the app returns without completing the response.
        finally:
            current_request_id.reset(token)
