"""A bare TCP relay: the cheapest proxy hop there is, as the floor for `specgate bench overhead`.

Any gateway puts one more hop between a client and a backend: a second connection, and for every
chunk the backend writes, one more read, one more write and one more process to wake. On a machine
where the backend is CPU-bound (mlx on a CPU) that work competes with the model for the same cores,
so even a proxy that does nothing costs throughput. This relay does nothing: it copies bytes both ways
(asyncio protocols on uvloop, no parsing, no task per chunk). Measured in the same run as the direct
path and the gateway, it separates what the hop costs on this machine from what the gateway's own
work costs.

Run: `python -m app.bench.tcp_relay LISTEN_PORT UPSTREAM_PORT` (loopback on both sides).
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast


class _UpstreamSide(asyncio.Protocol):
    """The connection to the backend: what it sends goes to the client as it arrives."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _ClientSide(asyncio.Protocol):
    """The client's connection: opens one to the backend and forwards the request bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        # Bytes that arrive before the backend connection is open.
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        asyncio.get_running_loop().create_task(self._connect(cast(asyncio.Transport, transport)))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _UpstreamSide(client), "127.0.0.1", self.upstream_port)
        except OSError:
            client.close()
            return
        self.upstream = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream_port), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(part.isdigit() for part in argv):
        print("usage: python -m app.bench.tcp_relay LISTEN_PORT UPSTREAM_PORT", file=sys.stderr)
        return 2
    try:  # the gateway's own loop where it has one (uvicorn picks uvloop up the same way)
        import uvloop
    except ImportError:
        asyncio.run(serve(int(argv[0]), int(argv[1])))
    else:
        uvloop.run(serve(int(argv[0]), int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
