"""A bound on every send to a client: one that stops reading, but stays connected, is cut off.

Why: uvicorn's `send` waits, by flow control, while the connection's write buffer is over its high-water
mark, that is for as long as the client reads nothing once the kernel's buffers are full. A streaming client
that stops reading would hold its request's backend slot, and the backend's work, forever, and requests
queued behind it would wait forever too (issue 19 item 7). Here each send may wait at most `timeout` seconds;
then the connection is aborted (a reset, not a graceful close, which would wait for the same buffer to drain).
uvicorn reports that to the app as a disconnect, so the request ends the way it ends for a client that left:
the upstream socket closes (which stops mlx_lm.server), the slot goes to the next request, and the record's
outcome is `client_gone`.

The timer costs about as much as the rest of a streamed chunk's path, so it is armed only when a send can
wait: uvicorn waits only while its flow control says writing is paused, and writes at once otherwise. That
state, and the transport to abort, are read from uvicorn's request cycle (the bound `send` method); with any
other server every send is bounded, and a send that times out raises `ClientStalled` (an OSError, what a
broken socket raises) instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logging_setup import current_request_id

logger = logging.getLogger("specgate")


class ClientStalled(ConnectionError):
    """A send to the client waited longer than the write timeout (the client stopped reading)."""


class ClientWriteTimeout:
    """Outermost ASGI layer: every `http.response.*` send waits at most `timeout` seconds."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _BoundedSend(send, self.timeout))


class _BoundedSend:
    """`send` with a time limit; after it expired once, what is left to send goes nowhere."""

    __slots__ = ("_flow", "_send", "_stalled", "_timeout", "_transport")

    def __init__(self, send: Send, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._stalled = False
        cycle = getattr(send, "__self__", None)  # uvicorn's RequestResponseCycle (httptools and h11 alike)
        flow: Any = getattr(cycle, "flow", None)
        transport: Any = getattr(cycle, "transport", None)
        usable = hasattr(flow, "write_paused") and hasattr(transport, "abort")
        self._flow = flow if usable else None
        self._transport = transport if usable else None

    async def __call__(self, message: Message) -> None:
        if self._stalled:
            return
        if self._flow is not None and not self._flow.write_paused:
            await self._send(message)  # uvicorn writes at once: nothing to wait for, no timer
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._send(message)
        except TimeoutError:
            self._stalled = True
            logger.warning(
                "request %s: the client read nothing for %.0fs; closing its connection",
                current_request_id.get() or "-",
                self._timeout,
            )
            if self._transport is None:
                raise ClientStalled(f"the client read nothing for {self._timeout:.0f}s") from None
            self._transport.abort()  # uvicorn sees the connection lost: a disconnect for the app
