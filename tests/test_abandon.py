"""A client that leaves stops its work wherever it is (issue 16 item 3), on real launchers with the tiny pair.

Four backends, one per generation path: a draft model (`speculative_generate_step`), prompt lookup (the
launcher's own `lookup_generate_step`), one request at a time without a draft (`generate_step`), and
mlx_lm's batch generator (max_concurrency 2).
Each runs with `--prefill-step-size 16` and gets a prompt of about 12,000 tokens: hundreds of chunks,
seconds of prompt processing on the tiny model, so a client can leave in the middle. What happened is
read from the backend's own counters (`/specgate/stats`): a prompt abandoned, with fewer of its tokens
processed than it has, and no request left running. The next request is answered with the same greedy
text as before.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import GatewayProcess, backend_stats, chat, read_sse, running_gateway, wait_for

PROFILES = ("spec", "lookup", "plain", "batch")
# About 12,000 tokens with the tiny tokenizer; 750 chunks of 16.
LONG_PROMPT = "fox " * 6000
SHORT = "Write a short greeting."
# Bounds that only a backend still busy with the abandoned prompt could miss (its whole prefill), never
# a measure of speed.
SETTLE = 60.0
_PROGRESS = re.compile(r": prompt (\d+)/(\d+)")


def _profiles(pair: TinyPair) -> str:
    common = "sampling = { temperature = 0.0 }\ncontext_length = 65536\n"
    step = '"--prefill-step-size", "16"'
    return (
        f'[profiles.spec]\nmodel = "{pair.main}"\ndraft_model = "{pair.draft}"\nnum_draft_tokens = 3\n{common}'
        f"backend = {{ args = [{step}] }}\n\n"
        f'[profiles.lookup]\nmodel = "{pair.main}"\ndraft_model = "prompt-lookup"\nnum_draft_tokens = 3\n{common}'
        f"backend = {{ args = [{step}] }}\n\n"
        f'[profiles.plain]\nmodel = "{pair.main}"\n{common}backend = {{ args = [{step}] }}\n\n'
        f'[profiles.batch]\nmodel = "{pair.main}"\n{common}backend = {{ args = [{step}], max_concurrency = 2 }}\n'
    )


@pytest.fixture(scope="module")
def gateway(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {"SPECGATE_MAX_BACKENDS": str(len(PROFILES))}
    with running_gateway(tmp_path_factory.mktemp("abandon"), _profiles(tiny_pair), env) as running:
        yield running


@pytest.fixture(scope="module")
def greedy(gateway: GatewayProcess) -> dict[str, str]:
    """Each profile's answer to SHORT before any client left (also starts the three backends)."""
    answers = {name: short_answer(gateway, name) for name in PROFILES}
    # The same greedy text on every path: the checks below then compare all paths with each other too.
    assert len(set(answers.values())) == 1, answers
    return answers


def short_answer(gateway: GatewayProcess, profile: str) -> str:
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(SHORT, profile, max_tokens=12), timeout=SETTLE)
    assert reply.status_code == 200, reply.text
    content: str = reply.json()["choices"][0]["message"]["content"]
    return content


def settled(gateway: GatewayProcess, profile: str) -> dict[str, Any]:
    """The backend's counters once it has no request left."""
    stats: dict[str, Any] = wait_for(
        lambda: (s := backend_stats(gateway, profile))["active_requests"] == 0 and not s["requests"] and s,
        SETTLE,
        f"the {profile} backend to let go of the request",
    )
    return stats


def stable_stats(gateway: GatewayProcess, profile: str) -> dict[str, Any] | None:
    first = backend_stats(gateway, profile)
    time.sleep(1.0)
    second = backend_stats(gateway, profile)
    return second if second["tokens_generated"] == first["tokens_generated"] else None


def in_backend(gateway: GatewayProcess, profile: str, request_id: str) -> dict[str, Any] | None:
    return next((r for r in backend_stats(gateway, profile)["requests"] if r["request_id"] == request_id), None)


def outcome_of(gateway: GatewayProcess, request_id: str) -> str | None:
    status = httpx.get(f"{gateway.url}/status.json", params={"requests": 50}, timeout=5).json()
    return next((r["outcome"] for r in status["requests"] if r["request_id"] == request_id), None)


def assert_abandoned_in_the_prompt(before: dict[str, Any], after: dict[str, Any], total: int) -> int:
    """One more prompt abandoned, part of it never processed; returns the tokens it processed."""
    assert after["prefills_abandoned"] == before["prefills_abandoned"] + 1, after
    skipped = after["prefill_tokens_skipped"] - before["prefill_tokens_skipped"]
    assert 0 < skipped <= total, (skipped, total)
    return total - skipped


