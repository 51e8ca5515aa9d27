"""Change without downtime (SIGHUP / file-change reload) and shutdown (SIGTERM drain), on real processes.

Real tiny-model backends serve the profiles that stay; the profile whose request must be in flight
while the gateway reloads or stops is the fake backend with slow tokens (a few seconds a request).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import (
    FAKE_BACKEND,
    GatewayProcess,
    chat,
    fake_model_dir,
    pid_alive,
    read_sse,
    running_gateway,
    toml_list,
    wait_for,
)


def real(name: str, model: Path, draft: Path | None = None) -> str:
    text = f'[profiles."{name}"]\nmodel = "{model}"\nsampling = {{ temperature = 0.0 }}\n'
    if draft is not None:
        text += f'draft_model = "{draft}"\nnum_draft_tokens = 3\n'
    return text + "\n"


def slow(name: str, model_dir: Path, delay: str = "0.05") -> str:
    command = toml_list([*FAKE_BACKEND, "--token-delay", delay])
    return f'[profiles."{name}"]\nmodel = "{model_dir}"\nbackend = {{ command = {command} }}\n\n'


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    return fake_model_dir(tmp_path)


def events_ok(events: list[tuple[float, object]]) -> None:
    assert events[-1][1] == "[DONE]", events[-3:]
    assert not any(isinstance(event, dict) and "error" in event for _, event in events)


def test_sighup_reload_adds_removes_and_keeps_in_flight(tiny_pair: TinyPair, fake_dir: Path, tmp_path: Path) -> None:
    profiles = real("a", tiny_pair.main) + slow("old", fake_dir)
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        body = chat("one two three", "old", max_tokens=60, stream=True)  # ~3 s of tokens
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            first = [next(events)]
            old_pid = gateway.backend_pid("old")
            assert old_pid is not None
            (gateway.profiles_dir / "test.toml").write_text(
                real("a", tiny_pair.main) + real("new", tiny_pair.main, tiny_pair.draft)
            )
            gateway.signal(signal.SIGHUP)
            wait_for(lambda: "profiles reloaded" in gateway.log(), 10, "the reload")
            assert set(gateway.models()) == {"a", "new"}
            gone = client.post("/v1/chat/completions", json=chat("hi", "old", max_tokens=2))
            assert gone.status_code == 404
            assert pid_alive(old_pid), "the removed profile's backend stopped before its request finished"
            rest = first + list(events)
        events_ok(rest)
        wait_for(lambda: not pid_alive(old_pid), 10, "the drained backend to stop")
        assert client.post("/v1/chat/completions", json=chat("hi", "new", max_tokens=4)).status_code == 200

        # An invalid file is rejected with its error in the log; the running profiles stay.
        (gateway.profiles_dir / "broken.toml").write_text('[profiles."x"]\nmodel = 3\n')
        gateway.signal(signal.SIGHUP)
        wait_for(lambda: "rejected" in gateway.log(), 10, "the rejection")
        rejection = next(line for line in gateway.log().splitlines() if "rejected" in line)
        assert "broken.toml" in rejection
        assert set(gateway.models()) == {"a", "new"}
        assert client.post("/v1/chat/completions", json=chat("hi", "a", max_tokens=2)).status_code == 200
        assert gateway.process is not None
        assert gateway.process.poll() is None


def test_profiles_reload_on_file_change_when_enabled(tiny_pair: TinyPair, tmp_path: Path) -> None:
    env = {"SPECGATE_RELOAD_ON_CHANGE": "true", "SPECGATE_RELOAD_POLL_SECONDS": "0.2"}
    with running_gateway(tmp_path / "gw", real("a", tiny_pair.main), env) as gateway:
        (gateway.profiles_dir / "more.toml").write_text(real("b", tiny_pair.main))
        wait_for(lambda: set(gateway.models()) == {"a", "b"}, 10, "the new profile to appear")
        with gateway.client() as client:
            assert client.post("/v1/chat/completions", json=chat("hi", "b", max_tokens=2)).status_code == 200


def port_free(port: int) -> bool:
    """Bindable as the gateway binds (SO_REUSEADDR: connections left in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_in_flight_then_stops_everything(fake_dir: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path / "gw", slow("slow", fake_dir), {"SPECGATE_SHUTDOWN_GRACE": "20"}).start()
    try:
        with gateway.client() as client:
            body = chat("one two three", "slow", max_tokens=40, stream=True)  # ~2 s of tokens
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                events = read_sse(reply)
                first = [next(events)]
                pid = gateway.backend_pid("slow")
                assert pid is not None
                gateway.signal(signal.SIGTERM)
                # New connections are refused at once: the listening socket is closed first.
                wait_for(lambda: refuses(gateway.port), 5, "the gateway to stop accepting connections")
                rest = first + list(events)
        events_ok(rest)
        assert gateway.process is not None
        assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert not pid_alive(pid)
        assert port_free(gateway.port)
    finally:
        gateway.stop()


def test_sigterm_grace_period_bounds_the_wait(fake_dir: Path, tmp_path: Path) -> None:
    env = {"SPECGATE_SHUTDOWN_GRACE": "1"}
    gateway = GatewayProcess(tmp_path / "gw", slow("slow", fake_dir, delay="0.1"), env).start()
    try:
        body = chat("one two three", "slow", max_tokens=400, stream=True)  # 40 s of tokens
        with (
            httpx.Client(base_url=gateway.url, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as reply,
        ):
            events = read_sse(reply)
            next(events)
            pid = gateway.backend_pid("slow")
            assert pid is not None
            gateway.signal(signal.SIGTERM)
            signalled = time.monotonic()
            # The stream is cut when the grace period ends (the client sees it end early).
            try:
                for _ in events:
                    pass
            except httpx.HTTPError:
                pass
        assert gateway.process is not None
        assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM)
        took = time.monotonic() - signalled
        assert took < 15, f"shutdown took {took:.1f}s with a 1 s grace period"
        wait_for(lambda: not pid_alive(pid), 5, "the backend to stop")
        assert port_free(gateway.port)
        assert os.path.exists(gateway.log_path)
    finally:
        gateway.stop()
