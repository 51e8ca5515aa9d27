"""Backend faults and clients that go away, against a real gateway in front of the fake backend program.

The fake backend (app/testing/fake_backend.py) is a real HTTP server process with failure modes (slow
tokens, hang, refuse to start) and the launcher's `/specgate/stats` counters, which show from the
backend's own side whether generation stopped. Kills are real SIGKILLs of the backend process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import (
    FAKE_BACKEND,
    PYTHON,
    GatewayProcess,
    backend_stats,
    chat,
    fake_model_dir,
    fake_profile,
    pid_alive,
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


# ----- clients that stop reading (issue 19 item 7) -------------------------------------------------------

WRITE_TIMEOUT_ENV = {"SPECGATE_CLIENT_WRITE_TIMEOUT": "1"}


def open_stalled_stream(gateway: GatewayProcess, body: dict[str, Any], read_first: int = 0) -> socket.socket:
    """A streaming client that reads the headers (and `read_first` bytes more), then reads nothing, but stays
    connected. Its receive buffer is small, so the gateway's writes back up soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.connect(("127.0.0.1", gateway.port))
    payload = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    received = b""
    while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < read_first:
        chunk = sock.recv(4096)
        assert chunk, f"the gateway closed the connection early: {received[:300]!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Read what is buffered; True once the connection ends (reset or end of file) within `within` s."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def slot_counts(gateway: GatewayProcess, profile: str) -> tuple[int, int]:
    backend = gateway.models()[profile]["backend"]
    return backend["running"], backend["waiting"]


@pytest.mark.parametrize("cors", [False, True], ids=["no-cors", "cors"])
@pytest.mark.parametrize("read_first", [0, 20_000], ids=["after-headers", "mid-stream"])
def test_a_client_that_stops_reading_is_cut_off_and_frees_the_backend(
    model_dir: Path, tmp_path: Path, cors: bool, read_first: int
) -> None:
    # An instant backend that would stream 300k tokens: only the write timeout can end this request early.
    env = {**WRITE_TIMEOUT_ENV, **({"SPECGATE_CORS_ORIGINS": "http://example.test"} if cors else {})}
    with running_gateway(tmp_path / "gw", fake_profile("fast", model_dir), env) as gateway, gateway.client() as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "fast", max_tokens=1)).status_code == 200
        body = chat("never read", "fast", max_tokens=300_000, stream=True)
        with open_stalled_stream(gateway, body, read_first) as stalled:
            wait_for(lambda: slot_counts(gateway, "fast")[0] == 1, 10, "the stalled stream to hold the slot")
            # A request that queues behind it gets the backend once the stalled client is cut off.
            queued = client.post("/v1/chat/completions", json=chat("next in line", "fast", max_tokens=5), timeout=30)
            assert queued.status_code == 200, queued.text
            assert queued.json()["choices"][0]["message"]["content"] == "echo next in line t4"
            assert slot_counts(gateway, "fast") == (0, 0)
            # The backend stopped generating for it (its upstream socket was closed) ...
            stats = backend_stats(gateway, "fast")
            assert stats["requests_disconnected"] == 1
            assert stats["tokens_generated"] < 300_000
            stable_tokens(gateway, "fast", within=5)
            # ... and its own connection was closed by the gateway, not left open.
            assert closed_by_peer(stalled, within=10), "the gateway left the stalled connection open"
        assert "closed a connection: the client read nothing for 1s" in gateway.log()
        recent = httpx.get(f"{gateway.url}/status.json", timeout=5).json()["requests"]
        assert [r["outcome"] for r in recent if r["streaming"]] == ["client_gone"]


