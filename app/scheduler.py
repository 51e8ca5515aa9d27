"""Per-backend admission: a FIFO queue in front of a backend that serves N requests at a time.

mlx_lm.server has an unbounded queue of its own and, with a draft model, runs one request at a
time; a request waiting inside it gets no bytes and cannot be dropped. Waiting here instead keeps
the order visible, lets a client that left be removed from the queue, and bounds the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from app.errors import QueueFull


@dataclass
class Ticket:
    """One request's place: counted against its profile from admission until release."""

    profile: str
    admitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    _slot: bool = False

    @property
    def queue_seconds(self) -> float:
        end = self.started_at if self.started_at is not None else time.monotonic()
        return end - self.admitted_at


class Admission:
    """FIFO admission with a concurrency limit and per-profile limits on running plus waiting."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.running = 0
        self._waiters: deque[tuple[Ticket, asyncio.Future[None]]] = deque()
        self._per_profile: dict[str, int] = {}
        # Seconds a request held a slot, smoothed: the basis of Retry-After.
        self._mean_service = 5.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def active(self) -> int:
        """Requests admitted and not yet released: a backend with any is never unloaded."""
        return self.running + self.waiting

    def profile_count(self, profile: str) -> int:
        return self._per_profile.get(profile, 0)

    def waiting_for(self, profile: str) -> int:
        """Requests of `profile` in the queue; `profile_count - waiting_for` of them hold a slot."""
        return sum(1 for ticket, _ in self._waiters if ticket.profile == profile)

    def admit(self, profile: str, limit: int) -> Ticket:
        """Count a request against its profile, or refuse it with 429 when the profile is full."""
        count = self._per_profile.get(profile, 0)
        if count >= limit:
            retry = self._mean_service * max(1, self.waiting + 1) / self.concurrency
            raise QueueFull(
                f"profile {profile!r} has {count} requests running or waiting (limit {limit}); retry later",
                retry_after=retry,
            )
        self._per_profile[profile] = count + 1
        return Ticket(profile)

    async def wait_turn(self, ticket: Ticket) -> None:
        """Wait, in arrival order, for a slot. Cancelling (client gone) leaves the queue cleanly."""
        if self.running < self.concurrency and not self._waiters:
            self._take(ticket)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (ticket, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if ticket._slot:
                # The slot was handed over just as we were cancelled (the result was set, then the task was
                # cancelled before it resumed): pass it on, and forget it, so `release` cannot pass it twice.
                self._give_back(ticket)
            else:
                # A release may already have popped (and skipped) our cancelled entry.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def _take(self, ticket: Ticket) -> None:
        self.running += 1
        ticket._slot = True
        ticket.started_at = time.monotonic()

    def release(self, ticket: Ticket) -> None:
        """Give back the slot (if held) and the profile's count. Call once per admitted ticket."""
        count = self._per_profile.get(ticket.profile, 0)
        if count <= 1:
            self._per_profile.pop(ticket.profile, None)
        else:
            self._per_profile[ticket.profile] = count - 1
        if ticket._slot:
            if ticket.started_at is not None:
                held = time.monotonic() - ticket.started_at
                self._mean_service = 0.8 * self._mean_service + 0.2 * held
            self._give_back(ticket)

    def _give_back(self, ticket: Ticket) -> None:
        """The one place a slot is returned: `ticket._slot` goes False with the count, so it happens once."""
        ticket._slot = False
        self.running -= 1
        while self._waiters:
            waiter, future = self._waiters.popleft()
            if not future.cancelled():
                self._take(waiter)
                future.set_result(None)
                return