@pytest.mark.parametrize("profile", PROFILES)
def test_a_stream_that_leaves_during_its_prompt_stops_the_prefill(
    gateway: GatewayProcess, greedy: dict[str, str], profile: str
) -> None:
    before = settled(gateway, profile)
    request_id = f"leaves-stream-{profile}"
    body = chat(LONG_PROMPT, profile, max_tokens=8, stream=True)
    headers = {"x-request-id": request_id}
    with (
        httpx.Client(base_url=gateway.url, timeout=SETTLE) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply,
    ):
        # The backend's first progress report: its prompt processing has started. Leave.
        progress = next(m for line in reply.iter_lines() if (m := _PROGRESS.fullmatch(line)))
    total = int(progress.group(2))
    after = settled(gateway, profile)
    processed = assert_abandoned_in_the_prompt(before, after, total)
    print(f"{profile}: prompt stopped at {processed}/{total} tokens")
    assert after["requests_started"] == before["requests_started"] + 1
    assert after["tokens_generated"] == before["tokens_generated"], "it went on to generate"
    wait_for(lambda: outcome_of(gateway, request_id) == "client_gone", 10, "the gateway to record the departure")
    assert short_answer(gateway, profile) == greedy[profile]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_non_streaming_client_that_leaves_during_its_prompt_stops_the_prefill(
    gateway: GatewayProcess, greedy: dict[str, str], profile: str
) -> None:
    before = settled(gateway, profile)
    request_id = f"leaves-plain-{profile}"
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=SETTLE)
    try:
        body = json.dumps(chat(LONG_PROMPT, profile, max_tokens=8))
        headers = {"content-type": "application/json", "x-request-id": request_id}
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        entry = wait_for(
            lambda: (r := in_backend(gateway, profile, request_id)) and r["phase"] == "prompt" and r,
            SETTLE,
            "the backend to start on the prompt",
        )
        # While it runs, /status.json shows what the backend does, from the backend.
        status = httpx.get(f"{gateway.url}/status.json", timeout=5).json()
    finally:
        connection.close()  # the client leaves without reading an answer
    backend = next(b for b in status["backends"] if profile in b["profiles"])
    assert re.search(r"prompt \d+/\d+", backend["activity"]["doing"]), backend["activity"]
    live = next(p for p in status["profiles"] if p["name"] == profile)["live"]
    assert [(r["request_id"], r["prompt_total"]) for r in live] == [(request_id, entry["prompt_total"])]
    after = settled(gateway, profile)
    processed = assert_abandoned_in_the_prompt(before, after, entry["prompt_total"])
    print(f"{profile}: prompt stopped at {processed}/{entry['prompt_total']} tokens")
    assert after["tokens_generated"] == before["tokens_generated"], "it went on to generate"
    wait_for(lambda: outcome_of(gateway, request_id) == "client_gone", 10, "the gateway to record the departure")
    assert short_answer(gateway, profile) == greedy[profile]


def test_a_client_that_leaves_the_queue_never_reaches_the_backend(
    gateway: GatewayProcess, greedy: dict[str, str]
) -> None:
    profile = "spec"  # one request at a time: the second queues in the gateway
    before = settled(gateway, profile)
    ahead, queued = http.client.HTTPConnection("127.0.0.1", gateway.port), httpx.Client(base_url=gateway.url)
    try:
        body = json.dumps(chat(LONG_PROMPT, profile, max_tokens=8))
        ahead.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        wait_for(lambda: backend_stats(gateway, profile)["requests"], SETTLE, "the first request to reach the backend")
        with queued.stream("POST", "/v1/chat/completions", json=chat(SHORT, profile, max_tokens=8, stream=True)):
            assert gateway.models()[profile]["backend"]["waiting"] == 1
        wait_for(lambda: gateway.models()[profile]["backend"]["waiting"] == 0, 10, "the queue to drop it")
    finally:
        queued.close()
        ahead.close()
    after = settled(gateway, profile)
    # Only the request ahead ever reached the backend (and was abandoned in its prompt).
    assert after["requests_started"] == before["requests_started"] + 1
    assert after["prefills_abandoned"] == before["prefills_abandoned"] + 1
    assert short_answer(gateway, profile) == greedy[profile]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_stream_that_leaves_while_generating_stops_generation(
    gateway: GatewayProcess, greedy: dict[str, str], profile: str
) -> None:
    before = settled(gateway, profile)
    # Left alone, this runs to the token limit (the tiny model does not end it early).
    body = chat("Tell me a very long story.", profile, max_tokens=3500, stream=True)
    with (
        httpx.Client(base_url=gateway.url, timeout=SETTLE) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as reply,
    ):
        events = read_sse(reply)
        for _ in range(3):
            next(events)
    after = settled(gateway, profile)
    # The batch generator removes a stopped request at the end of its 0.5 s time budget: wait for the count
    # to stay put.
    after = wait_for(lambda: stable_stats(gateway, profile), SETTLE, "the token count to stay put")
    generated = after["tokens_generated"] - before["tokens_generated"]
    print(f"{profile}: {generated} of 3500 tokens for a client that left after 3 events")
    assert generated < 1000
    assert after["prefills_abandoned"] == before["prefills_abandoned"], "a generation counted as a prefill"
    assert short_answer(gateway, profile) == greedy[profile]


def test_status_polls_leave_the_backend_log_alone(gateway: GatewayProcess, greedy: dict[str, str]) -> None:
    # Every /status.json asks each backend for its stats: a status page open all day must not fill the log.
    for _ in range(3):
        backend = next(b for b in httpx.get(f"{gateway.url}/status.json", timeout=5).json()["backends"])
        assert backend["activity"] is not None
    log = httpx.get(f"{gateway.url}/logs/plain", params={"lines": 2000}, timeout=5).text
    assert "POST /v1/chat/completions" in log  # the backend's access log is there
    assert "/specgate/stats" not in log