def test_a_slow_reader_is_not_cut_off(model_dir: Path, tmp_path: Path) -> None:
    """The bound is on a send that waits, not on the stream: a client that keeps reading, slowly, gets it all."""
    with running_gateway(tmp_path / "gw", fake_profile("fast", model_dir), WRITE_TIMEOUT_ENV) as gateway:
        body = chat("read slowly", "fast", max_tokens=4000, stream=True)
        with gateway.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = []
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) % 500 == 0:
                        time.sleep(0.5)  # buffers fill meanwhile; each pause is shorter than the timeout
        assert events[-1] == "data: [DONE]"
        assert "the client read nothing" not in gateway.log()


# ----- backends that never send their response head (issue 19 item 6) --------------------------------------

# A short head bound for the tests; the first-token bound stays long, so only the head bound can fire.
HEAD_ENV = {"SPECGATE_HEAD_TIMEOUT": "1", "SPECGATE_FIRST_TOKEN_TIMEOUT": "120"}


def concurrent_fake_profile(name: str, model_dir: Path, concurrency: int, *flags: str) -> str:
    command = toml_list([*FAKE_BACKEND, *flags])
    return (
        f'[profiles."{name}"]\nmodel = "{model_dir}"\nmax_queue = 100\n'
        f"backend = {{ command = {command}, max_concurrency = {concurrency} }}\n\n"
    )


def in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()))
    thread.start()
    return thread, answers


def streamed_error(gateway: GatewayProcess, body: dict[str, Any]) -> dict[str, Any]:
    """The error event that ends a streamed request (its headers came at admission)."""
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        events = list(read_sse(reply))
    errors = [event for _, event in events if isinstance(event, dict) and "error" in event]
    assert len(errors) == 1, events[-3:]
    error: dict[str, Any] = errors[0]["error"]
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("hang", ["--hang-before-headers-on", "--hang-in-headers-on"])
def test_a_backend_hung_before_its_head_is_timed_out_and_restarted(
    model_dir: Path, tmp_path: Path, hang: str, stream: bool
) -> None:
    """The request that finds the backend hung gets 504 (an error event once streaming); the backend is restarted,
    so the requests queued behind it (and later ones) are served instead of hanging on it too."""
    profiles = fake_profile("wedge", model_dir, hang, "freeze")
    with running_gateway(tmp_path / "gw", profiles, HEAD_ENV) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "wedge", max_tokens=2)).status_code == 200
        pid = gateway.backend_pid("wedge")
        errors: list[dict[str, Any]] = []

        def wedge() -> None:
            body = chat("please freeze", "wedge", max_tokens=3, stream=stream)
            if stream:
                errors.append(streamed_error(gateway, body))
                return
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 504, reply.text
            errors.append(reply.json()["error"])

        hung = threading.Thread(target=wedge)
        hung.start()
        wait_for(lambda: slot_counts(gateway, "wedge") == (1, 0), 10, "the wedging request to be sent")
        queued = [
            in_thread(lambda n=n: client.post("/v1/chat/completions", json=chat(f"q{n}", "wedge", max_tokens=3)))
            for n in range(2)
        ]
        wait_for(lambda: slot_counts(gateway, "wedge") == (1, 2), 10, "two requests to queue behind it")
        hung.join(30)
        assert errors, "the wedging request got no answer"
        assert errors[0]["code"] == "backend_timeout"
        assert "is being restarted" in errors[0]["message"]
        for n, (thread, answer) in enumerate(queued):
            thread.join(30)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json()["choices"][0]["message"]["content"] == f"echo q{n} t2"
        assert gateway.backend_pid("wedge") not in (None, pid)
        assert pid is not None
        assert not pid_alive(pid)
        assert "marked broken: no response head for 1s" in gateway.log()


def test_a_stopped_backend_process_is_timed_out_and_restarted(model_dir: Path, tmp_path: Path) -> None:
    """SIGSTOP: the kernel still accepts the connection and the request, and nothing ever answers."""
    profiles = fake_profile("frozen", model_dir)
    with running_gateway(tmp_path / "gw", profiles, HEAD_ENV) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "frozen", max_tokens=2)).status_code == 200
        pid = gateway.backend_pid("frozen")
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            reply = client.post("/v1/chat/completions", json=chat("anyone there", "frozen", max_tokens=3))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "backend_timeout"
        again = client.post("/v1/chat/completions", json=chat("hello again", "frozen", max_tokens=3))
        assert again.status_code == 200, again.text
        assert gateway.backend_pid("frozen") not in (None, pid)
        entry = gateway.models()["frozen"]["backend"]
        assert (entry["restarts"], entry["consecutive_failures"]) == (1, 0)


