"""Logs you can follow: `/logs/{profile}` (tail), `/logs/{profile}/stream` (SSE), JSON gateway logs with the
request id, and the request id reaching the backend (the fake backend's and the real launcher's own lines)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.testing.tiny_model import write_pair
from tests.harness import FAKE_BACKEND, GatewayProcess, chat, fake_model_dir, running_gateway, toml_list, wait_for

SPEC = "speculative/fake"
BASE = "baseline/fake"


def fake_profiles(model: Path) -> str:
    backend = f"backend = {{ command = {toml_list(FAKE_BACKEND)} }}"
    return f"""
[profiles."{SPEC}"]
model = "{model}"
draft_model = "{model}"
aliases = ["fake"]
{backend}

[profiles."{BASE}"]
model = "{model}"
{backend}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("logs")
    model = fake_model_dir(workdir, "model")
    with running_gateway(workdir, fake_profiles(model), {"SPECGATE_LOG_FORMAT": "json"}) as running:
        yield running


def complete(gateway: GatewayProcess, request_id: str | None, model: str = SPEC, **extra: Any) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    with gateway.client() as client:
        reply = client.post(
            "/v1/chat/completions", json=chat("hello there", model, max_tokens=6, **extra), headers=headers
        )
    assert reply.status_code == 200, reply.text
    return reply


def test_tail_has_the_backend_line_with_the_request_id(gateway: GatewayProcess) -> None:
    reply = complete(gateway, "tail-check-1")
    assert reply.headers["x-request-id"] == "tail-check-1"
    with gateway.client() as client:
        text = client.get(f"/logs/{SPEC}").text
        # The fake backend prints one line per request, with the X-Request-Id the gateway sent it.
        assert "request id=tail-check-1 path=/v1/chat/completions" in text
        assert "starting on port" in text  # the supervisor's own lines are in the same buffer

        two = client.get(f"/logs/{SPEC}", params={"lines": 2})
        assert two.headers["content-type"].startswith("text/plain")
        assert two.text.count("\n") == 2
        assert two.text.splitlines() == text.splitlines()[-2:]

        as_json = client.get("/logs/fake", params={"lines": 3, "format": "json"}).json()  # an alias works
        assert len(as_json["lines"]) == 3
        assert {"time", "stream", "text"} <= set(as_json["lines"][-1])
        assert as_json["lines"][-1]["text"] == text.splitlines()[-1]
        # The same buffer by the backend's own name, as /status.json lists it.
        assert client.get(f"/logs/{as_json['backend']}", params={"lines": 3}).text.splitlines() == [
            line["text"] for line in as_json["lines"]
        ]


def test_unknown_profile_and_bad_parameters_are_openai_errors(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        missing = client.get("/logs/no/such-profile")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert SPEC in missing.json()["error"]["message"]
        assert missing.headers["x-request-id"].startswith("sg-")  # errors carry an id too
        assert client.get(f"/logs/{SPEC}", params={"lines": -1}).status_code == 400
        assert client.get(f"/logs/{SPEC}", params={"format": "xml"}).status_code == 400


def test_stream_follows_new_lines_as_they_come(gateway: GatewayProcess) -> None:
    complete(gateway, "before-follow")  # the backend is running: its lines are in the buffer
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    stop = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(10.0, read=30.0)) as client,
            client.stream("GET", f"/logs/{SPEC}/stream", params={"lines": 1}) as response,
        ):
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.put(json.loads(line[5:]))
                if stop.is_set():
                    return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    first = events.get(timeout=10)  # the backlog: the last line already there
    assert "before-follow" in first["text"]
    complete(gateway, "while-following")
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while not any("request id=while-following" in text for text in seen):
        assert time.monotonic() < deadline, f"no followed line for the new request; got {seen}"
        seen.append(events.get(timeout=max(0.1, deadline - time.monotonic()))["text"])
    stop.set()
    complete(gateway, "unblock-follower")  # one more line lets the reader notice `stop` and close
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_generated_request_id_reaches_backend_and_json_log(gateway: GatewayProcess) -> None:
    reply = complete(gateway, None, model=BASE)
    request_id = reply.headers["x-request-id"]
    assert request_id.startswith("sg-")
    with gateway.client() as client:
        wait_for(
            lambda: f"request id={request_id} " in client.get(f"/logs/{BASE}").text,
            10,
            "the generated id in the backend's log",
        )
    # A client-supplied id that is not sane is replaced, not forwarded into logs.
    reply = complete(gateway, "bad id with spaces")
    assert reply.headers["x-request-id"].startswith("sg-")


def gateway_json_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    entries = []
    for line in gateway.log().splitlines():
        # The only plain line is the command's own start-up message on stderr, before logging starts.
        if not line.strip() or line.startswith("specgate: "):
            continue
        entries.append(json.loads(line))  # fails the test on any line that is not JSON
    return entries


def test_gateway_logs_are_json_with_the_request_id(gateway: GatewayProcess) -> None:
    complete(gateway, "json-log-check", stream=True)

    def request_entry() -> dict[str, Any] | None:
        for entry in gateway_json_lines(gateway):
            if entry["logger"] == "specgate.requests" and entry["request_id"] == "json-log-check":
                return entry
        return None

    entry = wait_for(request_entry, 10, "the request's JSON log line")
    assert entry["level"] == "INFO"
    assert entry["message"].startswith("json-log-check speculative/fake success")
    assert entry["time"].endswith("Z")
    entries = gateway_json_lines(gateway)
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's own lines are JSON too
    # Backend output lines carry their id in their text, never one inherited from the request that
    # happened to start the backend.
    backend_lines = [e for e in entries if e["logger"].startswith("specgate.backend.")]
    assert backend_lines
    assert all(e["request_id"] is None for e in backend_lines)


def test_real_launcher_logs_the_request_id(tmp_path: Path) -> None:
    """The id reaches specgate's launcher (mlx_lm.server + hooks), which logs it with the request's figures."""
    main, draft = write_pair(tmp_path / "tiny", noise=0.02)
    profiles = f"""
[profiles."speculative/tiny"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 3
sampling = {{ temperature = 0.0 }}
"""
    with running_gateway(tmp_path / "gw", profiles) as gateway:
        with gateway.client() as client:
            reply = client.post(
                "/v1/completions",
                json={"model": "speculative/tiny", "prompt": "hello", "max_tokens": 8},
                headers={"x-request-id": "launcher-id-7"},
            )
            assert reply.status_code == 200, reply.text
            accepted = reply.json()["metrics"]["speculative_decoding"]

            def launcher_line() -> str | None:
                for line in client.get("/logs/speculative/tiny", params={"lines": 100}).text.splitlines():
                    if "specgate request launcher-id-7 " in line:
                        return line
                return None

            line = wait_for(launcher_line, 10, "the launcher's line for the request")
        # Its figures are the ones the response reported: the same request, not just the same id.
        assert f"accepted/drafted {accepted['num_accepted_draft_tokens']}/{accepted['num_draft_tokens']}" in line
        assert " done: " in line
