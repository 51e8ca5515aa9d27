"""The connections to a backend: a fresh one, or the spare `Preconnected` keeps open ahead of the next request;
and the backend's `Heartbeat`, when any of them last brought a byte.

The backend owns its `Preconnected` (app/backends/process.py opens it when the process is ready and closes it
when it stops); the request's HTTP exchange on a connection is app/proxy/upstream.py's.

`BackendEndpoint` is all the proxy may use of a backend while it talks to it (app/proxy/relay.py types its
backend with it, so mypy holds the relay to it); app/backends/process.py's `Backend` implements it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

READ_SIZE = 65536
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Heartbeat:
    """When a backend last sent a byte on any of its connections (monotonic seconds).

    One per backend process, shared by its requests (app/proxy/upstream.py stamps it on every read): a
    request still waiting for its status line can tell a backend that is busy answering others (it waits
    on) from one that has gone silent (hung).
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()


async def open_connection(host: str, port: int) -> Connection:
    """A fresh connection to a backend, read in pieces of up to READ_SIZE."""
    return await asyncio.open_connection(host, port, limit=READ_SIZE)


class Preconnected:
    """Keeps one connection to a backend open ahead of the request that will use it.

    Why: the backends are HTTP/1.0 servers that accept a connection and start a thread for it before they
    read a byte, and a request can use a connection only once. Opening the next request's connection
    while the current one runs takes the connect, the accept and the thread start off the next request's
    path (the bench's figures: `specgate bench overhead`, docs/benchmarks.md). A spare that the backend
    closed meanwhile is seen at its EOF and replaced by a fresh connect; the backend's owner closes this
    when it stops the process, so no spare outlives its backend.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._spare: asyncio.Task[Connection] | None = None
        self._closed = False

    async def _connect(self) -> Connection:
        return await open_connection(self.host, self.port)

    def _refill(self) -> None:
        if self._closed:
            return
        spare = asyncio.get_running_loop().create_task(self._connect())
        # A spare that fails to connect (the backend went away) is only dropped: retrieve its error.
        spare.add_done_callback(lambda task: task.cancelled() or task.exception())
        self._spare = spare

    @staticmethod
    def _alive(spare: asyncio.Task[Connection]) -> Connection | None:
        if spare.cancelled() or spare.exception() is not None:
            return None
        reader, writer = spare.result()
        if writer.is_closing() or reader.at_eof():
            writer.close()
            return None
        return reader, writer

    async def take(self) -> Connection:
        """The spare connection when it is open and alive, else a fresh one; a new spare follows."""
        spare = self._spare
        if spare is None:
            self._refill()
        elif spare.done():
            self._spare = None
            self._refill()
            connection = self._alive(spare)
            if connection is not None:
                return connection
        # A spare still connecting stays for the next request; this one connects on its own.
        return await self._connect()

    def close(self) -> None:
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is None:
            return
        if not spare.done():
            spare.cancel()
        elif (connection := self._alive(spare)) is not None:
            connection[1].close()


class BackendEndpoint(Protocol):
    """What the proxy uses of a backend to send it a request and read the answer."""

    @property
    def name(self) -> str:
        """For messages and logs."""
        ...

    @property
    def address(self) -> tuple[str, int]:
        """Host and port the backend listens on."""
        ...

    @property
    def heartbeat(self) -> Heartbeat:
        """Stamped by every read from this backend; tells a busy backend from a hung one."""
        ...

    async def connect(self) -> Connection:
        """A connection for one request (the spare opened ahead when there is one)."""
        ...

    def note_broken(self, reason: str) -> None:
        """A request saw the backend fail in a way that needs a restart (hung, generation thread died)."""
        ...