def test_a_backend_busy_answering_others_is_waited_for_not_restarted(model_dir: Path, tmp_path: Path) -> None:
    """mlx_lm.server can hold a request's head while it serves others (a batch drained before a request it cannot
    batch); the serial fake does the same. Its stream to the others shows it alive: no 504, no restart."""
    profiles = concurrent_fake_profile("busy", model_dir, 2, "--serial", "--token-delay", "0.05")
    with running_gateway(tmp_path / "gw", profiles, HEAD_ENV) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "busy", max_tokens=2)).status_code == 200
        pid = gateway.backend_pid("busy")
        body = chat("a long answer", "busy", max_tokens=60, stream=True)  # about 3 s of tokens
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            next(events)
            started = time.monotonic()
            second = client.post("/v1/chat/completions", json=chat("after you", "busy", max_tokens=3))
            waited = time.monotonic() - started
            rest = list(events)
        assert rest[-1][1] == "[DONE]"
        assert second.status_code == 200, second.text
        assert waited > 1.5, f"the second request did not wait for the first ({waited:.2f}s): not the case tested"
        assert gateway.backend_pid("busy") == pid
        assert gateway.models()["busy"]["backend"]["restarts"] == 0


def test_an_unstreamed_answer_is_not_held_to_the_head_bound(model_dir: Path, tmp_path: Path) -> None:
    """A logprobs request goes to the backend unstreamed: its head comes with the whole answer, after the
    generation, so the first-token bound applies, not the head bound."""
    profiles = fake_profile("slow", model_dir, "--token-delay", "0.05")
    with running_gateway(tmp_path / "gw", profiles, HEAD_ENV) as gateway, gateway.client(timeout=30) as client:
        body = chat("one two", "slow", max_tokens=40, logprobs=True)  # about 2 s before the head
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 40
        assert gateway.models()["slow"]["backend"]["restarts"] == 0


# ----- requests queued behind a crash (issue 19 item 10) ----------------------------------------------------


def kill_backend(gateway: GatewayProcess, profile: str) -> int:
    pid = gateway.backend_pid(profile)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("concurrency", [1, 3])
@pytest.mark.parametrize("death", ["sigkill", "crash-after-tokens"])
def test_requests_queued_behind_a_crash_wait_for_the_restart_and_succeed(
    model_dir: Path, tmp_path: Path, concurrency: int, death: str
) -> None:
    flags = ["--token-delay", "0.02"] + (["--crash-after-tokens", "40"] if death == "crash-after-tokens" else [])
    profiles = concurrent_fake_profile("crashy", model_dir, concurrency, *flags)
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "crashy", max_tokens=2)).status_code == 200
        pid = gateway.backend_pid("crashy")
        with contextlib.ExitStack() as stack:
            running = []
            for n in range(concurrency):  # every slot busy with a long stream
                body = chat(f"long {n}", "crashy", max_tokens=400, stream=True)
                reply = stack.enter_context(client.stream("POST", "/v1/chat/completions", json=body))
                events = read_sse(reply)
                next(events)
                running.append(events)
            queued = [
                in_thread(
                    lambda n=n: client.post("/v1/chat/completions", json=chat(f"queued {n}", "crashy", max_tokens=5))
                )
                for n in range(4)
            ]
            wait_for(lambda: slot_counts(gateway, "crashy") == (concurrency, 4), 10, "four requests to queue")
            if death == "sigkill":
                kill_backend(gateway, "crashy")
            for events in running:  # each stream in flight ends with the crash
                rest = [event for _, event in events]
                assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "backend_died" for e in rest)
        for n, (thread, answer) in enumerate(queued):
            thread.join(30)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json()["choices"][0]["message"]["content"] == f"echo queued {n} t3 t4"
        assert gateway.backend_pid("crashy") not in (None, pid)
        assert gateway.models()["crashy"]["backend"]["restarts"] == 1


