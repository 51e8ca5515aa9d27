"""Real processes for tests: a gateway started as `specgate serve` on a loopback port.

Everything here starts real programs and waits on conditions with deadlines, never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
LAUNCHER = [PYTHON, "-m", "app.launcher"]
FAKE_BACKEND = [PYTHON, "-m", "app.testing.fake_backend"]
# How Python prints a warning to stderr; the gateway's log lines start with a time instead.
_WARNING_LINE = re.compile(r"\S+:\d+: ResourceWarning: ")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as error:  # the condition may fail while the thing starts up
            last_error = error
        else:
            if result:
                return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def fake_model_dir(parent: Path, name: str = "fake-model") -> Path:
    """A model directory for the fake backend: it loads nothing, but the gateway checks the directory is there."""
    directory = parent / name
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def fake_profile(name: str, model_dir: Path, *flags: str, **fields: Any) -> str:
    """One profile served by the fake backend program with `flags`; `fields` are written as TOML as given."""
    lines = [
        f'[profiles."{name}"]',
        f'model = "{model_dir}"',
        f"backend = {{ command = {toml_list([*FAKE_BACKEND, *flags])} }}",
    ]
    lines += [f"{key} = {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n\n"


class GatewayProcess:
    """`specgate serve` in its own process, on a free loopback port, with profiles from text."""

    def __init__(self, workdir: Path, profiles: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.profiles_dir = workdir / "profiles"
        self.profiles_dir.mkdir(parents=True, exist_ok=True)
        (self.profiles_dir / "test.toml").write_text(profiles)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "gateway.log"
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "SPECGATE_MODEL_STORE": str(workdir / "store"),
            "SPECGATE_BACKEND_STOP_GRACE": "2",
            "SPECGATE_BACKEND_START_TIMEOUT": "60",
            # Python prints every unclosed socket or file it finalizes; running_gateway fails on the gateway's.
            "PYTHONWARNINGS": "always::ResourceWarning",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "app.cli", "serve", "--port", str(self.port), "--profiles-dir", str(self.profiles_dir)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._healthy, timeout, f"gateway on {self.url} ({self.log()[-2000:]})")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"gateway exited with {self.process.returncode}: {self.log()[-3000:]}")
        return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def resource_warnings(self) -> list[str]:
        """Unclosed sockets and files the gateway process reported: Python's own warning lines
        (`file:line: ResourceWarning: ...`), not log lines that quote a backend's output."""
        return [line for line in self.log().splitlines() if _WARNING_LINE.match(line)]

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        data = httpx.get(f"{self.url}/v1/models", timeout=5.0).json()["data"]
        return {item["id"]: item for item in data}

    def backend_pid(self, profile: str) -> int | None:
        pid = self.models()[profile]["backend"]["pid"]
        return int(pid) if pid is not None else None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@contextlib.contextmanager
def running_gateway(workdir: Path, profiles: str, env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(workdir, profiles, env).start()
    try:
        yield gateway
    finally:
        gateway.stop()
    # Read after the process ended: what it leaked is reported when it is collected, at exit at the latest.
    leaks = gateway.resource_warnings()
    assert not leaks, "the gateway leaked:\n" + "\n".join(leaks)


def backend_stats(gateway: GatewayProcess, profile: str) -> dict[str, Any]:
    """The backend's own counters (`GET /specgate/stats` of the launcher or the fake backend)."""
    port = gateway.models()[profile]["backend"]["port"]
    stats: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/specgate/stats", timeout=2).json()
    return stats


def chat(content: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def read_sse(response: httpx.Response) -> Iterator[tuple[float, dict[str, Any] | str]]:
    """Yield (arrival time, parsed data) for each SSE event; '[DONE]' as the string."""
    import json

    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        yield time.monotonic(), payload if payload == "[DONE]" else json.loads(payload)


def stream_text(events: list[tuple[float, dict[str, Any] | str]]) -> str:
    parts = []
    for _, event in events:
        if isinstance(event, dict):
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                parts.append(delta.get("content") or choice.get("text") or "")
    return "".join(parts)
