"""One supervised backend process.

State (only `Backend`'s own methods, under its lock, change it):

    STOPPED  --ensure_ready-->  STARTING  --loaded + produced a token-->  READY
    STARTING --exited / timed out-->  FAILED   (the reason comes from the backend's own log)
    READY    --process exited-->      FAILED   (restarted by the next request)
    READY    --stop-->  STOPPING  -->  STOPPED
    FAILED   --ensure_ready, once the crash-loop back-off has passed-->  STARTING

`ensure_ready()`: READY -> return; STOPPED/FAILED -> start (FAILED: 503 while backing off);
STARTING -> wait for that start; STOPPING -> wait, then start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.backends.connections import Preconnected
from app.backends.logs import BackendLog, pump_stream
from app.blas import plan as blas_plan
from app.errors import BackendStartFailed, ModelUnavailable
from app.models.sources import SourceStatus
from app.profiles import BackendSpec

logger = logging.getLogger("specgate.backend")

LAUNCHER_COMMAND = (sys.executable, "-m", "app.launcher")
_PR_SET_PDEATHSIG = 1


class BackendState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class BackendTiming:
    """How a backend is supervised; from Settings, so tests can shorten every wait."""

    start_timeout: float = 300.0
    stop_grace: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    log_lines: int = 2000
    # SPECGATE_BLAS: the BLAS of backends whose profile names none (app/blas.py).
    blas: str = "auto"


@dataclass
class CrashHistory:
    """Consecutive failures drive the back-off; a request served resets them."""

    consecutive: int = 0
    total_restarts: int = 0
    retry_at: float = 0.0
    last_reason: str = ""
    times: list[float] = field(default_factory=list)

    def backoff(self, timing: BackendTiming) -> float:
        # The first crash restarts at once (the next request must succeed); a loop backs off.
        if self.consecutive <= 1:
            return 0.0
        return float(min(timing.backoff_max, timing.backoff_initial * 2 ** (self.consecutive - 2)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: own process group, and SIGKILL when the gateway dies, even by SIGKILL."""
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Backend:
    """A supervised `mlx_lm.server` (through specgate's launcher) for one BackendSpec."""

    def __init__(
        self,
        name: str,
        spec: BackendSpec,
        timing: BackendTiming,
        resolve: Callable[[str], SourceStatus],
        http: httpx.AsyncClient,
    ) -> None:
        self.name = name
        self.spec = spec
        self.timing = timing
        self._resolve = resolve
        self._http = http
        self.state = BackendState.STOPPED
        self.port: int | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.log = BackendLog(name, timing.log_lines)
        self.log.on_event = self._on_event
        self.crashes = CrashHistory()
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.load_seconds: float | None = None
        self.last_used = time.monotonic()
        self.failure: str | None = None
        # What the backend found serving its matmuls (the launcher's `blas` event); None until it says.
        self.blas: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._expected_exit = False
        self._exit_seen = asyncio.Event()
        # The next request's connection, opened ahead (app/proxy/upstream.py); only while READY.
        self.connections: Preconnected | None = None

    # ----- public API ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def blas_summary(self) -> str | None:
        """e.g. "mkl 2026.2" or "reference (slow)": what the backend reported at its last start."""
        summary = self.blas.get("summary") if self.blas else None
        return str(summary) if summary is not None else None

    @property
    def is_running(self) -> bool:
        return self.state in (BackendState.STARTING, BackendState.READY)

    async def ensure_ready(self) -> None:
        """Return once the backend can take a request; start it if needed."""
        if self.state is BackendState.READY:
            return
        async with self._lock:
            # Another request may have finished the start while this one waited for the lock.
            if self._is_ready():
                return
            await self._start_locked()

    async def stop(self, reason: str = "stopped") -> None:
        """SIGTERM the process group, SIGKILL after the grace period, await the exit."""
        async with self._lock:
            await self._stop_locked(reason)

    def _is_ready(self) -> bool:
        return self.state is BackendState.READY

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def mark_served(self) -> None:
        """A request completed: the backend works, so a later crash starts a fresh back-off."""
        self.crashes.consecutive = 0
        self.touch()

    def note_broken(self, reason: str) -> None:
        """A request saw the backend fail (e.g. its generation thread died): restart next time."""
        if self.state is BackendState.READY:
            self.log.append("gateway", f"backend marked broken: {reason}")
            self.failure = reason
            self._kill_now()

    async def exited_since_ready(self, within: float = 1.0) -> bool:
        """Whether the process has died (waiting up to `within` s for the exit to be reaped), and the state
        no longer claims READY. For a request whose connection failed before any answer: a backend killed
        between two requests is noticed by `_watch` only once its exit is reaped, which can be after the
        next request already tried to connect."""
        if self.process is None:
            return self.state is not BackendState.READY
        try:
            # Set by `_watch` once it has reaped the exit and recorded the crash.
            await asyncio.wait_for(self._exit_seen.wait(), within)
        except TimeoutError:
            return False  # alive: the connection failed for another reason
        return self.state is not BackendState.READY

    def retry_in(self) -> float:
        return max(0.0, self.crashes.retry_at - time.monotonic())

    # ----- lifecycle (lock held) ------------------------------------------------------------

    async def _start_locked(self) -> None:
        if self.state is BackendState.FAILED and self.retry_in() > 0:
            raise BackendStartFailed(
                f"backend {self.name} failed {self.crashes.consecutive} times in a row "
                f"({self.crashes.last_reason}); next restart in {self.retry_in():.1f}s",
                retry_after=self.retry_in(),
            )
        if self.process is not None:
            await self._stop_locked("restarting")
        argv, env = self._command()
        self.state = BackendState.STARTING
        self.started_at = time.monotonic()
        self.load_seconds = None
        self.failure = None
        self.blas = None
        self.log.append("gateway", f"starting on port {self.port}: {' '.join(argv)}")
        try:
            await self._spawn(argv, env)
            await self._wait_ready()
        except BackendStartFailed as error:
            await self._fail_start(str(error))
            raise
        except BaseException:
            await self._kill_and_wait()
            self.state = BackendState.STOPPED
            raise
        self.state = BackendState.READY
        self.connections = Preconnected("127.0.0.1", self.port) if self.port is not None else None
        self.ready_at = time.monotonic()
        if self.load_seconds is None and self.started_at is not None:
            self.load_seconds = self.ready_at - self.started_at
        self.log.append("gateway", f"ready in {self.ready_at - self.started_at:.2f}s")

    def _command(self) -> tuple[list[str], dict[str, str]]:
        model = self._resolved(self.spec.model, "model")
        options = self.spec.options
        command = list(options.command) if options.command else list(LAUNCHER_COMMAND)
        self.port = free_port()
        argv = [*command, "--model", model]
        if self.spec.prompt_lookup is not None:
            lookup = self.spec.prompt_lookup
            argv += ["--prompt-lookup", "--lookup-min-ngram", str(lookup.min_ngram)]
            argv += ["--lookup-max-ngram", str(lookup.max_ngram)]
        elif self.spec.draft_path is not None:
            argv += ["--draft-model", self._resolved(self.spec.draft_path, "draft_model")]
        if options.command is None or "app.launcher" in " ".join(options.command):
            argv += ["--dtype", self.spec.dtype]
            if options.max_concurrency == 1 and self.spec.draft_path is None and self.spec.prompt_lookup is None:
                # One request at a time: mlx_lm's batch generator buys nothing and decodes slower than the
                # single-stream path (1.3-1.5x on an H100, ~2 % on a CPU); speculative backends use that path too.
                argv += ["--single-stream"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *options.args]
        env = dict(os.environ)
        if not options.allow_hub:
            env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        blas_plan(options.blas or self.timing.blas).apply(env)
        env.update(dict(options.env))
        return argv, env

    def _resolved(self, value: str, field_name: str) -> str:
        status = self._resolve(value)
        if not status.present or status.path is None:
            raise ModelUnavailable(f"{field_name} {value!r} is not available: {status.detail}")
        return status.path

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self._expected_exit = False
        self._exit_seen = asyncio.Event()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                preexec_fn=_die_with_parent,
                limit=1024 * 1024,
            )
        except OSError as error:
            raise BackendStartFailed(f"cannot run {argv[0]!r}: {error.strerror}") from error
        process = self.process
        assert process.stdout is not None
        assert process.stderr is not None
        self._spawn_task(pump_stream(process.stdout, "stdout", self.log))
        self._spawn_task(pump_stream(process.stderr, "stderr", self.log))
        self._spawn_task(self._watch(process))

    def _spawn_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Notice an unexpected exit at once, so the state never claims a dead process is ready."""
        exit_seen = self._exit_seen
        try:
            self._on_exit(process, await process.wait())
        finally:
            exit_seen.set()

    def _on_exit(self, process: asyncio.subprocess.Process, code: int) -> None:
        if self._expected_exit or process is not self.process:
            return
        reason = f"exited with code {code}"
        self.log.append("gateway", f"backend {reason}")
        self._close_connections()
        if self.state is BackendState.READY:
            self._record_crash(reason)
            self.state = BackendState.FAILED
            self.failure = f"{reason}: {self.log.failure_reason()}"

    async def _wait_ready(self) -> None:
        """Ready means the model is loaded and produced a token, not merely `/health` answering."""
        deadline = time.monotonic() + self.timing.start_timeout
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            probe = asyncio.ensure_future(self._probe_until_ready(deadline))
            done, _ = await asyncio.wait(
                {exited, probe}, timeout=self.timing.start_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if probe in done:
                probe.result()
                return
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await probe
            if exited in done:
                await asyncio.sleep(0.05)  # let the pipes drain so the reason is in the log
                raise BackendStartFailed(
                    f"backend {self.name} exited during start (code {exited.result()}): {self.log.failure_reason()}"
                )
            raise BackendStartFailed(
                f"backend {self.name} was not ready after {self.timing.start_timeout:.0f}s: {self.log.failure_reason()}"
            )
        finally:
            exited.cancel()

    async def _probe_until_ready(self, deadline: float) -> None:
        url = self.base_url
        while time.monotonic() < deadline:
            try:
                health = await self._http.get(f"{url}/health", timeout=2.0)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        # The request blocks until the model has loaded; a load error comes back as its answer.
        remaining = max(1.0, deadline - time.monotonic())
        body = {"model": "default_model", "prompt": "hi", "max_tokens": 1, "stream": False}
        try:
            reply = await self._http.post(f"{url}/v1/completions", json=body, timeout=remaining)
        except httpx.TransportError as error:
            raise BackendStartFailed(
                f"backend {self.name} dropped its first request ({type(error).__name__}): {self.log.failure_reason()}"
            ) from error
        if reply.status_code != 200:
            raise BackendStartFailed(
                f"backend {self.name} could not generate (HTTP {reply.status_code}: "
                f"{reply.text[:300]}): {self.log.failure_reason()}"
            )

    async def _fail_start(self, reason: str) -> None:
        await self._kill_and_wait()
        self._record_crash(reason)
        self.state = BackendState.FAILED
        self.failure = reason
        logger.error("%s", reason)

    def _record_crash(self, reason: str) -> None:
        self.crashes.consecutive += 1
        self.crashes.total_restarts += 1
        self.crashes.last_reason = reason[:300]
        self.crashes.retry_at = time.monotonic() + self.crashes.backoff(self.timing)
        if self.crashes.consecutive > 1:
            self.log.append(
                "gateway",
                f"crash loop: {self.crashes.consecutive} failures in a row, "
                f"next start allowed in {self.crashes.backoff(self.timing):.1f}s",
            )

    async def _stop_locked(self, reason: str) -> None:
        if self.process is None:
            if self.state is not BackendState.FAILED:
                self.state = BackendState.STOPPED
            return
        was_failed = self.state is BackendState.FAILED
        self.state = BackendState.STOPPING
        self.log.append("gateway", f"stopping ({reason})")
        await self._kill_and_wait()
        self.state = BackendState.FAILED if was_failed and reason == "restarting" else BackendState.STOPPED

    def _close_connections(self) -> None:
        if self.connections is not None:
            self.connections.close()
            self.connections = None

    def _kill_now(self) -> None:
        self._close_connections()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    async def _kill_and_wait(self) -> None:
        self._close_connections()
        process = self.process
        if process is None:
            return
        self._expected_exit = True
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.timing.stop_grace)
            except TimeoutError:
                self.log.append("gateway", f"no exit {self.timing.stop_grace}s after SIGTERM: SIGKILL")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        # Anything the backend itself spawned in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        self.process = None

    # ----- launcher events ------------------------------------------------------------------

    def _on_event(self, event: dict[str, object]) -> None:
        if event.get("event") == "loaded":
            seconds = event.get("load_seconds")
            if isinstance(seconds, int | float):
                self.load_seconds = float(seconds)
        elif event.get("event") == "blas":
            self.blas = {key: value for key, value in event.items() if key != "event"}
            warning = event.get("warning")
            if warning:
                # The backend keeps working, only slower: say so where the operator looks.
                self.log.append("gateway", f"BLAS: {warning}")
                logger.warning("backend %s: %s", self.name, warning)