def test_requests_to_a_backend_killed_while_idle_all_succeed(model_dir: Path, tmp_path: Path) -> None:
    """Several requests reach the dead process at once (none knows yet); each waits for the one restart."""
    profiles = concurrent_fake_profile("idle", model_dir, 4)
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("warm", "idle", max_tokens=2)).status_code == 200
        pid = kill_backend(gateway, "idle")
        calls = [
            in_thread(lambda n=n: client.post("/v1/chat/completions", json=chat(f"n{n}", "idle", max_tokens=3)))
            for n in range(4)
        ]
        for n, (thread, answer) in enumerate(calls):
            thread.join(30)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json()["choices"][0]["message"]["content"] == f"echo n{n} t2"
        assert gateway.backend_pid("idle") not in (None, pid)
        assert gateway.models()["idle"]["backend"]["restarts"] == 1


def test_requests_queued_behind_a_crash_of_the_real_launcher_succeed(tiny_pair: TinyPair, tmp_path: Path) -> None:
    profiles = (
        f'[profiles."spec"]\nmodel = "{tiny_pair.main}"\ndraft_model = "{tiny_pair.draft}"\nnum_draft_tokens = 3\n'
        "sampling = { temperature = 0.0 }\n"
    )
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client(timeout=60) as client:
        expected = client.post("/v1/chat/completions", json=chat("Say something.", "spec", max_tokens=12))
        assert expected.status_code == 200
        body = chat("Tell me a very long story.", "spec", max_tokens=3000, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            next(events)
            again = chat("Say something.", "spec", max_tokens=12)
            queued = [in_thread(lambda: client.post("/v1/chat/completions", json=again)) for _ in range(2)]
            wait_for(lambda: slot_counts(gateway, "spec") == (1, 2), 10, "two requests to queue")
            pid = kill_backend(gateway, "spec")
            rest = [event for _, event in events]
        assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "backend_died" for e in rest)
        for thread, answer in queued:
            thread.join(60)
            assert answer[0].status_code == 200, answer[0].text
            assert answer[0].json()["choices"] == expected.json()["choices"]
        assert gateway.backend_pid("spec") not in (None, pid)


# ----- wrappers: nothing a backend command starts outlives the gateway (issue 19 item 15) -------------------

