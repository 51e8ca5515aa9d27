"""Whether the client of a request is still connected, asked from any thread without blocking.

The gateway sends one request per connection and then only reads (it never half-closes), so the
request's socket turning readable means the client has gone: end of file when it closed, an error when
the kernel reset the connection (closed with unread data). The HTTP handler thread owns the socket and
closes it after its handler returns; `release` (called by the handler before that) makes every later
question answer "gone" without touching a socket that may be closed, or its number reused.
"""

from __future__ import annotations

import select
import socket
import threading


class ClientWatch:
    """One request's connection, watched for its client leaving."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._released = False

    def gone(self) -> bool:
        """True once the client closed or reset the connection, or the handler let go of it."""
        with self._lock:
            if self._released:
                return True
            try:
                return _peer_closed(self._connection)
            except (OSError, ValueError):  # ValueError: the socket object was closed under us
                return True

    def release(self) -> None:
        """The handler is done with the connection; call before it is closed."""
        with self._lock:
            self._released = True


def _peer_closed(connection: socket.socket) -> bool:
    if not _readable(connection):
        return False
    try:
        # Readable: peek whether it is end of file (b""), without consuming what may be there.
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def _readable(connection: socket.socket) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([connection], [], [], 0)
    return bool(readable)
