"""Profiles reload without downtime: on SIGHUP, and optionally when a profile file changes.

A new file is validated in full before anything changes: an invalid one is rejected with its error
logged and the running profiles stay. Otherwise new profiles appear at once; backends no profile
uses any more take no new requests (their profiles are gone), finish what they have admitted
(running and queued), and only then stop. Nothing a file holds stops the watcher: a failed reload, even
one that raises something unforeseen, is logged, and the next change is read as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from app.backends.pool import BackendSlot
from app.gateway import Gateway
from app.profiles import ProfileError, load_profiles

logger = logging.getLogger("specgate.reload")


class ProfileReloader:
    def __init__(self, gateway: Gateway, directory: Path, poll_seconds: float) -> None:
        self.gateway = gateway
        self.directory = directory
        self.poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signature = self._files_signature()
        # Other things SIGHUP re-reads (the API key file).
        self.on_sighup_also: list[Callable[[], None]] = []

    def _files_signature(self) -> tuple[tuple[str, int, int, int], ...]:
        """Names, types, sizes and mtimes of everything under the directory (profiles and prompt files; a
        directory or FIFO named `x.toml` too, so that the reload says what is wrong with it)."""
        entries = []
        with contextlib.suppress(OSError):
            for path in sorted(self.directory.rglob("*")):
                with contextlib.suppress(OSError):
                    stat = path.lstat()
                    entries.append((str(path), stat.st_mode, stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    async def reload(self, reason: str) -> bool:
        """Load and apply the directory's profiles; False (old ones kept) when they are invalid."""
        async with self._lock:
            self._signature = self._files_signature()
            try:
                profiles = await asyncio.to_thread(load_profiles, self.directory)
            except ProfileError as error:
                logger.error(
                    "profile reload (%s) rejected, keeping the %d current profiles: %s",
                    reason,
                    len(self.gateway.profiles),
                    error,
                )
                return False
            except Exception:  # a bug: said as such, and the next change is read as usual
                logger.exception(
                    "profile reload (%s) failed, keeping the %d current profiles", reason, len(self.gateway.profiles)
                )
                return False
            before = set(self.gateway.profiles.names())
            unused = self.gateway.apply_profiles(profiles)
            after = set(profiles.names())
            logger.info(
                "profiles reloaded (%s): %d profiles; added %s; removed %s",
                reason,
                len(after),
                sorted(after - before) or "none",
                sorted(before - after) or "none",
            )
            for slot in unused:
                self._spawn(self._drain_and_stop(slot))
            return True

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_and_stop(self, slot: BackendSlot) -> None:
        """Wait until the slot has nothing admitted, then stop its backend (unless it is wanted again)."""
        pool = self.gateway.pool
        spec = slot.backend.spec
        # Polled: Admission has no "now empty" event, and a tenth of a second is nothing to a drain.
        while slot.admission.active > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        if any(profile.backend_spec == spec for profile in self.gateway.profiles):
            return  # a later reload brought it back
        logger.info("stopping %s: no profile uses it any more", slot.backend.name)
        await slot.backend.stop("its profiles were removed")
        if pool.slots.get(spec) is slot:
            del pool.slots[spec]
        await pool.notify_idle()

    def on_sighup(self) -> None:
        for also in self.on_sighup_also:
            try:
                also()
            except Exception:
                logger.exception("reload on SIGHUP failed")
        self._spawn(self._reload_logged("SIGHUP"))

    def install(self, watch: bool) -> None:
        loop = asyncio.get_running_loop()
        # Not available off the main thread or on Windows: reload then only by file change.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        if watch:
            self._spawn(self._watch())

    async def _watch(self) -> None:
        # The watcher outlives any one failed reload: it used to die on one, and reloads stopped for good.
        while True:
            await asyncio.sleep(self.poll_seconds)
            signature = await asyncio.to_thread(self._files_signature)
            if signature != self._signature:
                await self._reload_logged("profile files changed")

    async def _reload_logged(self, reason: str) -> None:
        try:
            await self.reload(reason)
        except Exception:  # applying the profiles failed (a bug): the gateway keeps serving
            logger.exception("profile reload (%s) failed", reason)

    async def close(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