# Backend commands that wrap the fake backend; the gateway appends its flags, which reach the fake as "$@".
RUN_AND_WAIT = '"$@"; exit $?'  # sh runs the command as its child (no exec) and waits for it
DETACH = (
    "import subprocess, sys; "
    "sys.exit(subprocess.Popen([sys.executable, '-m', 'app.testing.fake_backend', *sys.argv[1:]], "
    "start_new_session=True).wait())"
)
WRAPPERS = {
    "sh": ["sh", "-c", RUN_AND_WAIT, "wrapper", *FAKE_BACKEND],
    "sh-in-sh": ["sh", "-c", RUN_AND_WAIT, "outer", "sh", "-c", RUN_AND_WAIT, "inner", *FAKE_BACKEND],
    # The server leaves the wrapper's session: only the guard's adoption of orphans reaches it.
    "detached": [PYTHON, "-c", DETACH],
    # The server is exec'd, but a helper it leaves behind holds the backend's output pipes.
    "helper-holds-pipes": ["sh", "-c", 'sleep 300 & exec "$@"', "wrapper", *FAKE_BACKEND],
}


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def wrapped_profile(name: str, model_dir: Path, wrapper: str) -> str:
    command = "[" + ", ".join(json.dumps(part) for part in WRAPPERS[wrapper]) + "]"  # JSON strings are TOML's
    return f'[profiles."{name}"]\nmodel = "{model_dir}"\nbackend = {{ command = {command} }}\n'


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
@pytest.mark.parametrize("end", ["sigkill", "sigterm"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_nothing_a_wrapped_backend_started_outlives_the_gateway(
    model_dir: Path, tmp_path: Path, wrapper: str, end: str
) -> None:
    gateway = GatewayProcess(tmp_path / "gw", wrapped_profile("wrapped", model_dir, wrapper)).start()
    try:
        with gateway.client() as client:
            assert client.post("/v1/chat/completions", json=chat("hi", "wrapped", max_tokens=2)).status_code == 200
        assert gateway.process is not None
        started = descendants(gateway.process.pid)
        assert len(started) >= 2, started  # at least the wrapper and the fake backend
        gateway.signal(signal.SIGKILL if end == "sigkill" else signal.SIGTERM)
        wait_for(lambda: not [pid for pid in started if pid_alive(pid)], 15, f"{started} to die with the gateway")
    finally:
        gateway.stop()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_a_crash_is_noticed_even_when_a_helper_holds_the_backends_output(model_dir: Path, tmp_path: Path) -> None:
    """The crash of a backend whose leftover helper keeps its stdout open: asyncio's `wait()` would not return
    until the pipes close; the next request still restarts it at once, and the helper goes too."""
    profiles = wrapped_profile("held", model_dir, "helper-holds-pipes")
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client(timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat("hi", "held", max_tokens=2)).status_code == 200
        assert gateway.process is not None
        before = descendants(gateway.process.pid)
        pid = kill_backend(gateway, "held")
        again = client.post("/v1/chat/completions", json=chat("hello again", "held", max_tokens=3))
        assert again.status_code == 200, again.text
        assert gateway.backend_pid("held") not in (None, pid)
        wait_for(lambda: not [p for p in before if pid_alive(p)], 10, "the old backend's processes to be gone")


# ----- admission counts under clients that leave as their turn comes (issue 19 item 17) ---------------------


def test_queued_clients_leaving_as_their_turn_comes_keep_the_limit_and_the_counts(
    model_dir: Path, tmp_path: Path
) -> None:
    """Many clients, most of them too impatient to wait their turn: they leave while queued, some just as a slot
    is handed to them. The backend must never get more than `max_concurrency` requests at once, the gateway's
    counts must never go negative, and they must come back to zero."""
    profiles = concurrent_fake_profile("four", model_dir, 4, "--token-delay", "0.01")
    with running_gateway(tmp_path / "gw", profiles) as gateway:
        deadline = time.monotonic() + 8
        outcomes = {"served": 0, "left": 0}
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=gateway.url) as http:
                while time.monotonic() < deadline:
                    stream = rng.random() < 0.5
                    body = chat("go", "four", max_tokens=rng.randint(5, 30), stream=stream)
                    # Most leave after a fraction of a second (queued, or just as their turn comes); some wait.
                    patience = 10.0 if rng.random() < 0.1 else rng.uniform(0.02, 0.3)
                    try:
                        with http.stream("POST", "/v1/chat/completions", json=body, timeout=patience) as reply:
                            text = "\n".join(reply.iter_lines())
                        served = reply.status_code == 200 and ("data: [DONE]" in text if stream else "choices" in text)
                    except httpx.TimeoutException:
                        served = False
                    with lock:
                        outcomes["served" if served else "left"] += 1

        def watch() -> None:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    seen.append(slot_counts(gateway, "four"))
                time.sleep(0.02)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(24)]
        threads.append(threading.Thread(target=watch))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait_for(lambda: slot_counts(gateway, "four") == (0, 0), 15, "the counts to come back to zero")
        wait_for(lambda: backend_stats(gateway, "four")["active_requests"] == 0, 15, "the backend to be idle")
        stats = backend_stats(gateway, "four")
        peak = stats["peak_concurrent_requests"]
        print(f"{outcomes}, {len(seen)} samples of (running, waiting), backend peak {peak}")
        assert outcomes["served"] > 10, outcomes
        assert outcomes["left"] > 100, outcomes
        assert max(waiting for _, waiting in seen) > 4, "no queue formed: not the case tested"
        assert all(0 <= running <= 4 and waiting >= 0 for running, waiting in seen), sorted(set(seen))
        assert peak <= 4
        with gateway.client() as http:
            assert http.post("/v1/chat/completions", json=chat("still here", "four", max_tokens=3)).status_code == 200


