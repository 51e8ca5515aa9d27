"""One supervised backend process.

State: `TRANSITIONS` is the table of every allowed change, and `Backend._become` the one method that
writes the state; it refuses (and logs) a change the table does not hold.

    STOPPED  --ensure_ready-->  STARTING  --loaded + produced a token-->  READY
    STARTING --exited / timed out-->  FAILED   (the reason comes from the backend's own log)
    STARTING --start abandoned (stop, shutdown)-->  STOPPED
    READY    --process exited, or marked broken by a request-->  FAILED   (restarted by the next request)
    READY    --stop-->  STOPPING  -->  STOPPED
    FAILED   --ensure_ready, once the crash-loop back-off has passed-->  STARTING
    FAILED   --stop (a dead process's leftovers)-->  STOPPING  -->  STOPPED, or back to FAILED when the
             stop is the cleanup before a restart (the back-off and the reason stay until the start)

Who changes it: start and stop, which await, hold the backend's lock from the first change to the last.
The one change made outside the lock is READY -> FAILED (an exit noticed by the watcher, or a request
that found the backend broken): it is synchronous, no await between the check and the write, and no
locked section is ever suspended in READY (each leaves READY by its first step, before it awaits), so it
cannot interleave with one.

`ensure_ready()`: READY -> return; STOPPED/FAILED -> start (FAILED: 503 while backing off);
STARTING -> wait for that start; STOPPING -> wait, then start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.backends.connections import Connection, Heartbeat, Preconnected, open_connection
from app.backends.distributed import LaunchPlan, launch_plan
from app.backends.logs import BackendLog, pump_stream
from app.blas import plan as blas_plan
from app.errors import BackendStartFailed, ModelUnavailable
from app.models.sources import SourceStatus
from app.profiles import BackendSpec

logger = logging.getLogger("specgate.backend")

LAUNCHER_COMMAND = (sys.executable, "-m", "app.launcher")
# The backend's guard (app/backends/guard.py): the direct child, so that nothing the command starts, at any
# depth, outlives the gateway. Run by path, isolated and without site packages: it needs the stdlib only.
GUARD_COMMAND = (sys.executable, "-I", "-S", str(Path(__file__).with_name("guard.py")))


class BackendState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# Every allowed change of state (the diagram in the module docstring); `Backend._become` refuses the rest.
TRANSITIONS: dict[BackendState, frozenset[BackendState]] = {
    BackendState.STOPPED: frozenset({BackendState.STARTING}),
    BackendState.STARTING: frozenset({BackendState.READY, BackendState.FAILED, BackendState.STOPPED}),
    BackendState.READY: frozenset({BackendState.STOPPING, BackendState.FAILED}),
    BackendState.STOPPING: frozenset({BackendState.STOPPED, BackendState.FAILED}),
    BackendState.FAILED: frozenset({BackendState.STARTING, BackendState.STOPPING}),
}

# States in which the backend's process holds (or may still hold) its memory: what the pool's cap counts.
HOLDS_A_PROCESS = frozenset({BackendState.STARTING, BackendState.READY, BackendState.STOPPING})


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
    # Prompt caches on disk (SPECGATE_PROMPT_CACHE_*); None or 0 bytes: memory only.
    prompt_cache_dir: Path | None = None
    prompt_cache_disk_bytes: int = 0
    prompt_cache_min_tokens: int = 256
    # Files the gateway writes for its backends (a distributed backend's hostfile); None: a temporary directory.
    run_dir: Path | None = None


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


def exit_status_now(process: asyncio.subprocess.Process) -> tuple[bool, int | None]:
    """(exited, code) of a child process, asked of the kernel now, without reaping it.

    asyncio learns of an exit late: a watcher thread reaps it, then the loop runs the callback, and
    `wait()` returns only once the pipes have closed too. `waitid(..., WNOWAIT)` sees a dead child at once
    and leaves the reaping to asyncio. Where it is missing (macOS before Python 3.13), only asyncio's
    notice counts.
    """
    if process.returncode is not None:
        return True, process.returncode
    if not hasattr(os, "waitid"):
        return False, None
    try:
        result = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True, None  # already reaped by asyncio's watcher; its callback has not run yet
    if result is None:
        return False, None
    return True, result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


def pid_gone(pid: int) -> bool:
    """Whether a process that is not our child (the guard's) has ended: it is gone, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): a zombie counts as alive here, until its guard reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # The state follows the command name, which is in parentheses and may contain anything.
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] in (b"Z", b"X")


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
        self._state = BackendState.STOPPED
        self.port: int | None = None
        # The guard (app/backends/guard.py); the backend command is its child, `command_pid`.
        self.process: asyncio.subprocess.Process | None = None
        self.command_pid: int | None = None
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
        # A distributed backend's mlx.launch command and hostfile, as of its last start (None: one process).
        self.launch: LaunchPlan | None = None
        self._lock = asyncio.Lock()
        self._starting: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expected_exit = False
        # The process whose unexpected exit has been recorded: noticed once, by whoever sees it first.
        self._exit_recorded: asyncio.subprocess.Process | None = None
        # The next request's connection, opened ahead (app/proxy/upstream.py); only while READY.
        self.connections: Preconnected | None = None
        # When the process last sent a byte to any request: a busy backend is not a hung one (app/proxy/relay.py).
        self.heartbeat = Heartbeat()

    # ----- public API ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # What the proxy uses (app/backends/connections.py's BackendEndpoint): name, address, heartbeat,
    # connect and note_broken.

    @property
    def address(self) -> tuple[str, int]:
        # Port 0 before the first start: a connect there fails like one to a stopped backend.
        return "127.0.0.1", self.port or 0

    async def connect(self) -> Connection:
        """A connection for one request: the spare opened ahead while READY, else a fresh one."""
        spare = self.connections
        if spare is not None:
            return await spare.take()
        return await open_connection(*self.address)

    @property
    def pid(self) -> int | None:
        """The backend command's pid (its guard's child), once the guard has said it."""
        return self.command_pid if self.process is not None else None

    def distributed_info(self) -> dict[str, Any] | None:
        """A distributed backend's placement, and the exact mlx.launch command and hostfile of its last start
        (ports are drawn at each start: the command is known once it has started); None for one process."""
        distributed = self.spec.distributed
        if distributed is None:
            return None
        launch = self.launch
        hostfile = str(launch.hostfile) if launch is not None and launch.hostfile is not None else distributed.hostfile
        return {
            "backend": distributed.backend,
            "mode": distributed.mode,
            "ranks": launch.ranks if launch is not None else distributed.ranks or len(distributed.hosts or ()) or None,
            "hosts": list(distributed.hosts) if distributed.hosts is not None else None,
            "hostfile": hostfile,
            "command": launch.mlx_launch if launch is not None else None,
        }

    @property
    def blas_summary(self) -> str | None:
        """e.g. "mkl 2026.2" or "reference (slow)": what the backend reported at its last start."""
        summary = self.blas.get("summary") if self.blas else None
        return str(summary) if summary is not None else None

    @property
    def state(self) -> BackendState:
        """Read-only: `_become` is the one writer."""
        return self._state

    @property
    def is_running(self) -> bool:
        return self._state in (BackendState.STARTING, BackendState.READY)

    @property
    def holds_a_process(self) -> bool:
        """Starting, ready or still stopping: its memory is not free yet (the pool's cap counts it)."""
        return self._state in HOLDS_A_PROCESS

    def _become(self, new: BackendState) -> bool:
        """The one write of the state: a change the table allows, or none (refused, logged, False)."""
        old = self._state
        if new not in TRANSITIONS[old]:
            message = f"refused state change {old.value} -> {new.value} (not in the transition table)"
            self.log.append("gateway", message)
            logger.error("backend %s: %s", self.name, message)
            return False
        self._state = new
        return True

    async def ensure_ready(self) -> None:
        """Return once the backend can take a request; start it if needed.

        The start runs as a task of its own that the requests waiting for it share: a client that leaves
        stops waiting, but does not cancel the start. Cancelled with its first requester, a start that takes
        longer than clients are patient would be killed and begun again by each, and never finish; and a
        model load is worth finishing for the next request. (Unused, the backend unloads after its TTL.)
        """
        if self.state is BackendState.READY:
            return
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start_when_free())
            # Retrieve the outcome even if every requester has left (no "exception never retrieved").
            self._starting.add_done_callback(lambda task: task.cancelled() or task.exception())
        starting = self._starting
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if starting.cancelled() and caller is not None and not caller.cancelling():
                # Not this request's cancellation: `stop` abandoned the start (shutdown, profiles removed).
                raise BackendStartFailed(f"backend {self.name} was stopped while it started") from None
            raise

    async def _start_when_free(self) -> None:
        async with self._lock:
            # Another start may have finished while this one waited for the lock.
            if not self._is_ready():
                await self._start_locked()

    async def stop(self, reason: str = "stopped") -> None:
        """SIGTERM the process group, SIGKILL after the grace period, await the exit. A start under way is
        abandoned (the gateway is shutting down, or the backend's profiles are gone)."""
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
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
        """A request saw the backend fail (its generation thread died, it hung): it takes no more requests
        from now on (FAILED, counted as a crash), its processes are killed, and the next request restarts it."""
        process = self.process
        if self.state is BackendState.READY and process is not None:
            self._kill_now()
            self._record_exit(process, f"marked broken: {reason}")

    def notice_if_gone(self) -> bool:
        """For a request whose connection to the backend just broke: if the backend is gone, record it now,
        before the request hands its slot on, so the next request restarts the backend instead of connecting
        to a dead port. The kernel knows at once; asyncio hears of the exit later (and the guard exits only
        after it has cleaned up after the command)."""
        process = self.process
        if process is None:
            return True
        gone, code = self._gone_now(process)
        if gone:
            self._on_exit(process, code)
        return gone

    async def has_exited(self, process: asyncio.subprocess.Process | None, within: float = 5.0) -> bool:
        """Whether `process`, the one a request was just sent to, is gone: it has exited, or the backend has
        been stopped or restarted since. Waits up to `within` s for a process on its way out (the sockets
        of a killed process close before the kernel reports its exit). An exit found here is recorded at
        once, so the next `ensure_ready` restarts the backend instead of sending more requests to it."""
        deadline = time.monotonic() + within
        while process is not None and process is self.process:
            gone, code = self._gone_now(process)
            if gone:
                self._on_exit(process, code)
                return True
            if time.monotonic() >= deadline:
                return False  # alive: the connection failed for another reason
            await asyncio.sleep(0.01)
        return True

    def _gone_now(self, process: asyncio.subprocess.Process) -> tuple[bool, int | None]:
        """(gone, exit code if known): the guard has exited, or the command it runs has."""
        exited, code = exit_status_now(process)
        if exited:
            return True, code
        if self.command_pid is not None and pid_gone(self.command_pid):
            return True, None
        return False, None

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
        if self.spec.distributed is None:
            argv, env = self._command()
        else:
            # Resolving `hosts` may wait on DNS (mDNS names on macOS: seconds): not on the event loop.
            argv, env = await asyncio.to_thread(self._command)
        self._become(BackendState.STARTING)
        self.started_at = time.monotonic()
        self.load_seconds = None
        self.failure = None
        self.blas = None
        self.log.append("gateway", f"starting on port {self.port}: {' '.join(argv)}")
        if self.launch is not None:
            self.log.append(
                "gateway", f"{self.launch.ranks} ranks; the same with MLX's launcher: {self.launch.mlx_launch}"
            )
        try:
            await self._spawn(argv, env)
            await self._wait_ready()
        except BackendStartFailed as error:
            await self._fail_start(str(error))
            raise
        except BaseException:
            await self._kill_and_wait()
            self._become(BackendState.STOPPED)
            raise
        self._become(BackendState.READY)
        self.connections = Preconnected("127.0.0.1", self.port) if self.port is not None else None
        self.heartbeat = Heartbeat()
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
            argv += self._prompt_cache_flags()
        argv += ["--host", "127.0.0.1", "--port", str(self.port), *options.args]
        # What every rank needs, remote ones included (they do not inherit the gateway's environment).
        rank_env = {"PYTHONUNBUFFERED": "1", **({} if options.allow_hub else {"HF_HUB_OFFLINE": "1"})}
        rank_env.update(dict(options.env))
        env = dict(os.environ)
        blas_plan(options.blas or self.timing.blas).apply(env)
        env.update(rank_env)
        if self.spec.distributed is not None:
            run_dir = self.timing.run_dir or Path(tempfile.gettempdir()) / "specgate-run"
            hostfile = run_dir / f"{self.name}.hostfile.json"
            self.launch = launch_plan(self.spec.distributed, argv, rank_env, hostfile)
            argv = self.launch.argv
        return argv, env

    def _prompt_cache_flags(self) -> list[str]:
        options = self.spec.options
        limit = self.timing.prompt_cache_disk_bytes
        if options.prompt_cache_disk_bytes is not None:
            limit = options.prompt_cache_disk_bytes
        if self.timing.prompt_cache_dir is None or limit == 0:
            return []
        return [
            "--prompt-cache-dir",
            str(self.timing.prompt_cache_dir),
            "--prompt-cache-disk-bytes",
            str(limit),
            "--prompt-cache-min-tokens",
            str(self.timing.prompt_cache_min_tokens),
        ]

    def _resolved(self, value: str, field_name: str) -> str:
        status = self._resolve(value)
        if not status.present or status.path is None:
            raise ModelUnavailable(f"{field_name} {value!r} is not available: {status.detail}")
        return status.path

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self._expected_exit = False
        self.command_pid = None
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise BackendStartFailed(f"cannot run {argv[0]!r}: no such program")
        try:
            # The guard runs the command. Its stdin is a pipe that the gateway holds open and never writes:
            # end-of-file there is how the guard learns that the gateway is gone, however it died. A new
            # session: its process group is what a stop signals, and the set of processes the guard kills.
            self.process = await asyncio.create_subprocess_exec(
                *GUARD_COMMAND,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=1024 * 1024,
            )
        except OSError as error:
            raise BackendStartFailed(f"cannot run the backend guard: {error.strerror}") from error
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
        """Notice an unexpected exit, so the state never claims a dead process is ready."""
        self._on_exit(process, await process.wait())

    def _on_exit(self, process: asyncio.subprocess.Process, code: int | None) -> None:
        self._record_exit(process, "exited" if code is None else f"exited with code {code}")

    def _record_exit(self, process: asyncio.subprocess.Process, reason: str) -> None:
        """An unexpected end of `process` (it died, or was killed as broken): recorded once per process."""
        if self._expected_exit or process is not self.process or process is self._exit_recorded:
            return
        self._exit_recorded = process
        self.log.append("gateway", f"backend {reason}")
        self._close_connections()
        if self.state is BackendState.READY:
            self._record_crash(reason)
            self._become(BackendState.FAILED)
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
        self._become(BackendState.FAILED)
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
            # Nothing to stop. A start that failed before its process ran stays FAILED (its back-off holds).
            if self.state is BackendState.STARTING:
                self._become(BackendState.STOPPED)
            return
        was_failed = self.state is BackendState.FAILED
        self._become(BackendState.STOPPING)
        self.log.append("gateway", f"stopping ({reason})")
        await self._kill_and_wait()
        self._become(BackendState.FAILED if was_failed and reason == "restarting" else BackendState.STOPPED)

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
        if event.get("event") == "spawned":
            pid = event.get("pid")
            # The guard's line comes first; a later one (printed by the command itself) changes nothing.
            if isinstance(pid, int) and self.command_pid is None:
                self.command_pid = pid
        elif event.get("event") == "loaded":
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
