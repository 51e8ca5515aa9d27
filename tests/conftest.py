"""Shared pytest fixtures. Each group is owned by the part of the project it serves; keep them apart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.blas import plan as blas_plan
from app.blas import validate_value as validate_blas

# ---------------------------------------------------------------------------------------------------
# Launcher group (app/launcher): a tiny main/draft pair and real `python -m app.launcher` processes.
# ---------------------------------------------------------------------------------------------------

# Extra flags for every launcher the fixtures start. Diagnostics only: with "--no-cache-fixes" the
# exactness tests in tests/test_launcher.py show what bugs B1 and B2 do without the launcher's fixes.
LAUNCHER_FLAGS_ENV = "SPECGATE_TEST_LAUNCHER_FLAGS"


@dataclass(frozen=True)
class TinyPair:
    """A generated main model and its noisy draft (app/testing/tiny_model.py)."""

    main: Path
    draft: Path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    from app.testing.tiny_model import write_pair

    main, draft = write_pair(tmp_path_factory.mktemp("tiny-pair"), noise=0.02)
    return TinyPair(main=main, draft=draft)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LauncherProcess:
    """One `python -m app.launcher` process on a loopback port, in its own process session."""

    args: list[str]
    workdir: Path
    port: int = field(default_factory=free_loopback_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"launcher-{self.port}.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"launcher-{self.port}.err"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def start(self) -> LauncherProcess:
        command = [sys.executable, "-m", "app.launcher", *self.args]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        command += os.environ.get(LAUNCHER_FLAGS_ENV, "").split()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        # The BLAS a user's backend gets (SPECGATE_BLAS, default auto): the exactness tests run on it.
        blas_plan(validate_blas(os.environ.get("SPECGATE_BLAS", "auto"))).apply(env)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env=env,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> LauncherProcess:
        """Wait until a 1-token completion succeeds (the gateway's readiness check)."""
        deadline = time.monotonic() + timeout
        probe = {"prompt": "hi", "max_tokens": 1, "stream": False, "model": "default_model"}
        while time.monotonic() < deadline:
            self._fail_if_exited()
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(f"{self.base_url}/v1/completions", json=probe, timeout=5.0)
                if response.status_code == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"launcher not ready after {timeout}s; stderr:\n{self.stderr()[-3000:]}")

    def _fail_if_exited(self) -> None:
        assert self.process is not None, "start() first"
        if self.process.poll() is not None:
            raise AssertionError(f"launcher exited with {self.process.returncode}; stderr:\n{self.stderr()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5.0)


class LauncherFactory:
    """Starts launchers and stops every one of them at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[LauncherProcess] = []

    def start(self, *args: str) -> LauncherProcess:
        """Start without waiting: start several, then `wait_ready` each, to overlap their start-up."""
        launcher = LauncherProcess(args=list(args), workdir=self.workdir).start()
        self.started.append(launcher)
        return launcher

    def ready(self, *args: str, timeout: float = 60.0) -> LauncherProcess:
        return self.start(*args).wait_ready(timeout)

    def stop_all(self) -> None:
        for launcher in self.started:
            launcher.stop()


@pytest.fixture(scope="session")
def launcher_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LauncherFactory]:
    factory = LauncherFactory(tmp_path_factory.mktemp("launchers"))
    try:
        yield factory
    finally:
        factory.stop_all()


# --------------------------------------------------------------------------------- end launcher group
