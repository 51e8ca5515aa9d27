"""All backends: one per BackendSpec, started on demand, unloaded when idle, LRU-evicted at the cap.

The cap (`max_running`) bounds memory, so it counts every backend whose process may still hold its model
(starting, ready, and stopping: `Backend.holds_a_process`) and every start granted room that has not
begun yet. An evicted backend counts until its process has exited, and the start that evicted it holds
its room from the eviction on but starts only after that exit; so the processes alive never exceed the
cap, though the count may, while an evicted backend stops. Evictions run outside the pool's condition,
as tasks of the pool: a start that finds room, or evicts a backend of its own, goes ahead while another
backend stops, and a requester that leaves does not cut a stop short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import httpx

from app.backends.process import Backend, BackendState, BackendTiming
from app.errors import BackendStartFailed
from app.models.sources import SourceStatus
from app.profiles import BackendSpec, Profile, ProfileSet
from app.scheduler import Admission

logger = logging.getLogger("specgate.pool")


class BackendSlot:
    """A backend with its admission queue and the idle TTL of the profiles that use it."""

    def __init__(self, backend: Backend, admission: Admission) -> None:
        self.backend = backend
        self.admission = admission
        self.ttl = 0.0
        self.profiles: list[str] = []


class BackendPool:
    """Owns every backend process. At most `max_running` hold a process at once; a serving one is never evicted."""

    def __init__(
        self,
        timing: BackendTiming,
        max_running: int,
        resolve: Callable[[str], SourceStatus],
        http: httpx.AsyncClient,
    ) -> None:
        self.timing = timing
        self.max_running = max_running
        self._resolve = resolve
        self._http = http
        self.slots: dict[BackendSpec, BackendSlot] = {}
        self._capacity = asyncio.Condition()
        # Starts granted room (from `_make_room` until their backend's start has ended).
        self._granted: dict[BackendSlot, int] = {}
        # Backends chosen for eviction and their stops, which run as tasks of the pool.
        self._evictions: dict[BackendSlot, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        # Names stay unique after a profile reload removes slots (logs and metrics are keyed by them).
        self._created = 0

    def configure(self, profiles: ProfileSet) -> list[BackendSlot]:
        """Map profiles to slots; returns slots no profile uses any more (to drain and stop)."""
        wanted: dict[BackendSpec, list[Profile]] = {}
        for profile in profiles:
            if profile.local:  # a profile served by nodes alone has no backend here (app/backends/nodes.py)
                wanted.setdefault(profile.backend_spec, []).append(profile)
        for spec, users in wanted.items():
            slot = self.slots.get(spec)
            if slot is None:
                self._created += 1
                name = f"b{self._created}-{_short_name(spec)}"
                concurrency = 1 if spec.draft_model else spec.options.max_concurrency
                backend = Backend(name, spec, self.timing, self._resolve, self._http)
                slot = self.slots[spec] = BackendSlot(backend, Admission(concurrency))
            slot.profiles = [profile.name for profile in users]
            ttls = [profile.ttl for profile in users]
            # A TTL of 0 means "keep loaded"; otherwise the most patient profile decides.
            slot.ttl = 0.0 if 0 in ttls else max(ttls)
        return [slot for spec, slot in self.slots.items() if spec not in wanted]

    def slot_for(self, profile: Profile) -> BackendSlot:
        return self.slots[profile.backend_spec]

    async def ensure_ready(self, slot: BackendSlot) -> None:
        """Start the slot's backend if needed, first making room under the cap."""
        backend = slot.backend
        backend.touch()
        if backend.state is BackendState.READY:
            return
        granted = not backend.is_running
        if granted:
            await self._make_room(slot)
        try:
            await backend.ensure_ready()
        finally:
            if granted:
                self._ungrant(slot)
            async with self._capacity:
                self._capacity.notify_all()

    def _occupying(self, wanted: BackendSlot) -> list[BackendSlot]:
        """The slots other than `wanted` that count against the cap (see the module docstring)."""
        return [s for s in self.slots.values() if s is not wanted and (s.backend.holds_a_process or s in self._granted)]

    async def _make_room(self, wanted: BackendSlot) -> None:
        """Return once `wanted` may start under the cap, with room granted to it: free room, or the room of
        the least recently used idle backend, evicted for it. The room of an eviction is the evicting
        start's from the moment it evicts (others count it taken and evict a backend of their own), but
        its process starts only once the evicted one has exited."""
        deadline = time.monotonic() + self.timing.start_timeout
        async with self._capacity:
            while True:
                occupying = self._occupying(wanted)
                if len(occupying) < self.max_running:
                    self._grant(wanted)
                    return
                idle = [
                    s
                    for s in occupying
                    if s.admission.active == 0
                    and s.backend.state is BackendState.READY
                    and s not in self._evictions
                    and s not in self._granted
                ]
                if idle:
                    victim = min(idle, key=lambda s: s.backend.last_used)
                    logger.info(
                        "evicting %s (least recently used) to start %s", victim.backend.name, wanted.backend.name
                    )
                    eviction = self._evictions[victim] = asyncio.create_task(self._evict(victim))
                    self._grant(wanted)
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendStartFailed(
                        f"all {self.max_running} backend slots are serving requests; raise max_backends or retry later",
                        retry_after=5.0,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._capacity.wait(), timeout=min(1.0, remaining))
        # Outside the condition: other starts go ahead meanwhile. A requester that leaves gives its room
        # back; the stop goes on regardless (shielded, a task of the pool).
        try:
            await asyncio.shield(eviction)
        except BaseException:
            self._ungrant(wanted)
            raise

    def _grant(self, slot: BackendSlot) -> None:
        self._granted[slot] = self._granted.get(slot, 0) + 1

    async def _evict(self, victim: BackendSlot) -> None:
        """Stop an evicted backend, outside the condition; then wake the starts waiting for its room."""
        try:
            await victim.backend.stop("evicted: least recently used")
        except Exception:
            logger.exception("stopping evicted backend %s failed", victim.backend.name)
        finally:
            self._evictions.pop(victim, None)
            await self.notify_idle()

    def _ungrant(self, slot: BackendSlot) -> None:
        count = self._granted.get(slot, 0) - 1
        if count > 0:
            self._granted[slot] = count
        else:
            self._granted.pop(slot, None)

    async def notify_idle(self) -> None:
        async with self._capacity:
            self._capacity.notify_all()

    def start_reaper(self, interval: float = 1.0) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(interval))

    async def _reap_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.reap_idle()

    async def reap_idle(self) -> None:
        """Unload backends idle for longer than their TTL."""
        now = time.monotonic()
        for slot in list(self.slots.values()):
            backend = slot.backend
            if (
                slot.ttl > 0
                and backend.state is BackendState.READY
                and slot.admission.active == 0
                and now - backend.last_used > slot.ttl
            ):
                logger.info("unloading %s: idle for %.0fs (ttl %.0fs)", backend.name, now - backend.last_used, slot.ttl)
                await backend.stop(f"idle for more than {slot.ttl:.0f}s")
                await self.notify_idle()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(slot.backend.stop("gateway shutting down") for slot in self.slots.values()))
        await asyncio.gather(*self._evictions.values(), return_exceptions=True)


def _short_name(spec: BackendSpec) -> str:
    tail = spec.model.rstrip("/").split("/")[-1].split(":")[-1]
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in tail)[:40]
