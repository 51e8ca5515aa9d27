"""The fake backend program, started as a real subprocess and spoken to over HTTP.

Each test starts `python -m app.testing.fake_backend --port 0` in its own session and reads the bound
port from the startup line on stderr; teardown SIGKILLs the process group. Waits poll a condition
until a deadline; the only fixed waits are the short read timeouts that prove silence (a hang).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.testing.fake_backend import (
    expected_text,
    planned_tokens,
    prompt_token_count,
    speculative_rounds,
    token_origins,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "/models/main"
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
SILENCE_S = 0.3  # how long "no bytes" has to last to count as a hang


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def find_port(self) -> int | None:
        for line in self.stderr().splitlines():
            if "listening on http://" in line:
                return int(line.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
        return None

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = httpx.get(self.url + "/specgate/stats", timeout=5).json()
        return stats

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=5, **kwargs)


Spawn = Callable[..., Backend]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str, wait: bool = True) -> Backend:
        n = len(procs)
        out, err = tmp_path / f"stdout{n}.txt", tmp_path / f"stderr{n}.txt"
        command = [sys.executable, "-m", "app.testing.fake_backend", "--model", MODEL]
        command += ["--host", "127.0.0.1", *(flags if "--port" in flags else (*flags, "--port", "0"))]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True)
        procs.append(proc)
        backend = Backend(proc, out, err)
        if wait:
            wait_until(lambda: backend.find_port() is not None or proc.poll() is not None, "the startup line")
            assert proc.poll() is None, backend.stderr()
            backend.port = backend.find_port() or 0
        return backend

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def chat_body(content: str = "Hi there", **extra: Any) -> dict[str, Any]:
    return {"model": "default_model", "messages": [{"role": "user", "content": content}], **extra}


def streaming(body: dict[str, Any], usage: bool = True) -> dict[str, Any]:
    return {**body, "stream": True, **({"stream_options": {"include_usage": True}} if usage else {})}


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    return (line.removeprefix("data: ") for line in lines if line.startswith("data: "))


def read_stream(backend: Backend, path: str, body: dict[str, Any], **kwargs: Any) -> list[str]:
    with httpx.stream("POST", backend.url + path, json=body, timeout=5, **kwargs) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        return list(sse_data(response.iter_lines()))


def read_until_closed(response: httpx.Response) -> list[str]:
    events: list[str] = []
    # A killed peer may reset the connection rather than close it: the same end for a client.
    with contextlib.suppress(httpx.RemoteProtocolError, httpx.ReadError):
        events.extend(sse_data(response.iter_lines()))
    return events


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the content rule (pure) ------------------------------------------------------------------------


def test_content_rule() -> None:
    assert expected_text(chat_body("Hi there", max_tokens=5)) == "echo Hi there t3 t4"
    assert expected_text(chat_body("Hi there", max_tokens=2)) == "echo Hi"
    assert expected_text({"prompt": "a b c", "max_tokens": 6}) == "echo a b c t4 t5"
    assert expected_text({"prompt": ["a", "b"], "max_tokens": 3}) == "echo a b"
    # max_completion_tokens wins over max_tokens; the default is 512 tokens.
    assert expected_text(chat_body("x", max_tokens=9, max_completion_tokens=2)) == "echo x"
    assert len(planned_tokens(chat_body("x"))[0]) == 512
    # The last user message counts, and list content contributes its text parts.
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url"}]},
        {"role": "system", "content": "ignored too"},
    ]
    assert expected_text({"messages": messages, "max_tokens": 3}) == "echo second t2"
    # A stop word ends generation at that token: counted, not sent.
    body = chat_body("a b", max_tokens=10, stop=[" t4", "t4"])
    assert planned_tokens(body) == (["echo", " a", " b", " t3", " t4"], "stop")
    assert expected_text(body) == "echo a b t3"
    assert prompt_token_count(chat_body("a b c")) == 3 + 4 + 3
    assert prompt_token_count({"prompt": ""}) == 1


def test_scripted_replies_per_turn() -> None:
    replies = ["First answer", "Second"]
    assert planned_tokens(chat_body("x"), replies=replies) == (["Fir", "st ", "ans", "wer", ""], "stop")
    assert planned_tokens(chat_body("x", max_tokens=2), replies=replies) == (["Fir", "st "], "length")
    turn = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    assert expected_text(turn, replies=replies) == "Second"
    later = {"messages": [*turn["messages"], {"role": "tool", "content": "y"}, {"role": "assistant", "content": "z"}]}
    assert expected_text(later, replies=replies) == "Second"  # the last reply answers every later turn
    assert expected_text({"prompt": "a b", "max_tokens": 3}, replies=replies) == "echo a b"  # completions echo


def test_speculative_rounds_follow_mlx_loop() -> None:
    # k=3, 10 tokens: accept 3, 2, 1, 0; the last round drafts only what is left.
    assert speculative_rounds(10, 3) == [(3, 3), (3, 2), (3, 1), (1, 0)]
    # All drafted tokens of the last round accepted: no target token after them.
    assert speculative_rounds(10, 2) == [(2, 2), (2, 1), (2, 0), (2, 2), (1, 1)]
    assert speculative_rounds(3, 0) == [(0, 0)] * 3
    for n, k in [(1, 1), (7, 4), (50, 5)]:
        origins = list(token_origins(n, k))
        rounds = speculative_rounds(n, k)
        assert len(origins) == n
        assert all(0 <= a <= d <= k for d, a in rounds)
        assert sum(a for _, a in rounds) == sum(o.draft_position is not None for o in origins)


# -- HTTP surface ------------------------------------------------------------------------------------


def test_health_models_stats_and_unknown_paths(spawn: Spawn) -> None:
    backend = spawn()
    health = httpx.get(backend.url + "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert health.http_version == "HTTP/1.0"
    models = httpx.get(backend.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert backend.stats() == {
        "requests_started": 0,
        "requests_finished": 0,
        "tokens_generated": 0,
        "active_requests": 0,
        "waiting_requests": 0,
        "requests_disconnected": 0,
        "peak_concurrent_requests": 0,
    }
    assert httpx.get(backend.url + "/nope").status_code == 404
    # Exact path match, like mlx: a query string is a 404.
    assert backend.post(CHAT + "?x=1", chat_body()).status_code == 404


def test_chat_non_streaming_shape(spawn: Spawn) -> None:
    backend = spawn("--draft-model", "/models/draft", "--num-draft-tokens", "3")
    body = chat_body("Hi there", max_tokens=10)
    response = backend.post(CHAT, body, headers={"X-Request-Id": "req-1"})
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(response.content))
    data = response.json()
    assert list(data) == ["id", "system_fingerprint", "object", "model", "created", "choices", "usage", "specgate"]
    assert data["id"].startswith("chatcmpl-")
    assert (data["object"], data["model"]) == ("chat.completion", "default_model")
    assert abs(data["created"] - time.time()) < 60
    assert data["choices"] == [
        {
            "index": 0,
            "finish_reason": "length",
            "message": {"role": "assistant", "content": "echo Hi there t3 t4 t5 t6 t7 t8 t9"},
        }
    ]
    prompt_tokens = prompt_token_count(body)
    assert data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 10,
        "total_tokens": prompt_tokens + 10,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    stats = data["specgate"]
    assert stats.pop("prompt_seconds") >= 0
    assert stats.pop("generation_seconds") >= 0
    assert stats == {
        "request_id": "req-1",
        "num_drafts": 4,
        "num_draft_tokens": 10,
        "num_accepted_tokens": 6,
        "drafted_per_position": [4, 3, 3],
        "accepted_per_position": [3, 2, 1],
        "prompt_tokens": prompt_tokens,
        "cached_tokens": 0,
        "generation_tokens": 10,
    }


def test_chat_streaming_shape(spawn: Spawn) -> None:
    backend = spawn()
    body = streaming(chat_body("one two", max_tokens=6))
    events = read_stream(backend, CHAT, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens, usage, final = chunks[:-2], chunks[-1], chunks[-2]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in [*tokens, final]:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "default_model"
        assert chunk["choices"][0]["delta"]["role"] == "assistant"  # repeated in every delta, like mlx
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in tokens) == expected_text(body) == "echo one two t3 t4 t5"
    )
    assert final["choices"] == [{"index": 0, "finish_reason": "length", "delta": {"role": "assistant"}}]
    assert (usage["object"], usage["choices"]) == ("chat.completion", [])
    assert usage["usage"]["completion_tokens"] == 6
    # No draft model: the draft fields are zero and the lists empty; the request id is null without a header.
    assert usage["specgate"]["request_id"] is None
    assert (usage["specgate"]["num_drafts"], usage["specgate"]["drafted_per_position"]) == (0, [])


def test_text_completions_streaming_and_not(spawn: Spawn) -> None:
    backend = spawn()
    body = {"model": "default_model", "prompt": "alpha beta", "max_tokens": 4}
    data = backend.post(TEXT, body).json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["choices"] == [{"index": 0, "finish_reason": "length", "text": "echo alpha beta t3"}]
    events = read_stream(backend, TEXT, streaming(body))
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "echo alpha beta t3"
    # The usage chunk says chat.completion even for text completions (mlx does the same).
    assert (chunks[-1]["object"], chunks[-1]["choices"]) == ("chat.completion", [])


def test_stop_word_and_per_request_draft_tokens(spawn: Spawn) -> None:
    backend = spawn("--draft-model", "/models/draft")
    body = chat_body("a b", max_tokens=10, stop=["t4"], num_draft_tokens=2)
    data = backend.post(CHAT, body).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["message"]["content"] == "echo a b t3"
    assert data["usage"]["completion_tokens"] == 5
    # 5 tokens, k=2: a round of 2 accepted + 1 target, then 1 accepted + 1 target.
    assert (data["specgate"]["num_drafts"], data["specgate"]["num_accepted_tokens"]) == (2, 3)
    assert data["specgate"]["drafted_per_position"] == [2, 2]
    assert data["specgate"]["accepted_per_position"] == [2, 1]


def test_stream_usage_options(spawn: Spawn) -> None:
    backend = spawn()
    plain = read_stream(backend, CHAT, streaming(chat_body(max_tokens=2), usage=False))
    assert plain[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in plain[:-1])
    # stream_options without include_usage: mlx raises inside the handler; no usage, no [DONE].
    broken = read_stream(backend, CHAT, {**chat_body(max_tokens=2), "stream": True, "stream_options": {}})
    assert len(broken) == 3
    assert json.loads(broken[-1])["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: "KeyError: 'include_usage'" in backend.stderr(), "the KeyError log line")


def test_request_errors_match_mlx(spawn: Spawn) -> None:
    backend = spawn()
    no_length = raw_request(backend.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert no_length.startswith(b"HTTP/1.0 411")
    assert no_length.endswith(b'{"error": "Content-Length header is required"}')
    invalid = httpx.post(backend.url + CHAT, content=b"{nope", timeout=5)
    assert invalid.status_code == 400
    assert invalid.json()["error"].startswith("Invalid JSON in request body:")
    cases = [
        (CHAT, [1, 2], 400, "Request should be a JSON dictionary"),
        (CHAT, chat_body(max_tokens=0), 400, "max_tokens must be at least 1"),
        (CHAT, chat_body(stream="yes"), 400, "stream must be of type bool"),
        (CHAT, {"prompt": "x"}, 400, "Request did not contain messages"),
        (TEXT, {"messages": []}, 400, "Request did not contain a prompt"),
    ]
    for path, body, status, message in cases:
        response = httpx.post(backend.url + path, json=body, timeout=5)
        assert (response.status_code, response.json()) == (status, {"error": message})
    # Load instructions mlx would act on are refused as a failed load (404).
    for body in [
        chat_body(model="other"),
        chat_body(draft_model="/models/draft"),
        chat_body(model=MODEL, adapters="a"),
    ]:
        response = backend.post(CHAT, body)
        assert response.status_code == 404
        assert "cannot load models" in response.json()["error"]
    # mlx ignores `adapters` when the model is "default_model" (its adapter map wins).
    assert backend.post(CHAT, chat_body(adapters="ignored", max_tokens=1)).status_code == 200
    assert backend.stats()["requests_started"] == 1


def test_concurrent_responses_are_not_mixed_up(spawn: Spawn) -> None:
    backend = spawn("--token-delay", "0.002")
    bodies = [streaming(chat_body(f"prompt number {i} " * (i % 3 + 1), max_tokens=12)) for i in range(16)]

    def run(body: dict[str, Any]) -> str:
        chunks = [json.loads(e) for e in read_stream(backend, CHAT, body)[:-1]]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(run, bodies))
    assert texts == [expected_text(b) for b in bodies]
    assert backend.stats()["tokens_generated"] == 16 * 12


def test_log_lines_name_request_and_tokens(spawn: Spawn) -> None:
    backend = spawn()
    backend.post(CHAT, chat_body(max_tokens=3), headers={"X-Request-Id": "log-me"})
    wait_until(lambda: "id=log-me" in backend.stderr(), "the request log line")
    line = next(ln for ln in backend.stderr().splitlines() if "id=log-me" in ln)
    assert "tokens=3" in line
    assert "outcome=ok" in line


# -- timing and failure modes -------------------------------------------------------------------------


def test_starts_fast_on_a_given_port_and_ignores_unknown_mlx_flags(spawn: Spawn) -> None:
    port = free_port()
    started = time.monotonic()
    backend = spawn("--port", str(port), "--temp", "0.7", "--prompt-cache-size", "0", "--trust-remote-code")
    assert backend.port == port
    # Well under a second on a quiet machine; the bound leaves room for a loaded one.
    assert time.monotonic() - started < 3.0
    assert httpx.get(backend.url + "/health").status_code == 200


def test_streaming_is_incremental(spawn: Spawn) -> None:
    backend = spawn("--token-delay", "0.01")
    with httpx.stream("POST", backend.url + CHAT, json=streaming(chat_body(max_tokens=1000)), timeout=5) as response:
        # Keep a reference: a dropped httpx line iterator closes the response (a disconnect).
        lines = sse_data(response.iter_lines())
        first = next(lines)
        stats = backend.stats()
    assert json.loads(first)["choices"][0]["delta"]["content"] == "echo"
    assert stats["active_requests"] == 1
    assert stats["tokens_generated"] < 1000  # the first chunk came before the last token was made


def test_client_disconnect_stops_generation(spawn: Spawn) -> None:
    backend = spawn("--token-delay", "0.05")
    with httpx.stream("POST", backend.url + CHAT, json=streaming(chat_body(max_tokens=1000)), timeout=5) as response:
        lines = sse_data(response.iter_lines())
        for _ in range(3):
            next(lines)
        made_before_close = backend.stats()["tokens_generated"]
    # Leaving the block closed the socket mid-stream.
    wait_until(lambda: backend.stats()["requests_finished"] == 1, "the handler to notice the disconnect")
    stats = backend.stats()
    assert (stats["requests_disconnected"], stats["active_requests"]) == (1, 0)
    # One write may still land in the socket buffer; the next one fails and generation stops.
    assert stats["tokens_generated"] <= made_before_close + 3
    assert backend.stats()["tokens_generated"] == stats["tokens_generated"]
    wait_until(lambda: "outcome=disconnected" in backend.stderr(), "the disconnect log line")


def test_crash_after_tokens_kills_the_process_mid_stream(spawn: Spawn) -> None:
    backend = spawn("--crash-after-tokens", "3")
    # Short requests (the readiness probe's single token) get through.
    assert backend.post(TEXT, {"prompt": "hi", "max_tokens": 1, "stream": False}).status_code == 200
    with httpx.stream("POST", backend.url + CHAT, json=streaming(chat_body(max_tokens=10)), timeout=5) as response:
        events = read_until_closed(response)
    assert len(events) == 3
    assert "[DONE]" not in events
    assert backend.proc.wait(timeout=5) == -signal.SIGKILL
    assert "crashing after 3 tokens" in backend.stderr()


def test_hang_after_tokens_keeps_the_socket_open_and_silent(spawn: Spawn) -> None:
    backend = spawn("--hang-after-tokens", "2")
    timeout = httpx.Timeout(5, read=SILENCE_S)
    with httpx.stream("POST", backend.url + CHAT, json=streaming(chat_body(max_tokens=10)), timeout=timeout) as r:
        lines = sse_data(r.iter_lines())
        assert [json.loads(next(lines))["choices"][0]["delta"]["content"] for _ in range(2)] == ["echo", " Hi"]
        wait_until(lambda: "hanging after 2 tokens" in backend.stderr(), "the hang log line")
        with pytest.raises(httpx.ReadTimeout):
            next(lines)
        # Still running and serving: only that request is stuck.
        assert backend.proc.poll() is None
        assert httpx.get(backend.url + "/health").status_code == 200
        assert backend.stats()["active_requests"] == 1
        assert backend.stats()["tokens_generated"] == 2


def test_hang_before_headers_wedges_every_later_completion(spawn: Spawn) -> None:
    backend = spawn("--hang-before-headers-on", "freeze")
    assert backend.post(TEXT, {"prompt": "hi", "max_tokens": 1}).status_code == 200  # before the trigger
    timeout = httpx.Timeout(5, read=SILENCE_S)
    for content in ("please freeze now", "an innocent one after it"):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(backend.url + CHAT, json=streaming(chat_body(content)), timeout=timeout)
    wait_until(lambda: backend.stderr().count("hanging before the end of the headers") == 2, "two hung requests")
    # The HTTP side still answers, like mlx_lm.server with a stuck generation thread.
    assert httpx.get(backend.url + "/health").status_code == 200
    assert backend.stats()["requests_started"] == 1


def test_hang_in_headers_sends_only_the_status_line(spawn: Spawn) -> None:
    backend = spawn("--hang-in-headers-on", "freeze")
    body = json.dumps(chat_body("freeze")).encode()
    with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while not received.endswith(b"\r\n"):
            received += sock.recv(100)
        assert received == b"HTTP/1.0 200 OK\r\n"
        sock.settimeout(SILENCE_S)
        with pytest.raises(TimeoutError):
            sock.recv(100)


def test_peak_concurrent_requests_counts_requests_generating_at_once(spawn: Spawn) -> None:
    backend = spawn("--token-delay", "0.01")
    with contextlib.ExitStack() as stack:
        lines = []
        for _ in range(3):
            body = streaming(chat_body(max_tokens=1000))
            response = stack.enter_context(httpx.stream("POST", backend.url + CHAT, json=body, timeout=5))
            lines.append(sse_data(response.iter_lines()))  # referenced: a dropped iterator closes the socket
            next(lines[-1])
        assert backend.stats()["active_requests"] == 3
    wait_until(lambda: backend.stats()["active_requests"] == 0, "the streams to end")
    assert backend.post(CHAT, chat_body(max_tokens=2)).status_code == 200
    assert backend.stats()["peak_concurrent_requests"] == 3
    # A request whose client has closed its connection, but that the backend has not noticed yet, is not counted.
    slow = spawn("--first-token-delay", "3")
    with httpx.stream("POST", slow.url + CHAT, json=streaming(chat_body(max_tokens=5)), timeout=5):
        pass  # closed at once: the backend notices only at its first write, after the delay
    wait_until(lambda: slow.stats()["requests_started"] == 1, "the first request to start")
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(slow.post, TEXT, {"prompt": "hi", "max_tokens": 1})
        wait_until(lambda: slow.stats()["requests_started"] == 2, "the second request to start")
        stats = slow.stats()
        assert second.result().status_code == 200
    assert stats["active_requests"] == 2  # both generating, as far as the backend knows
    assert stats["peak_concurrent_requests"] == 1


def test_fail_start_exits_with_a_load_error(spawn: Spawn) -> None:
    started = time.monotonic()
    backend = spawn("--fail-start", "--start-delay", "0.2", wait=False)
    assert backend.proc.wait(timeout=5) == 1
    assert time.monotonic() - started >= 0.2
    stderr = backend.stderr()
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '{MODEL}/config.json'" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("FileNotFoundError")
    assert "listening" not in stderr


def test_start_delay_and_load_event(spawn: Spawn) -> None:
    started = time.monotonic()
    backend = spawn("--start-delay", "0.3", "--print-load-event")
    assert time.monotonic() - started >= 0.3
    wait_until(lambda: "SPECGATE_EVENT" in backend.stdout(), "the load event")
    line = next(ln for ln in backend.stdout().splitlines() if ln.startswith("SPECGATE_EVENT "))
    event = json.loads(line.removeprefix("SPECGATE_EVENT "))
    assert event["event"] == "loaded"
    assert event["load_seconds"] >= 0.3


def test_sigterm_ends_the_process_by_default(spawn: Spawn) -> None:
    backend = spawn()
    backend.proc.send_signal(signal.SIGTERM)
    assert backend.proc.wait(timeout=5) == -signal.SIGTERM


def test_ignore_sigterm_survives_sigterm_and_dies_on_sigkill(spawn: Spawn) -> None:
    backend = spawn("--ignore-sigterm")
    backend.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM, ignoring it" in backend.stderr(), "the SIGTERM log line")
    assert backend.proc.poll() is None
    assert httpx.get(backend.url + "/health").status_code == 200
    backend.proc.send_signal(signal.SIGKILL)
    assert backend.proc.wait(timeout=5) == -signal.SIGKILL


def test_fail_requests_with_status(spawn: Spawn) -> None:
    backend = spawn("--fail-requests-with", "503")
    for path, body in [(CHAT, chat_body()), (TEXT, {"prompt": "hi", "max_tokens": 1})]:
        response = backend.post(path, body)
        assert response.status_code == 503
        assert isinstance(response.json()["error"], str)
    assert httpx.get(backend.url + "/health").status_code == 200
    assert backend.stats()["requests_started"] == 0


def test_record_requests_appends_each_body_as_a_json_line(spawn: Spawn, tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    backend = spawn("--record-requests", str(record))
    bodies = [chat_body("one", max_tokens=2), {"prompt": "two", "max_tokens": 1}]
    for path, body in zip((CHAT, TEXT), bodies, strict=True):
        assert backend.post(path, body).status_code == 200
    # A body that is JSON but not a request is recorded too: the file shows what the client sent.
    assert httpx.post(backend.url + CHAT, json=[1, 2], timeout=5).status_code == 400
    assert [json.loads(line) for line in record.read_text().splitlines()] == [*bodies, [1, 2]]


def test_serial_runs_one_request_at_a_time_in_arrival_order(spawn: Spawn) -> None:
    backend = spawn("--serial", "--token-delay", "0.005")
    headers_seen = {name: threading.Event() for name in "BC"}
    texts: dict[str, str] = {}

    def client(name: str) -> None:
        body = streaming(chat_body(f"request {name}", max_tokens=8))
        with httpx.stream("POST", backend.url + CHAT, json=body, headers={"X-Request-Id": name}, timeout=10) as r:
            headers_seen[name].set()
            chunks = [json.loads(e) for e in list(sse_data(r.iter_lines()))[:-1]]
        texts[name] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    threads = {name: threading.Thread(target=client, args=(name,)) for name in "BC"}
    # A runs until its client leaves, so B and C queue behind it whatever the machine's speed.
    long_body = streaming(chat_body("request A", max_tokens=100_000))
    with httpx.stream("POST", backend.url + CHAT, json=long_body, headers={"X-Request-Id": "A"}, timeout=10) as a:
        a_lines = a.iter_lines()  # referenced: a dropped iterator would close A's socket
        next(a_lines)
        threads["B"].start()
        wait_until(lambda: backend.stats()["waiting_requests"] == 1, "B to queue")
        threads["C"].start()
        wait_until(lambda: backend.stats()["waiting_requests"] == 2, "C to queue")
        # Queued streams get no bytes at all, not even headers, while A runs.
        assert backend.stats()["active_requests"] == 1
        assert not headers_seen["B"].is_set()
        assert not headers_seen["C"].is_set()
    for thread in threads.values():
        thread.join(timeout=10)
    assert texts == {name: f"echo request {name} t3 t4 t5 t6 t7" for name in "BC"}
    done = [ln.split("id=")[1].split()[0] for ln in backend.stderr().splitlines() if "outcome=" in ln]
    assert done == ["A", "B", "C"]
