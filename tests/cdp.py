"""Headless Chromium driven over the Chrome DevTools Protocol, with a small stdlib WebSocket client.

No browser-automation package works offline here (Playwright for Python downloads its own browser), and
`--dump-dom` cannot tell whether the page logged an error. CDP over one WebSocket can: the page's console
calls, uncaught exceptions and failed loads arrive as events, and `Runtime.evaluate` reads the live DOM.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The flags this machine's Chromium needs (see .library/env/machines/python.md): no sandbox as root, no
# GPU, and no background networking, whose connections this closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class WebSocket:
    """RFC 6455 client: text frames out (masked, as a client must), text frames in; enough for CDP."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        match = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if match is None:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = match.group(1), int(match.group(2)), match.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        # No Origin header: Chromium refuses WebSocket clients that send a foreign one.
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the DevTools socket closed during the handshake")
            head += chunk
        status, _, self._buffer = head.partition(b"\r\n\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"WebSocket handshake refused: {status.splitlines()[0]!r}")

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text
        length = len(payload)
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += struct.pack("!H", length)
        else:
            header.append(0x80 | 127)
            header += struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(bytes(header) + mask + masked)

    def _read(self, count: int, deadline: float) -> bytes:
        while len(self._buffer) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete WebSocket frame before the deadline")
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the DevTools socket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def receive(self, deadline: float) -> str:
        """The next whole text message (continuation frames joined); pings answered on the way."""
        parts: list[bytes] = []
        while True:
            first, second = self._read(2, deadline)
            opcode = first & 0x0F
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2, deadline))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8, deadline))
            mask = self._read(4, deadline) if second & 0x80 else b""
            payload = self._read(length, deadline)
            if mask:
                payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode == 0x9:  # ping -> pong, masked like every client frame
                pong_mask = os.urandom(4)
                body = bytes(byte ^ pong_mask[i % 4] for i, byte in enumerate(payload))
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + pong_mask + body)
                continue
            if opcode in (0x1, 0x0):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Page:
    """One tab, attached through a flat CDP session; everything it reports is kept in `events`."""

    browser: Browser
    session_id: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 15.0) -> dict[str, Any]:
        return self.browser.call(method, params, timeout, session_id=self.session_id)

    def evaluate(self, expression: str, timeout: float = 15.0) -> Any:
        reply = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, timeout
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JS expression until it is truthy; fail with `what` and the page's errors after `timeout`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except AssertionError as error:  # e.g. no document.body yet while the page loads
                last = error
            else:
                if last:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last {last!r}; errors {self.errors()}")

    def errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and failed loads the page produced so far."""
        self.browser.drain(self)
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                args = [arg.get("value", arg.get("description")) for arg in params.get("args", [])]
                found.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                entry = params["entry"]
                found.append(f"log {entry['level']}: {entry.get('text')} {entry.get('url', '')}".strip())
        return found


class Browser:
    """A Chromium process with a fresh profile, and its browser-level DevTools connection."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        self.stderr_path = workdir / "chromium.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.ws = WebSocket(self._wait_endpoint(30.0))
        self._next_id = 0
        self._pending: list[dict[str, Any]] = []

    def _wait_endpoint(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.stderr_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"chromium exited with {self.process.returncode}: {self.stderr()[-2000:]}")
            time.sleep(0.05)
        raise AssertionError(f"chromium did not open DevTools within {timeout}s: {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 15.0, session_id: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.receive(deadline))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"CDP {method} failed: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self._pending.append(reply)

    def drain(self, page: Page) -> None:
        """Move events that arrived while waiting for replies (and any queued since) to their page."""
        with contextlib.suppress(TimeoutError):
            while True:
                self._pending.append(json.loads(self.ws.receive(time.monotonic() + 0.05)))
        mine = [event for event in self._pending if event.get("sessionId") == page.session_id]
        self._pending = [event for event in self._pending if event.get("sessionId") != page.session_id]
        page.events.extend(mine)

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Log", "Page"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        self.ws.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        self._stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def chromium(executable: str, workdir: Path) -> Iterator[Browser]:
    browser = Browser(executable, workdir)
    try:
        yield browser
    finally:
        browser.close()
