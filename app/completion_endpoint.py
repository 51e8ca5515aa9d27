"""The entry of the two completion endpoints, `POST /v1/chat/completions` and `POST /v1/completions`: plain
ASGI, between the edge (app/edge.py) and FastAPI, and the only code that serves them.

Why not a FastAPI route: `specgate bench overhead` showed the gateway's own request path (app/proxy) as a
few percent of its CPU and starlette's per-request and per-chunk layers as most of the rest: the error
middleware's and the exception middleware's `send` wrappers, the router, FastAPI's endpoint wrapper, and
StreamingResponse's anyio task group (uvicorn speaks ASGI 2.3, so starlette listens for the disconnect in
a task group per stream). A token streams through every one of those `send` layers.

What the client sees is what a FastAPI route would give: the same API-key check and 401 (app/auth.py's
middleware, reused), the same OpenAI-shaped errors (app/error_response.py renders every error; a bug is the
edge's 500), CORS from the edge, and a client that leaves cancels its request (a watcher on `receive` cancels
the stream, which closes the upstream socket and stops the backend). The routes in app/routes.py describe
these endpoints for OpenAPI (`/openapi.json`, `/docs`) and are never reached. Every other request goes on
to the FastAPI app.

A streaming response's status line and headers go out as soon as the handler returns it, which it does
once the request is admitted: the wait for a slot, the backend and the first token happens inside its
body, with SSE comments meanwhile (app/proxy/handler.py). The disconnect watcher covers that wait too.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import ApiKeyMiddleware, send_refusal
from app.error_response import send_error
from app.errors import GatewayError
from app.proxy.handler import CompletionHandler
from app.proxy.rewrite import Kind

_KINDS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class CompletionEndpoint:
    """Inside the edge, in front of FastAPI: completion POSTs go straight to the handler, the rest to `app`."""

    def __init__(self, app: ASGIApp, handler: CompletionHandler, keys: ApiKeyMiddleware) -> None:
        self.app = app
        self.handler = handler
        # The key check of the regular stack, reused (it holds the live key list that SIGHUP rotates).
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _KINDS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        reason = self.keys.refusal(scope)
        if reason is not None:
            await send_refusal(scope, send, reason)
            return
        async with contextlib.AsyncExitStack() as request_held:
            try:
                # The handler's context holds the request's slot and upstream socket until the response is sent.
                response = await request_held.enter_async_context(self.handler.handle(Request(scope, receive), kind))
            except GatewayError as error:
                await send_error(send, error)
                return
            if isinstance(response, StreamingResponse):
                await _stream(response, receive, send)
            else:
                await response(scope, receive, send)


async def _stream(response: StreamingResponse, receive: Receive, send: Send) -> None:
    """Send a streaming response chunk by chunk; a client that leaves cancels the stream at once.

    One watcher task reads `receive` for the disconnect (the only message left once the body is read);
    when it comes, the stream task is cancelled, as under starlette's task group. What the request holds
    (its slot, its upstream socket: closing it is what stops mlx_lm.server) is released by the handler's
    context around this call, whether or not the body ever started.
    """
    stream_task = asyncio.current_task()
    assert stream_task is not None
    client_gone = False

    async def watch() -> None:
        nonlocal client_gone
        message: Message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()
        client_gone = True
        stream_task.cancel()

    watcher = asyncio.create_task(watch())
    body = response.body_iterator
    try:
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        async for chunk in body:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # The end goes after the handler's bookkeeping (log line, metrics), so a client that has read the
        # whole response finds the request in /metrics. (Ending the response with the `[DONE]` write
        # saved a write per request but broke that order; tests scrape right after a response.)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not client_gone:
            raise
        stream_task.uncancel()  # our own cancellation: the client left; nothing to answer
    except OSError:
        pass  # the socket broke under a write: the client left
    finally:
        watcher.cancel()
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
