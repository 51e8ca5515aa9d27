"""The gateway's spare backend connection (app/backends/connections.py Preconnected), on a real loopback server.

What must hold: a request gets a connection the server has already accepted whenever one is ready, a
spare the server closed is never handed out (a restarted backend), and closing leaves no socket open.
"""

from __future__ import annotations

import asyncio

from app.backends.connections import Preconnected


class Server:
    """A loopback TCP server that records its connections and answers each line with a line."""

    def __init__(self) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(writer)
        line = await reader.readline()
        if line:
            writer.write(b"echo " + line)
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        # Handlers still waiting on a spare would be cancelled with their sockets open.
        for writer in self.accepted:
            writer.close()
        await asyncio.sleep(0.01)


async def _exchange(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], text: bytes) -> bytes:
    reader, writer = connection
    writer.write(text + b"\n")
    answer = await reader.readline()
    writer.close()
    return answer


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


async def _served_once() -> tuple[Server, Preconnected]:
    """A server, and connections to it whose first request is done and whose spare is open."""
    server = Server()
    connections = Preconnected("127.0.0.1", await server.start())
    assert await _exchange(await connections.take(), b"one") == b"echo one\n"
    await _settle()
    return server, connections


def test_spare_is_opened_ahead_and_used_by_the_next_request() -> None:
    async def scenario() -> None:
        server = Server()
        port = await server.start()
        connections = Preconnected("127.0.0.1", port)
        first = await connections.take()
        await _settle()
        # The first request connected on its own and a spare followed it.
        assert len(server.accepted) == 2
        assert await _exchange(first, b"one") == b"echo one\n"
        second = await connections.take()
        # The second request took the spare: the server accepted nothing for it; a new spare follows.
        await _settle()
        assert len(server.accepted) == 3
        assert await _exchange(second, b"two") == b"echo two\n"
        connections.close()
        await server.stop()

    asyncio.run(scenario())


def test_a_spare_the_server_closed_is_replaced_by_a_fresh_connection() -> None:
    async def scenario() -> None:
        server, connections = await _served_once()
        # The backend closes the idle spare (a restart would): the next request must not get it.
        spare_side = server.accepted[-1]
        spare_side.close()
        await _settle()
        answer = await _exchange(await connections.take(), b"two")
        assert answer == b"echo two\n"
        connections.close()
        await server.stop()

    asyncio.run(scenario())


def test_a_spare_still_connecting_stays_for_the_next_request() -> None:
    async def scenario() -> None:
        server = Server()
        port = await server.start()
        connections = Preconnected("127.0.0.1", port)
        # Two requests at once. The first starts the spare and connects on its own; the second finds the
        # spare still connecting (its task has not run yet) and connects on its own too.
        first_take = asyncio.ensure_future(connections.take())
        await asyncio.sleep(0)
        spare_task = connections._spare
        assert spare_task is not None
        assert not spare_task.done()
        second = await connections.take()
        first = await first_take
        await _settle()
        # Two request connections and that same spare, which neither request took.
        assert connections._spare is spare_task
        assert len(server.accepted) == 3
        spare_writer = spare_task.result()[1]
        assert spare_writer not in (first[1], second[1])
        assert await _exchange(first, b"a") == b"echo a\n"
        assert await _exchange(second, b"b") == b"echo b\n"
        # The next request is served on that spare; the server accepted only the spare's replacement.
        third = await connections.take()
        assert third[1] is spare_writer
        assert await _exchange(third, b"c") == b"echo c\n"
        await _settle()
        assert len(server.accepted) == 4
        connections.close()
        await server.stop()

    asyncio.run(scenario())


def test_close_closes_the_spare_and_stops_refilling() -> None:
    async def scenario() -> None:
        server, connections = await _served_once()
        accepted = len(server.accepted)
        connections.close()
        await _settle()
        # The server saw the spare close (its handler read EOF and ended) and no new spare came.
        assert server.accepted[-1].is_closing()
        # A take after close still serves the request, but opens no spare behind it.
        await _exchange(await connections.take(), b"two")
        await _settle()
        assert len(server.accepted) == accepted + 1
        await server.stop()

    asyncio.run(scenario())


def test_a_backend_that_is_gone_fails_the_take_and_the_spare_error_is_kept_quiet() -> None:
    async def scenario() -> None:
        server, connections = await _served_once()
        for writer in server.accepted:
            writer.close()
        await server.stop()
        await _settle()
        try:
            await connections.take()
        except OSError:
            pass
        else:
            raise AssertionError("a take with no server listening must fail")
        await _settle()
        connections.close()

    asyncio.run(scenario())
