"""A minimal asyncio HTTP client for streamed POSTs, for the overhead measurement.

The overhead run compares two paths that differ by a fraction of a millisecond, on a machine whose CPUs
the client shares with the gateway and the backend. A full client library spends more CPU per request
than the difference being measured; this one does only what timing needs: one connection per request
(`Connection: close`, as mlx_lm.server's HTTP/1.0 forces on the direct path anyway), the arrival of the
first SSE `data:` event, the arrival of `[DONE]`, and the usage chunk's token count.
It decodes no SSE events (app/bench/client.py does, with httpx-sse): it notes when the bytes `data:` and
`[DONE]` arrive, and reads the token count from the body once it is complete.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


@dataclass(frozen=True)
class Timing:
    """One request: seconds from sending to the first `data:` event and to `[DONE]`."""

    status: int
    ttft: float | None
    e2e: float
    tokens: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    @property
    def throughput(self) -> float | None:
        """Tokens per second of the whole request, first token's wait included."""
        return self.tokens / self.e2e if self.ok and self.e2e > 0 and self.tokens else None

    @property
    def decode_rate(self) -> float | None:
        """Tokens per second after the first one arrived: the stream's own pace."""
        if not self.ok or self.ttft is None or self.tokens < 2 or self.e2e <= self.ttft:
            return None
        return (self.tokens - 1) / (self.e2e - self.ttft)


def _dechunk(raw: bytes) -> bytes:
    """Undo `Transfer-Encoding: chunked` (uvicorn streams that way; the backend does not)."""
    out = bytearray()
    position = 0
    while position < len(raw):
        end = raw.find(b"\r\n", position)
        if end < 0:
            break
        size = int(raw[position:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += raw[end + 2 : end + 2 + size]
        position = end + 2 + size + 2
    return bytes(out)


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


async def post_stream(host: str, port: int, path: str, body: bytes, limit: float = 60.0) -> Timing:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            return await _exchange(host, port, request_bytes(host, port, path, body), started)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
        return Timing(0, None, time.perf_counter() - started, 0, f"{type(error).__name__}: {error}")


async def _exchange(host: str, port: int, request: bytes, started: float) -> Timing:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        first: float | None = None
        done: float | None = None
        received = bytearray()
        while chunk := await reader.read(65536):
            received += chunk
            now = time.perf_counter()
            if first is None and b"data:" in received:
                first = now
            if done is None and b"[DONE]" in chunk:
                done = now
        ended = done if done is not None else time.perf_counter()
    finally:
        writer.close()
    body = _dechunk(bytes(received)) if b"chunked" in head.lower() else bytes(received)
    match = _COMPLETION_TOKENS.search(body)
    tokens = int(match.group(1)) if match else 0
    error = None if status == 200 and done is not None else f"HTTP {status}, [DONE] {'seen' if done else 'missing'}"
    return Timing(status, None if first is None else first - started, ended - started, tokens, error)
