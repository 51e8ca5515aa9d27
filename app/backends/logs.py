"""A bounded per-backend buffer of the backend's stdout/stderr lines, also sent to the gateway log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.logging_setup import printable

EVENT_PREFIX = "SPECGATE_EVENT "
# A distributed backend's lines carry their rank (app/backends/mlx_launch.py); only rank 0's events count.
RANK0_PREFIX = "[rank 0] "


@dataclass(frozen=True)
class LogLine:
    time: float
    stream: str
    text: str


class BackendLog:
    """The last N lines a backend printed; subscribers receive new lines as they come."""

    def __init__(self, name: str, max_lines: int) -> None:
        self.name = name
        self.lines: deque[LogLine] = deque(maxlen=max_lines)
        self._logger = logging.getLogger(f"specgate.backend.{name}")
        self._subscribers: set[asyncio.Queue[LogLine]] = set()
        self.on_event: Callable[[dict[str, Any]], None] | None = None

    def append(self, stream: str, text: str) -> None:
        # A backend's output can quote a request (an error, a traceback): kept with its control characters
        # escaped, so `/logs` shows a terminal no escape sequence a client put there.
        text = printable(text)
        line = LogLine(time.time(), stream, text)
        self.lines.append(line)
        self._logger.info("%s", text)
        event_text = text.removeprefix(RANK0_PREFIX)
        if event_text.startswith(EVENT_PREFIX) and self.on_event is not None:
            try:
                event = json.loads(event_text[len(EVENT_PREFIX) :])
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict):
                self.on_event(event)
        for queue in list(self._subscribers):
            if queue.qsize() < 1000:  # a slow follower loses lines rather than growing memory
                queue.put_nowait(line)

    def tail(self, count: int) -> list[LogLine]:
        if count <= 0:
            return []
        return list(self.lines)[-count:]

    def subscribe(self) -> asyncio.Queue[LogLine]:
        queue: asyncio.Queue[LogLine] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogLine]) -> None:
        self._subscribers.discard(queue)

    def failure_reason(self, max_lines: int = 6) -> str:
        """The most telling recent lines: from the last traceback or error line to the end."""
        recent = [line.text for line in self.tail(200) if line.text.strip()]
        if not recent:
            return "the backend printed nothing"
        start = max(0, len(recent) - max_lines)
        for index in range(len(recent) - 1, -1, -1):
            text = recent[index]
            if "Error" in text or "error:" in text.lower() or text.startswith("Traceback"):
                start = max(0, min(index, len(recent) - max_lines))
                break
        return " | ".join(recent[start : start + max_lines])


async def pump_stream(reader: asyncio.StreamReader, stream: str, log: BackendLog) -> None:
    """Copy a process pipe into the log line by line until EOF."""
    while True:
        try:
            raw = await reader.readline()
        except ValueError:  # a line longer than the reader's limit: take what is there
            raw = await reader.read(64 * 1024)
        if not raw:
            return
        log.append(stream, raw.decode("utf-8", errors="replace").rstrip("\r\n"))