def test_a_backend_start_outlives_the_client_that_began_it(model_dir: Path, tmp_path: Path) -> None:
    """Impatient clients must not kill a model load: each would begin it again, and none would finish."""
    profiles = fake_profile("slowstart", model_dir, "--start-delay", "2")
    with running_gateway(tmp_path / "gw", profiles) as gateway:
        for _ in range(3):  # each leaves well before the backend is up
            with httpx.Client(base_url=gateway.url, timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/chat/completions", json=chat("hello", "slowstart", max_tokens=2))
        wait_for(lambda: gateway.models()["slowstart"]["state"] == "ready", 15, "the one start to finish")
        pid = gateway.backend_pid("slowstart")
        with gateway.client() as client:
            assert client.post("/v1/chat/completions", json=chat("hi", "slowstart", max_tokens=2)).status_code == 200
        assert gateway.backend_pid("slowstart") == pid
        assert gateway.log().count("starting on port") == 1


# ----- eviction (issue 17 item 3) ---------------------------------------------------------------------------


def test_an_eviction_does_not_hold_up_an_unrelated_start(tmp_path: Path) -> None:
    """A backend that ignores SIGTERM is evicted: it stays `stopping` for the whole stop grace. Meanwhile
    another start evicts a backend of its own and serves; the start that evicted the slow one waits for its
    process to exit (the cap bounds the processes alive, and a stopping one still holds its memory)."""
    profiles = "".join(
        fake_profile(name, fake_model_dir(tmp_path, f"m-{name}"), *flags)
        for name, flags in [("stubborn", ["--ignore-sigterm"]), ("quick", []), ("newcomer", []), ("unrelated", [])]
    )
    # The grace is the slow stop's length (SIGKILL after it): long enough to see the order; no speed asserted.
    env = {"SPECGATE_MAX_BACKENDS": "2", "SPECGATE_BACKEND_STOP_GRACE": "20"}
    with running_gateway(tmp_path / "gw", profiles, env) as gateway, gateway.client() as client:
        for name in ("stubborn", "quick"):  # "stubborn" is the least recently used
            assert client.post("/v1/chat/completions", json=chat("hi", name, max_tokens=2)).status_code == 200

        def states() -> dict[str, str]:
            return {name: str(entry["state"]) for name, entry in gateway.models().items()}

        newcomer, answers = in_thread(
            lambda: httpx.post(
                f"{gateway.url}/v1/chat/completions", json=chat("hi", "newcomer", max_tokens=2), timeout=60
            )
        )
        wait_for(lambda: states()["stubborn"] == "stopping", 10, "the eviction of the least recently used backend")

        unrelated = client.post("/v1/chat/completions", json=chat("hi", "unrelated", max_tokens=2))
        assert unrelated.status_code == 200, unrelated.text
        # "unrelated" evicted "quick" and served while "stubborn" was still stopping, and "newcomer" still
        # waits for "stubborn" to exit: never more than two processes.
        assert states() == {"stubborn": "stopping", "quick": "stopped", "newcomer": "stopped", "unrelated": "ready"}
        assert not answers

        newcomer.join(60)
        assert answers
        assert answers[0].status_code == 200, answers[0].text
        assert states() == {"stubborn": "stopped", "quick": "stopped", "newcomer": "ready", "unrelated": "ready"}
