"""The outermost ASGI layer: the first and last code of every HTTP request, whatever path it takes.

    Edge: request id, browser guard, last-resort 500, CORS (when configured)
      -> CompletionEndpoint (app/completion_endpoint.py): POST /v1/chat/completions and /v1/completions
      -> FastAPI, every other route: ServerErrorMiddleware -> keys (app/auth.py) -> routes

Here, once per request:
- the request id is decided (app/request_id.py): the client's `X-Request-Id` when it is sane, else a new
  `sg-...`. The request's headers then hold exactly that one id (the completion handler reads it there and
  sends it to the backend), `current_request_id` holds it for every log line, and every response carries it;
- what a web page could send is refused (app/browser_guard.py: foreign Host names, non-JSON POST bodies);
- CORS, when `SPECGATE_CORS_ORIGINS` names origins: starlette's CORSMiddleware, around both the completion
  endpoint and FastAPI, so every route answers preflights and carries the headers the same way. It sits
  outside the key check: a browser's preflight carries no Authorization header. A request without an
  `Origin` header (every non-browser client) passes through it untouched;
- an exception that escapes everything inside is logged once, with the id, and answered 500 in the OpenAI
  shape if nothing was sent yet (app/error_response.py renders every error answer). starlette's
  ServerErrorMiddleware sits inside FastAPI, so without this layer a 500 from a FastAPI route came back
  without `X-Request-Id`, and its log line without the id.
"""

from __future__ import annotations

import logging

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.browser_guard import BrowserGuard
from app.error_response import send_error
from app.errors import internal_error
from app.logging_setup import current_request_id
from app.request_id import REQUEST_ID_HEADER, decide_request_id, with_request_id

logger = logging.getLogger("specgate")


def with_cors(app: ASGIApp, origins: list[str]) -> ASGIApp:
    """`app` answering CORS for `origins` (none: no CORS at all, a browser's cross-origin request is refused)."""
    if not origins:
        return app
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["authorization", "content-type", "x-request-id"],
        expose_headers=["x-request-id", "retry-after"],
    )


class Edge:
    """Request id, browser guard, CORS and last-resort errors around the whole app (pure ASGI: a streaming
    body's generator runs inside this call, so the id's context covers it too)."""

    def __init__(self, app: ASGIApp, guard: BrowserGuard, cors_origins: list[str]) -> None:
        self.app = app
        self.guard = guard
        self.inner = with_cors(app, cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)  # lifespan
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
            await self.inner(scope, receive, send_with_id)
        except Exception as error:
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            if not started:
                await send_error(send_with_id, internal_error(error))
            # Once the status line is out there is no way to say it failed but to end the connection
            # unfinished, which uvicorn does when the app returns without completing the response.
        finally:
            current_request_id.reset(token)
