"""The backend's guard: the gateway's direct child, which runs the backend command and outlives nothing.

    python -I -S guard.py COMMAND [ARGS...]      (stdin: a pipe from the gateway that it never writes)

Why a guard: the promise is that no backend process outlives the gateway, even a `kill -9` of it. The
parent-death signal (`PR_SET_PDEATHSIG`) covers only the gateway's direct child; a profile's
`backend.command` may be a wrapper (`["bash", "-c", "... mlx_lm.server ..."]`, a script that starts the
server and waits), whose own children are orphaned, not killed, when the wrapper dies. So the direct child
is this small program instead, and it takes care of every descendant:

- The gateway starts it in a new session. The backend command runs as its child in that session, and so
  does everything the command starts, at any depth, unless it leaves the session on purpose.
- On Linux it is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a descendant whose parent dies (a wrapper
  killed, a daemon that detached with setsid) becomes its child instead of init's, so it stays reachable.
- Gateway death is seen as end-of-file on stdin: the gateway holds the pipe's only write end, and the
  kernel closes it however the gateway dies (SIGKILL, OOM kill, a crash). Nothing to poll, no race
  between the fork and a prctl, and it works on macOS too.
- Then, and also when the backend command itself exits, it kills what is left: every process of its
  session and every child it has (orphans it adopted), round after round until none is left (killing a
  process can orphan its children onto the guard), and exits. (Elsewhere than Linux: its process group,
  and only when the gateway is gone; the gateway kills the group when it stops or restarts a backend.)
- It exits the way the command did (the same code, or killed by the same signal), so the gateway's
  view of a crash is unchanged. Once the command runs, SIGTERM, SIGINT and SIGHUP it ignores: the gateway
  signals the whole process group to stop a backend, so the command gets them, and the guard waits for it
  to exit. (Before the fork they end the guard, which then has nothing to clean up.)
- What it cannot cover: a SIGKILL of the guard itself, by anyone, including the gateway's own SIGKILL of the
  process group (a stop past its grace period, a backend marked broken). The command then dies too (its
  parent-death signal), and so does everything still in the group, but a process that left the session is
  orphaned to init.

Its first line on stdout, right after the fork, is `SPECGATE_EVENT {"event": "spawned", "pid": N}`: the
command's pid, which the gateway reports as the backend's pid (resident memory, tests that kill it).

Stdlib only, run in isolated mode without site packages (`-I -S`): it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")
# Signals the guard must not die of: the group-wide stop is for the command.
_IGNORED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)


def _spawn(argv: list[str]) -> int:
    """Fork and exec the command; the child gets default signal dispositions and /dev/null as stdin."""
    guard = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        # Python ignores SIGPIPE (and the guard the stop signals); an exec'd program would inherit that.
        for signum in (*_IGNORED, signal.SIGPIPE, signal.SIGCHLD, getattr(signal, "SIGXFSZ", signal.SIGPIPE)):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if _LINUX:
            # Should the guard itself be SIGKILLed, its direct child goes with it.
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != guard:
                os._exit(1)
        os.execvp(argv[0], argv)
    except OSError as error:
        os.write(2, f"specgate guard: cannot run {argv[0]!r}: {error.strerror}\n".encode())
    finally:
        os._exit(127)


def _stat(pid: str) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of a process, from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything: split after its last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[3])


def _leftovers(me: int, session: int) -> list[int]:
    """Live processes of the guard's session, and the guard's children (orphans it adopted), but itself."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        stat = _stat(name)
        if stat is not None and stat[0] != "Z" and (stat[2] == session or stat[1] == me):
            found.append(int(name))
    return found


def _reap() -> dict[int, int]:
    """Collect every exited child (without blocking): pid -> wait status."""
    statuses: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        statuses[pid] = status


def _sweep(gateway_gone: bool) -> None:
    """SIGKILL everything the backend left behind, until nothing is left."""
    if not _LINUX:
        # No /proc and no subreaper: the guard's process group, which the command's processes share unless
        # they left it. Killing it kills the guard too, so only when the gateway is gone; otherwise the
        # gateway kills the group after the guard exits, as it stops or restarts the backend.
        if gateway_gone:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        return
    me, session = os.getpid(), os.getsid(0)
    for _ in range(1000):  # each round can only uncover the children of what it killed
        victims = _leftovers(me, session)
        if not victims:
            _reap()
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)  # let the kernel reparent their orphans onto the guard
        _reap()


def _exit_like(status: int) -> None:
    """End the guard the way the command ended: its exit code, or death by its signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str]) -> None:
    if not argv:
        sys.stderr.write("usage: guard.py COMMAND [ARGS...]\n")
        os._exit(2)
    # SIGCHLD wakes the select below through the wake-up fd; the handler itself does nothing.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    if _LINUX:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    child = _spawn(argv)
    # Only now: a stop signal that comes before the fork ends the guard, which has nothing to clean up yet (and
    # none is lost: ignored before the fork, it would have reached no command); one that comes after reaches
    # the command through the process group, and the guard waits for the command to exit.
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    os.write(1, f"SPECGATE_EVENT {json.dumps({'event': 'spawned', 'pid': child})}\n".encode())
    while True:
        try:
            readable, _, _ = select.select([0, wake_read], [], [])
        except InterruptedError:
            readable = []
        if 0 in readable and not os.read(0, 4096):
            _sweep(gateway_gone=True)  # end of file: the gateway is gone
            os._exit(1)
        if wake_read in readable:
            os.read(wake_read, 4096)
        status = _reap().get(child)
        if status is not None:
            _sweep(gateway_gone=False)
            _exit_like(status)


if __name__ == "__main__":
    main(sys.argv[1:])
