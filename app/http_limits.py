"""Limits on how a request arrives: the size of its head (request line and headers), and the time its head
and its body may take; and on how its answer leaves: the time a client may go without reading.

uvicorn's httptools protocol has none of them: httptools buffers a header until its end, however long, and
a connection that sends nothing, or a byte now and then, is kept forever (uvicorn's keep-alive timeout only
runs between requests). Two connections sending 256 MiB headers took the gateway from 61 to 664 MB
(issue 19 item 8), and a body trickling in held its connection and up to `SPECGATE_MAX_BODY_BYTES` of
memory for as long as its client liked. This subclass of uvicorn's protocol adds:

- head size: the request line and headers of one request may hold `max_bytes`; beyond it the gateway
  answers 431 and closes the connection. A head still arriving is cut off once it passes the limit
  (httptools then holds at most the limit plus one socket read); a complete one is measured exactly.
- head time: from the connection's start, or a request's first byte, the head must be complete within
  `timeout` seconds; else 408 (nothing when no byte came) and the connection is closed.
- body time: from the end of the head, the body must be complete within `body_timeout` seconds; else 408
  (if no answer has started) and the connection is closed; the request sees its client leave.
- write time: the transport pauses writing (uvicorn's `send` then waits, by flow control) while the
  connection's write buffer is over its high-water mark, that is while the client reads nothing once the
  kernel's buffers are full. Paused for `write_timeout` seconds, the connection is aborted (a reset: a
  graceful close would wait for the same buffer to drain). A streaming client that stopped reading but
  stayed connected would otherwise hold its request's backend slot, and the backend's work, forever, and
  the requests queued behind it too (issue 19 item 7); now its request ends as for a client that left (the
  app sees a disconnect: the upstream closes, which stops the backend, and the slot goes to the next one).
  A timer runs only while writing is paused: nothing per chunk.

The body's size is `SPECGATE_MAX_BODY_BYTES`'s concern (app/proxy/handler.py).
"""

from __future__ import annotations

import asyncio
import http
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.error_response import render_error
from app.errors import InvalidRequest
from app.request_id import new_request_id

logger = logging.getLogger("specgate.http")


class ConnectionRefusal(InvalidRequest):
    """431 or 408: the head or the body broke a limit; the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, code=http.HTTPStatus(status).name.lower())
        self.status_code = status

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


def _refusal(error: ConnectionRefusal, request_id: bytes) -> bytes:
    """The whole answer as bytes: it is written to the transport, before (or instead of) any ASGI request."""
    rendered = render_error(error, request_id)
    head = f"HTTP/1.1 {rendered.status} {http.HTTPStatus(rendered.status).phrase}\r\n".encode("latin-1")
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in rendered.headers) + b"\r\n" + rendered.body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded heads and bodies; `limited_protocol` sets the limits."""

    max_bytes = 64 * 1024
    timeout = 30.0
    body_timeout = 120.0
    write_timeout = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refused = False
        self._in_head = False
        self._head_bytes = 0  # of the current head: request line and complete headers
        self._head_raw = 0  # bytes fed to the parser since the current head began (a header may be incomplete)
        self._began = 0  # heads begun on this connection
        self._bytes_seen = False
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.timeout, self._head_too_slow)
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        self._stop_write_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout, self._write_too_slow)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_write_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._bytes_seen = True
        began = self._began
        super().data_received(data)
        # Bytes of a read in which the head began may belong to the request before it (pipelining): only
        # later reads count, so a head is cut off at the limit plus one read at most, and never too early.
        if self._in_head and not self._refused and self._began == began:
            self._head_raw += len(data)
            if self._head_raw > self.max_bytes:
                self._refuse(431, f"the request's headers are over the limit of {self.max_bytes} bytes")

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        self._in_head = True
        self._began += 1
        self._head_bytes = self._head_raw = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeout, self._head_too_slow)

    def on_url(self, url: bytes) -> None:
        if self._refused:
            return
        super().on_url(url)
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        super().on_header(name, value)
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._stop_head_timer()
        if self._head_bytes > self.max_bytes:
            self._refuse(
                431, f"the request's headers ({self._head_bytes} bytes) are over the limit of {self.max_bytes}"
            )
            return
        super().on_headers_complete()
        # Stopped by on_message_complete, at once for a request without a body (in this same read). Not for
        # a pipelined request, queued behind one still answered: uvicorn stops reading until its turn.
        if not self.pipeline and not self.parser.should_upgrade():
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_body_timer()
        if not self._refused:
            super().on_message_complete()

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._refused or self.transport.is_closing():
            return
        if self._in_head or (self._began == 0 and self._bytes_seen):
            self._refuse(408, f"the request's headers did not arrive within {self.timeout:g} seconds")
        elif self._began == 0:
            self._refused = True
            self.transport.close()  # a connection that never sent a byte: nobody to answer

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self._refused or self.transport.is_closing():
            return
        message = f"the request's body did not arrive within {self.body_timeout:g} seconds"
        if self.cycle is not None and not self.cycle.response_started:
            self._refuse(408, message)
        else:
            self._refused = True
            logger.info("closed a connection: %s", message)
            self.transport.close()

    def _write_too_slow(self) -> None:
        self._write_timer = None
        logger.warning(
            "closed a connection: the client read nothing for %gs (request %s)",
            self.write_timeout,
            self._request_id() or "-",
        )
        self._refused = True
        self.transport.abort()  # the app's pending send returns and it sees the client gone

    def _request_id(self) -> str | None:
        """The X-Request-Id the client sent, if any (the edge decides the id in its own copy of the scope)."""
        if self.cycle is None:
            return None
        for name, value in self.cycle.scope["headers"]:
            if name == b"x-request-id":
                return value.decode("latin-1")[:128]
        return None

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._stop_head_timer()
        request_id = new_request_id()
        logger.info("closed a connection (%s): %s", request_id.decode("ascii"), message)
        if not self.transport.is_closing():
            self.transport.write(_refusal(ConnectionRefusal(status, message), request_id))
            self.transport.close()


def limited_protocol(
    max_bytes: int, timeout: float, body_timeout: float, write_timeout: float = LimitedHttpToolsProtocol.write_timeout
) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these limits."""

    class Configured(LimitedHttpToolsProtocol):
        pass

    Configured.max_bytes = max_bytes
    Configured.timeout = timeout
    Configured.body_timeout = body_timeout
    Configured.write_timeout = write_timeout
    return Configured
