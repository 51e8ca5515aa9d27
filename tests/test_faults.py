"""Backend faults and clients that go away, against a real gateway in front of the fake backend program.

The fake backend (app/testing/fake_backend.py) is a real HTTP server process with failure modes (slow
tokens, hang, refuse to start) and the launcher's `/specgate/stats` counters, which show from the
backend's own side whether generation stopped. Kills are real SIGKILLs of the backend process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import (
    PYTHON,
    GatewayProcess,
    backend_stats,
    chat,
    fake_model_dir,
    fake_profile,
    read_sse,
    running_gateway,
    toml_list,
    wait_for,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return fake_model_dir(tmp_path)


def stable_tokens(gateway: GatewayProcess, profile: str, within: float) -> int:
    """Wait until the backend has no active request; return its token count, checked to stay put."""
    wait_for(lambda: backend_stats(gateway, profile)["active_requests"] == 0, within, "the backend to stop generating")
    first = backend_stats(gateway, profile)["tokens_generated"]
    time.sleep(0.3)
    assert backend_stats(gateway, profile)["tokens_generated"] == first, "the backend kept generating"
    return first


# ----- backend faults --------------------------------------------------------------------------------------


def test_sigkill_mid_stream_ends_with_an_error_event_then_restarts(model_dir: Path, tmp_path: Path) -> None:
    profiles = fake_profile("slow", model_dir, "--token-delay", "0.05")
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        body = chat("one two three four", "slow", max_tokens=200, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            events = read_sse(reply)
            next(events)  # generation is under way
            pid = gateway.backend_pid("slow")
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rest = list(events)  # the stream must end by itself
            ended_at = time.monotonic()
        errors = [event for _, event in rest if isinstance(event, dict) and "error" in event]
        assert len(errors) == 1, rest[-3:]
        assert errors[0]["error"]["code"] == "backend_died"
        assert ended_at - killed_at < 1.0, f"the stream took {ended_at - killed_at:.2f}s to end after the kill"
        # The next request restarts the backend and succeeds.
        again = client.post("/v1/chat/completions", json=chat("hi there", "slow", max_tokens=4))
        assert again.status_code == 200, again.text
        assert gateway.backend_pid("slow") not in (None, pid)


def test_sigkill_during_a_non_streaming_answer_is_502(model_dir: Path, tmp_path: Path) -> None:
    profiles = fake_profile("slow", model_dir, "--token-delay", "0.05")
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "slow", max_tokens=2)).status_code == 200
        answers: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/chat/completions", json=chat("a long answer", "slow", max_tokens=200))
            )
        )
        worker.start()
        wait_for(lambda: backend_stats(gateway, "slow")["active_requests"] == 1, 10, "generation to start")
        pid = gateway.backend_pid("slow")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        worker.join(10)
        assert answers, "the non-streaming client got no answer"
        assert answers[0].status_code == 502, answers[0].text
        assert answers[0].json()["error"]["code"] == "backend_died"
        assert client.post("/v1/chat/completions", json=chat("hi", "slow", max_tokens=2)).status_code == 200


def test_a_stalled_backend_hits_the_inactivity_timeout(model_dir: Path, tmp_path: Path) -> None:
    profiles = fake_profile("stall", model_dir, "--hang-after-tokens", "3")
    env = {"SPECGATE_INACTIVITY_TIMEOUT": "1"}
    with running_gateway(tmp_path / "gw", profiles, env) as gateway, gateway.client() as client:
        body = chat("one two three four five six", "stall", max_tokens=50, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = list(read_sse(reply))
        errors = [event for _, event in events if isinstance(event, dict) and "error" in event]
        assert len(errors) == 1
        error = errors[0]["error"]
        assert error["code"] == "backend_timeout"
        assert "sent nothing for 1s" in error["message"], error["message"]
        reply = client.post("/v1/chat/completions", json=chat("one two three four five six", "stall", max_tokens=50))
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "backend_timeout"


# A backend whose port is taken: this wrapper holds the --port it is given, then runs the fake backend
# on it, which fails to bind exactly as mlx_lm.server would.
PORT_THIEF = (
    "import runpy, socket, sys; "
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1]))); s.listen(); "
    "sys.argv = ['fake_backend', *sys.argv[1:]]; runpy.run_module('app.testing.fake_backend', run_name='__main__')"
)


def test_port_clash_is_503_with_the_reason_and_others_keep_serving(model_dir: Path, tmp_path: Path) -> None:
    command = toml_list([PYTHON, "-c", PORT_THIEF])
    clash = f'[profiles."clash"]\nmodel = "{model_dir}"\nbackend = {{ command = {command} }}\n\n'
    profiles = clash + fake_profile("good", model_dir, "--token-delay", "0")
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        reply = client.post("/v1/chat/completions", json=chat("hi", "clash", max_tokens=2))
        assert reply.status_code == 503, reply.text
        message = reply.json()["error"]["message"]
        assert "address already in use" in message.lower(), message
        assert client.post("/v1/chat/completions", json=chat("hi", "good", max_tokens=2)).status_code == 200
        assert gateway.models()["clash"]["state"] == "failed"


def test_a_crash_loop_backs_off_and_says_so(model_dir: Path, tmp_path: Path) -> None:
    profiles = fake_profile("broken", model_dir, "--fail-start")
    env = {"SPECGATE_RESTART_BACKOFF_INITIAL": "30"}
    with running_gateway(tmp_path / "gw", profiles, env) as gateway, gateway.client() as client:
        for _ in range(2):  # the first failure retries at once; the second starts the back-off
            reply = client.post("/v1/chat/completions", json=chat("hi", "broken", max_tokens=2))
            assert reply.status_code == 503
            assert reply.json()["error"]["code"] == "backend_start_failed"
        started = time.monotonic()
        held_back = client.post("/v1/chat/completions", json=chat("hi", "broken", max_tokens=2))
        assert time.monotonic() - started < 5, "the back-off should refuse at once, not try to start again"
        assert held_back.status_code == 503
        assert "next restart in" in held_back.json()["error"]["message"]
        assert int(held_back.headers["retry-after"]) >= 20
        entry = gateway.models()["broken"]
        assert entry["state"] == "failed"
        assert entry["backend"]["consecutive_failures"] == 2
        assert entry["backend"]["retry_in"] > 20
        assert entry["backend"]["crash_loop"] is True
        assert "crash loop" in gateway.log()


# ----- clients that go away -------------------------------------------------------------------------------


@pytest.fixture
def slow_gateway(model_dir: Path, tmp_path: Path) -> Iterator[GatewayProcess]:
    # 20 ms a token: 400 tokens would take 8 s; one request at a time (max_concurrency 1, the default).
    with running_gateway(tmp_path / "gw", fake_profile("slow", model_dir, "--token-delay", "0.02")) as gateway:
        with gateway.client() as client:
            assert client.post("/v1/chat/completions", json=chat("warm", "slow", max_tokens=1)).status_code == 200
        yield gateway


def test_stream_disconnect_stops_the_backend_within_a_second(slow_gateway: GatewayProcess) -> None:
    before = backend_stats(slow_gateway, "slow")["tokens_generated"]
    with slow_gateway.client() as client:
        body = chat("a long story", "slow", max_tokens=400, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            for _ in range(5):
                next(events)
        left_at = time.monotonic()
    tokens = stable_tokens(slow_gateway, "slow", within=1.0) - before
    assert time.monotonic() - left_at < 2.0
    # 1 s at 20 ms a token is at most ~50 more tokens; far fewer than the 400 asked for.
    assert tokens < 60, f"the backend generated {tokens} tokens for a client that left"


def test_non_streaming_disconnect_stops_the_backend(slow_gateway: GatewayProcess) -> None:
    before = backend_stats(slow_gateway, "slow")["tokens_generated"]
    with slow_gateway.client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=chat("a long story", "slow", max_tokens=400))
    tokens = stable_tokens(slow_gateway, "slow", within=1.5) - before
    assert tokens < 100, f"the backend generated {tokens} tokens for a client that left"


def test_next_queued_request_starts_when_the_client_ahead_leaves(slow_gateway: GatewayProcess) -> None:
    started_before = backend_stats(slow_gateway, "slow")["requests_started"]
    answers: list[httpx.Response] = []
    with slow_gateway.client() as client:
        body = chat("a long story", "slow", max_tokens=400, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            next(events)
            waiter = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(
                        f"{slow_gateway.url}/v1/chat/completions", json=chat("short", "slow", max_tokens=3), timeout=30
                    )
                )
            )
            waiter.start()
            wait_for(lambda: slow_gateway.models()["slow"]["backend"]["waiting"] == 1, 5, "the second to queue")
        left_at = time.monotonic()
        waiter.join(10)
    assert answers
    assert answers[0].status_code == 200
    # The queued request ran long before the departed one's 400 tokens (8 s) could have finished.
    assert time.monotonic() - left_at < 4.0
    assert backend_stats(slow_gateway, "slow")["requests_started"] == started_before + 2


def test_a_queued_request_whose_client_left_is_dropped(slow_gateway: GatewayProcess) -> None:
    started_before = backend_stats(slow_gateway, "slow")["requests_started"]
    with slow_gateway.client() as client:
        body = chat("a story", "slow", max_tokens=100, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            next(events)
            with httpx.Client(base_url=slow_gateway.url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/chat/completions", json=chat("gone", "slow", max_tokens=3))
            wait_for(lambda: slow_gateway.models()["slow"]["backend"]["waiting"] == 0, 3, "the queue to drop it")
            rest = list(events)
        assert rest[-1][1] == "[DONE]"
    wait_for(lambda: backend_stats(slow_gateway, "slow")["active_requests"] == 0, 5, "the backend to finish")
    # Only the request that stayed ever reached the backend.
    assert backend_stats(slow_gateway, "slow")["requests_started"] == started_before + 1


def test_disconnect_stops_the_real_launcher(tiny_pair: TinyPair, tmp_path: Path) -> None:
    """The same, shown by specgate's launcher (mlx_lm.server) on the tiny pair: its own token counter stops."""
    profiles = (
        f'[profiles."spec"]\nmodel = "{tiny_pair.main}"\ndraft_model = "{tiny_pair.draft}"\nnum_draft_tokens = 3\n'
        "sampling = { temperature = 0.0 }\n"
    )
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        # Left alone, this prompt runs to the token limit (no early end of sequence): a low count below means
        # the disconnect stopped it.
        full = client.post("/v1/chat/completions", json=chat("Tell me a very long story.", "spec", max_tokens=150))
        assert full.json()["usage"]["completion_tokens"] == 150
        before = backend_stats(gateway, "spec")["tokens_generated"]
        body = chat("Tell me a very long story.", "spec", max_tokens=3500, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            for _ in range(3):
                next(events)
        generated = stable_tokens(gateway, "spec", within=1.0) - before
        stats = backend_stats(gateway, "spec")
        assert stats["requests_finished"] == stats["requests_started"]
        print(f"the launcher generated {generated} of 3500 tokens for a client that left after 3 events")
        assert generated < 1000
