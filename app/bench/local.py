"""A gateway of our own on loopback, with backends that need no downloads: for the overhead run.

Two profiles: `tiny`, a real backend (specgate's launcher on a tiny random-weight model generated on
the spot, about 1000 tokens/sec on a CPU), and `instant`, the fake backend in its instant mode (no token
delay, many requests at once), which isolates what the gateway itself costs per request and per chunk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app.bench.client import BenchError

TINY = "tiny"
INSTANT = "instant"
REAL = "real"
# The most requests the instant profile lets through at once: above the highest concurrency measured.
INSTANT_CONCURRENCY = 32


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def profiles_text(model_dir: Path, real_model: str | None = None) -> str:
    fake = [sys.executable, "-m", "app.testing.fake_backend"]
    real = (
        ""
        if real_model is None
        else f"""
[profiles."{REAL}"]
model = {json.dumps(real_model)}
ttl = 0
"""
    )
    return (
        real
        + f"""
[profiles."{TINY}"]
model = {json.dumps(str(model_dir))}
ttl = 0

[profiles."{INSTANT}"]
# The fake backend ignores the model; the path only has to exist for the gateway to start it.
model = {json.dumps(str(model_dir))}
ttl = 0
max_queue = 1024
backend = {{ command = {_toml_list(fake)}, max_concurrency = {INSTANT_CONCURRENCY} }}
"""
    )


@dataclass
class LocalGateway:
    url: str
    backend_ports: dict[str, int]
    log_path: Path
    pid: int
    relay_ports: dict[str, int] = field(default_factory=dict)


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the gateway exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"the gateway did not answer /health within {timeout:.0f}s; its log: {log}")


def _start_backend(url: str, profile: str) -> int:
    """One request starts the profile's backend; its port comes from /v1/models."""
    body = {"model": profile, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    # A real model loads its weights first (seconds to minutes on a CPU).
    timeout = 900.0 if profile == REAL else 120.0
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, trust_env=False)
    if response.status_code != 200:
        raise BenchError(f"profile {profile} did not answer: HTTP {response.status_code} {response.text[:500]}")
    info = httpx.get(f"{url}/v1/models/{profile}", timeout=10.0, trust_env=False).json()
    return int(info["backend"]["port"])


def _start_relay(upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """A bare byte relay (app/bench/tcp_relay.py) in front of a backend: the floor of any proxy hop."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app.bench.tcp_relay", str(port), str(upstream_port)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the bare relay exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return process, port
        time.sleep(0.05)
    process.kill()
    raise BenchError("the bare relay did not listen within 30s")


@contextlib.contextmanager
def local_gateway(
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    real_model: str | None = None,
    relays: bool = False,
) -> Iterator[LocalGateway]:
    """Start `specgate serve` with the tiny and instant profiles; stop it (and its backends) on exit.

    `real_model` (a profile's model value: `catalog:NAME`, a directory, `gguf:PATH`) adds a profile of
    that model, read from the user's model store, which must already hold it (nothing is downloaded
    here). `relays` puts a bare byte relay in front of the tiny and instant backends as well (the real
    model's phase measures no floor).
    """
    from app.settings import default_model_store
    from app.testing.tiny_model import write_model

    with tempfile.TemporaryDirectory(prefix="specgate-overhead-") as scratch:
        root = Path(workdir or scratch)
        model_dir = write_model(root / "tiny-model")
        profiles_dir = root / "profiles"
        profiles_dir.mkdir(parents=True, exist_ok=True)
        (profiles_dir / "overhead.toml").write_text(profiles_text(model_dir, real_model))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = root / "gateway.log"
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--profiles-dir", str(profiles_dir)]
        # The tiny model is a directory; only a real model needs the user's store.
        store = os.environ.get("SPECGATE_MODEL_STORE", str(default_model_store())) if real_model else root / "store"
        backends = 3 if real_model else 2
        environment = {**os.environ, "SPECGATE_MODEL_STORE": str(store), "SPECGATE_MAX_BACKENDS": str(backends)}
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*command, "--no-prepare"],
                env={**environment, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        relay_processes: list[subprocess.Popen[bytes]] = []
        try:
            _wait_healthy(url, process, log_path, 60.0)
            names = [TINY, INSTANT] + ([REAL] if real_model else [])
            ports = {name: _start_backend(url, name) for name in names}
            relay_ports = {}
            for name in (TINY, INSTANT) if relays else ():
                relay, relay_ports[name] = _start_relay(ports[name])
                relay_processes.append(relay)
            yield LocalGateway(url, ports, log_path, process.pid, relay_ports)
        finally:
            for relay in relay_processes:
                relay.kill()
                relay.wait()
            _stop(process)


@contextlib.contextmanager
def serve(profiles_dir: Path, log_path: Path, env: dict[str, str]) -> Iterator[str]:
    """`specgate serve` on a free loopback port with `profiles_dir` and `env` on top of ours; yields its URL
    once healthy, and stops it (and so its backends) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--profiles-dir", str(profiles_dir)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*command, "--no-prepare"],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, process, log_path, 60.0)
        yield url
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
