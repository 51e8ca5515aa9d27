"""A minimal HTTP/1.0 client for the gateway -> backend hop, on plain asyncio streams.

The backends (mlx_lm.server, the launcher, the fake backend) speak HTTP/1.0 on loopback: one request per
connection, and a response body that ends when the socket closes. A general client (httpx: a connection
pool, h11, anyio streams, headers and body in separate writes) cost about a quarter of the gateway's CPU
per request in `specgate bench overhead` profiles; this one writes the request in one call and hands the
body over as it arrives, in whatever pieces the socket gives, so the relay can batch what came together.

Chunked responses and `Content-Length` are honoured too, should a backend program send them.
Transport failures (`TRANSPORT_FAILURES`) raise `UpstreamError` (`HeadTimeout` when the status line is too
late); the relay turns that into a gateway error through the one table in app/errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from app.backends.connections import READ_SIZE, Connection, Heartbeat, open_connection
from app.errors import TRANSPORT_FAILURES, UpstreamError


class HeadTimeout(UpstreamError):
    """The backend took the request but sent no status line in the time it was given."""


class _Dechunker:
    """Incremental `Transfer-Encoding: chunked` decoder."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data_left = 0  # bytes of the current chunk still to come
        self._crlf_left = 0  # bytes of the CRLF after a chunk still to skip
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while not self.finished:
            if self._data_left:
                take = self._buffer[: self._data_left]
                out += take
                self._buffer = self._buffer[len(take) :]
                self._data_left -= len(take)
                if self._data_left:
                    break
                self._crlf_left = 2
            if self._crlf_left:
                skip = min(self._crlf_left, len(self._buffer))
                self._buffer = self._buffer[skip:]
                self._crlf_left -= skip
                if self._crlf_left:
                    break
            end = self._buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self._buffer[:end].split(b";")[0].strip() or b"0", 16)
            self._buffer = self._buffer[end + 2 :]
            if size == 0:
                self.finished = True
            self._data_left = size
        return bytes(out)


class UpstreamResponse:
    """An open response: status and headers read, the body still on the socket."""

    def __init__(
        self,
        status_code: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self._reader = reader
        self._writer = writer
        self._heartbeat = heartbeat
        self._dechunker = _Dechunker() if "chunked" in headers.get("transfer-encoding", "").lower() else None
        length = headers.get("content-length", "")
        self._left: int | None = int(length) if length.isdigit() and self._dechunker is None else None

    async def read_some(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        while True:
            if self._left == 0 or (self._dechunker is not None and self._dechunker.finished):
                return b""
            size = READ_SIZE if self._left is None else min(READ_SIZE, self._left)
            try:
                data = await self._reader.read(size)
            except TRANSPORT_FAILURES as error:
                raise UpstreamError(f"{type(error).__name__}: {error}") from error
            if not data:
                if self._left or (self._dechunker is not None and not self._dechunker.finished):
                    raise UpstreamError("the backend closed the connection before the end of the body")
                return b""
            if self._heartbeat is not None:
                self._heartbeat.last = time.monotonic()
            if self._left is not None:
                self._left -= len(data)
            if self._dechunker is None:
                return data
            decoded = self._dechunker.feed(data)
            if decoded:
                return decoded

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while data := await self.read_some():
            yield data

    async def aread(self) -> bytes:
        parts = [data async for data in self.aiter_raw()]
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close the socket: for a generating backend, this is what stops the work."""
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


def _request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise UpstreamError(f"the backend sent an invalid status line: {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def post(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    connect_timeout: float = 10.0,
    write_timeout: float = 30.0,
    connect: Callable[[], Awaitable[Connection]] | None = None,
    head_patience: Callable[[], float] | None = None,
    heartbeat: Heartbeat | None = None,
) -> UpstreamResponse:
    """Send one POST and return once the status line and headers are in (the backend's first byte).

    `connect` supplies the connection (a backend's Preconnected.take); without it, a fresh one.
    `head_patience` bounds the wait for the status line: it returns the seconds still allowed, and is asked
    again each time that much has passed (so the caller can extend the wait while the backend is busy with
    others); at 0 or below, HeadTimeout. Without it the wait is unbounded. `heartbeat` is stamped when the
    head and each later piece of the body arrive.
    """
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await (connect() if connect is not None else open_connection(host, port))
    except TRANSPORT_FAILURES as error:
        raise UpstreamError(f"{type(error).__name__}: {error}") from error
    try:
        writer.write(_request_bytes(host, port, path, headers, body))
        async with asyncio.timeout(write_timeout):
            await writer.drain()
        head = await _read_head(reader, head_patience)
        status, response_headers = _parse_head(head[:-4])
    except BaseException as error:
        writer.close()
        if isinstance(error, TRANSPORT_FAILURES):
            raise UpstreamError(f"{type(error).__name__}: {error}") from error
        raise
    if heartbeat is not None:
        heartbeat.beat()
    return UpstreamResponse(status, response_headers, reader, writer, heartbeat)


async def _read_head(reader: asyncio.StreamReader, patience: Callable[[], float] | None) -> bytes:
    if patience is None:
        return await reader.readuntil(b"\r\n\r\n")
    while (allowed := patience()) > 0:
        try:
            async with asyncio.timeout(allowed):
                # A cancelled readuntil consumes nothing: a head that is half in stays in the buffer.
                return await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            continue
    raise HeadTimeout("no status line from the backend in the time allowed")
