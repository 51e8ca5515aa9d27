"""Streaming requests get their headers once admitted, then SSE comments while they wait (issue 16 item 2).

A real gateway in front of the fake backend program (slow start, slow first token, failing start), with
`SPECGATE_KEEPALIVE_SECONDS=0.2` so the signs of life come quickly. Each test reads the raw SSE lines with
their arrival times.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TinyPair
from tests.harness import GatewayProcess, chat, fake_model_dir, fake_profile, running_gateway, wait_for

KEEPALIVE = 0.2
# The longest silence allowed on a waiting stream: the interval plus slack for a loaded 2-core machine.
MAX_GAP = 1.5
ENV = {"SPECGATE_KEEPALIVE_SECONDS": str(KEEPALIVE)}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return fake_model_dir(tmp_path)


def timed_lines(reply: httpx.Response) -> Iterator[tuple[float, str]]:
    for line in reply.iter_lines():
        if line:
            yield time.monotonic(), line


def data_events(lines: list[tuple[float, str]]) -> list[Any]:
    found: list[Any] = []
    for _, line in lines:
        if line.startswith("data:"):
            payload = line[5:].strip()
            found.append(payload if payload == "[DONE]" else json.loads(payload))
    return found


def comments(lines: list[tuple[float, str]]) -> list[str]:
    return [line for _, line in lines if line.startswith(":")]


def longest_gap(start: float, lines: list[tuple[float, str]]) -> float:
    times = [start, *(at for at, _ in lines)]
    return max(later - earlier for earlier, later in itertools.pairwise(times))


def stream_body(model: str, **extra: Any) -> dict[str, Any]:
    return {**chat("Hi there", model, max_tokens=4, stream=True), **extra}


def outcome_count(gateway: GatewayProcess, outcome: str, name: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    pattern = rf'^specgate_requests_total\{{[^}}]*outcome="{outcome}"[^}}]*profile="{name}"[^}}]*\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_headers_while_loading_then_comments_then_tokens(model_dir: Path, tmp_path: Path) -> None:
    with (
        running_gateway(tmp_path / "gw", fake_profile("slow", model_dir, "--start-delay", "2.5"), ENV) as gateway,
        gateway.client() as client,
    ):
        sent = time.monotonic()
        headers = {"x-request-id": "early-1"}
        with client.stream("POST", "/v1/chat/completions", json=stream_body("slow"), headers=headers) as reply:
            headers_at = time.monotonic()
            state = gateway.models()["slow"]["state"]
            assert reply.status_code == 200
            assert reply.headers["x-request-id"] == "early-1"
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = list(timed_lines(reply))
    assert state == "starting", "the headers came only once the backend was up"
    assert headers_at - sent < 2.0
    assert ": loading" in comments(lines)
    assert longest_gap(headers_at, lines) < MAX_GAP
    events = data_events(lines)
    assert events[-1] == "[DONE]"
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events[:-1] if e.get("choices"))
    assert text == "echo Hi there t3"


def test_a_slow_first_token_gets_waiting_comments(model_dir: Path, tmp_path: Path) -> None:
    flags = ("--first-token-delay", "1.5")
    with (
        running_gateway(tmp_path / "gw", fake_profile("think", model_dir, *flags), ENV) as gateway,
        gateway.client() as client,
    ):
        client.post("/v1/chat/completions", json=chat("warm", "think", max_tokens=1)).raise_for_status()
        with client.stream("POST", "/v1/chat/completions", json=stream_body("think")) as reply:
            headers_at = time.monotonic()
            lines = list(timed_lines(reply))
    assert comments(lines).count(": waiting") >= 3
    assert longest_gap(headers_at, lines) < MAX_GAP
    assert data_events(lines)[-1] == "[DONE]"


def test_a_queued_stream_gets_headers_and_queued_comments(model_dir: Path, tmp_path: Path) -> None:
    flags = ("--token-delay", "0.1")
    with (
        running_gateway(tmp_path / "gw", fake_profile("one", model_dir, *flags), ENV) as gateway,
        gateway.client() as client,
    ):
        client.post("/v1/chat/completions", json=chat("warm", "one", max_tokens=1)).raise_for_status()
        ahead = threading.Thread(
            target=lambda: httpx.post(
                f"{gateway.url}/v1/chat/completions", json=chat("first", "one", max_tokens=20), timeout=30
            )
        )
        ahead.start()
        wait_for(lambda: gateway.models()["one"]["backend"]["running"] == 1, 5, "the first request to run")
        with client.stream("POST", "/v1/chat/completions", json=stream_body("one")) as reply:
            assert reply.status_code == 200
            waiting = gateway.models()["one"]["backend"]["waiting"]
            lines = list(timed_lines(reply))
        ahead.join(30)
    assert waiting == 1, "the headers came only once the request left the queue"
    assert ": queued" in comments(lines)
    assert data_events(lines)[-1] == "[DONE]"


def test_a_backend_failing_to_start_after_the_headers_is_an_error_event(model_dir: Path, tmp_path: Path) -> None:
    flags = ("--start-delay", "0.8", "--fail-start")
    with (
        running_gateway(tmp_path / "gw", fake_profile("broken", model_dir, *flags), ENV) as gateway,
        gateway.client() as client,
    ):
        with client.stream("POST", "/v1/chat/completions", json=stream_body("broken")) as reply:
            assert reply.status_code == 200
            lines = list(timed_lines(reply))
        # Non-streaming clients keep today's behaviour: the status tells the failure.
        plain = client.post("/v1/chat/completions", json=chat("Hi", "broken", max_tokens=2))
        wait_for(lambda: outcome_count(gateway, "backend_error", "broken") == 2, 5, "both failures in /metrics")
    events = data_events(lines)
    assert len(events) == 1, lines
    error = events[0]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "config.json" in error["message"] or "start" in error["message"], error
    assert plain.status_code == 503, plain.text


def test_refusals_before_admission_stay_plain_http_errors(model_dir: Path, tmp_path: Path) -> None:
    flags = ("--token-delay", "0.2")
    with (
        running_gateway(tmp_path / "gw", fake_profile("tight", model_dir, *flags, max_queue=1), ENV) as gateway,
        gateway.client() as client,
    ):
        unknown = client.post("/v1/chat/completions", json=stream_body("nope"))
        assert unknown.status_code == 404
        bad = client.post("/v1/chat/completions", json=stream_body("tight", max_tokens=-1))
        assert bad.status_code == 400
        with client.stream("POST", "/v1/chat/completions", json=stream_body("tight", max_tokens=30)) as first:
            assert first.status_code == 200
            full = client.post("/v1/chat/completions", json=stream_body("tight"))
            assert full.status_code == 429, full.text
            assert full.json()["error"]["type"]
            first.close()


def test_a_stream_that_leaves_the_queue_is_dropped(model_dir: Path, tmp_path: Path) -> None:
    flags = ("--token-delay", "0.05")
    with (
        running_gateway(tmp_path / "gw", fake_profile("one", model_dir, *flags), ENV) as gateway,
        gateway.client() as client,
    ):
        client.post("/v1/chat/completions", json=chat("warm", "one", max_tokens=1)).raise_for_status()
        with client.stream("POST", "/v1/chat/completions", json=stream_body("one", max_tokens=60)) as running:
            lines = timed_lines(running)
            next(line for line in lines if line[1].startswith("data:"))
            with client.stream("POST", "/v1/chat/completions", json=stream_body("one")) as queued:
                assert queued.status_code == 200
                assert gateway.models()["one"]["backend"]["waiting"] == 1
                next(timed_lines(queued))  # a ": queued" comment
            wait_for(lambda: gateway.models()["one"]["backend"]["waiting"] == 0, 3, "the queue to drop it")
            assert list(lines)[-1][1] == "data: [DONE]"
        wait_for(lambda: outcome_count(gateway, "client_gone", "one") == 1, 5, "the departure in /metrics")


def test_cors_headers_are_on_the_early_response(model_dir: Path, tmp_path: Path) -> None:
    env = {**ENV, "SPECGATE_CORS_ORIGINS": "http://app.example"}
    with (
        running_gateway(tmp_path / "gw", fake_profile("slow", model_dir, "--start-delay", "1.5"), env) as gateway,
        gateway.client() as client,
    ):
        headers = {"origin": "http://app.example", "x-request-id": "cors-1"}
        with client.stream("POST", "/v1/chat/completions", json=stream_body("slow"), headers=headers) as reply:
            state = gateway.models()["slow"]["state"]
            assert reply.headers["access-control-allow-origin"] == "http://app.example"
            assert reply.headers["x-request-id"] == "cors-1"
            lines = list(timed_lines(reply))
    assert state == "starting"
    assert ": loading" in comments(lines)
    assert data_events(lines)[-1] == "[DONE]"


def test_the_openai_sdk_reads_a_stream_with_comments(model_dir: Path, tmp_path: Path) -> None:
    with running_gateway(tmp_path / "gw", fake_profile("slow", model_dir, "--start-delay", "1.0"), ENV) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="slow", messages=[{"role": "user", "content": "Hi there"}], max_tokens=4, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        client.close()
    assert text == "echo Hi there t3"


@pytest.mark.parametrize("draft", [False, True], ids=["plain", "draft"])
def test_the_real_launcher_reports_prompt_progress(tiny_pair: TinyPair, tmp_path: Path, draft: bool) -> None:
    # A small prefill step, so the tiny model's prompt is processed in several chunks, each one reported.
    # With a draft model mlx_lm.server reports nothing; the launcher reports the main model's chunks.
    draft_line = f'draft_model = "{tiny_pair.draft}"\n' if draft else ""
    profiles = (
        f'[profiles.tiny]\nmodel = "{tiny_pair.main}"\n{draft_line}sampling = {{ temperature = 0.0 }}\n'
        'backend = { args = ["--prefill-step-size", "16"] }\n'
    )
    body = {
        **chat("alpha beta gamma delta " * 20, "tiny", max_tokens=4, stream=True),
        "stream_options": {"include_usage": True},
    }
    with (
        running_gateway(tmp_path / "gw", profiles, ENV) as gateway,
        gateway.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        lines = list(timed_lines(reply))
    first_data = next(i for i, (_, line) in enumerate(lines) if line.startswith("data:"))
    progress = [re.fullmatch(r": prompt (\d+)/(\d+)", line) for line in comments(lines[:first_data])]
    steps = [(int(m.group(1)), int(m.group(2))) for m in progress if m]
    usage = next(e["usage"] for e in data_events(lines) if isinstance(e, dict) and e.get("usage"))
    assert len(steps) >= 3, lines[:first_data]
    assert steps == sorted(steps), steps
    assert steps[-1] == (usage["prompt_tokens"], usage["prompt_tokens"])
    assert not any(line.startswith(": keepalive") for line in comments(lines))


def test_a_first_token_timeout_after_the_headers_is_an_error_event(model_dir: Path, tmp_path: Path) -> None:
    env = {**ENV, "SPECGATE_FIRST_TOKEN_TIMEOUT": "1"}
    flags = ("--first-token-delay", "3")  # the readiness probe waits it out too (loading)
    with (
        running_gateway(tmp_path / "gw", fake_profile("stuck", model_dir, *flags), env) as gateway,
        gateway.client() as client,
    ):
        with client.stream("POST", "/v1/chat/completions", json=stream_body("stuck")) as reply:
            assert reply.status_code == 200
            lines = list(timed_lines(reply))
        wait_for(lambda: outcome_count(gateway, "backend_error", "stuck") == 1, 5, "the timeout in /metrics")
    assert comments(lines).count(": waiting") >= 2
    events = data_events(lines)
    assert len(events) == 1, lines
    assert "first token" in events[0]["error"]["message"]


def test_a_stream_that_leaves_while_its_backend_loads_is_counted_gone(model_dir: Path, tmp_path: Path) -> None:
    with (
        running_gateway(tmp_path / "gw", fake_profile("slow", model_dir, "--start-delay", "2.0"), ENV) as gateway,
        gateway.client() as client,
    ):
        with client.stream("POST", "/v1/chat/completions", json=stream_body("slow")) as reply:
            assert next(timed_lines(reply))[1] == ": loading"
        left_at = time.monotonic()
        wait_for(lambda: outcome_count(gateway, "client_gone", "slow") == 1, 5, "the departure in /metrics")
        assert time.monotonic() - left_at < 1.5, "the request waited for the backend after its client left"
        assert gateway.models()["slow"]["backend"]["running"] == 0
