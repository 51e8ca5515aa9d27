"""`/metrics` against a real gateway on the tiny model pair: after a known set of requests, every
counter equals the sum of the per-request figures the responses carried, histogram counts equal the
requests served, outcomes are right, and the pool gauges follow the backends live. The Grafana
dashboard only uses names this exposition has."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from app.testing.tiny_model import write_pair
from tests.harness import ROOT, GatewayProcess, chat, running_gateway, wait_for

K2 = "speculative/tiny-k2"
K4 = "speculative/tiny-k4"
BASE = "baseline/tiny"
UNKNOWN = "no-such-model-xyz"
DASHBOARD = ROOT / "dashboards" / "specgate.json"

Key = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("tiny"), noise=0.02)


@pytest.fixture(scope="module")
def gateway(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    main, draft = models
    greedy = "sampling = { temperature = 0.0 }"
    # Two draft lengths share one speculative backend; the baseline has its own.
    profiles = f"""
[profiles."{K2}"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 2
{greedy}

[profiles."{K4}"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 4
max_queue = 1
{greedy}

[profiles."{BASE}"]
model = "{main}"
{greedy}
"""
    with running_gateway(tmp_path_factory.mktemp("gw"), profiles, {"SPECGATE_MAX_BACKENDS": "2"}) as running:
        yield running


# --------------------------------------------------------------------------------------------------
# Reading the exposition
# --------------------------------------------------------------------------------------------------


class Scrape:
    """One `/metrics` exposition, parsed by prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[Key, float] = {}
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def label_values(self, label: str) -> set[str]:
        return {value for (_, labels), _ in self.samples.items() for name, value in labels if name == label}

    def sample_names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(gateway: GatewayProcess) -> Scrape:
    reply = httpx.get(f"{gateway.url}/metrics", timeout=10.0)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4"), reply.headers
    return Scrape(reply.text)


# --------------------------------------------------------------------------------------------------
# What the responses said
# --------------------------------------------------------------------------------------------------


@dataclass
class Served:
    """Per-request figures of one profile, summed from the responses."""

    requests: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    accepted_per_pos: Counter[int] = field(default_factory=Counter)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generation_tokens: int = 0
    with_decode_rate: int = 0
    finish_reasons: Counter[str] = field(default_factory=Counter)
    # Bounds on the inter-token gaps: streamed output chunks - 1 (each a gap the gateway timed) and
    # tokens - 1 (a chunk carries at least one token).
    streamed_gaps: int = 0
    token_gaps: int = 0

    def add(self, final: dict[str, Any], finish_reason: str, output_chunks: int | None) -> None:
        self.requests += 1
        usage, timings = final["usage"], final["timings"]
        self.prompt_tokens += usage["prompt_tokens"]
        self.generation_tokens += usage["completion_tokens"]
        self.cached_tokens += timings["cache_n"]
        self.with_decode_rate += timings["predicted_per_second"] is not None
        self.finish_reasons[finish_reason] += 1
        self.token_gaps += usage["completion_tokens"] - 1
        if output_chunks is not None:
            self.streamed_gaps += output_chunks - 1
        spec = (final.get("metrics") or {}).get("speculative_decoding")
        if spec is not None:
            assert timings["draft_n"] == spec["num_draft_tokens"]
            self.drafts += spec["num_spec_steps"]
            self.draft_tokens += spec["num_draft_tokens"]
            self.accepted += spec["num_accepted_draft_tokens"]
            for position, count in enumerate(spec["acceptance_histogram"]):
                self.accepted_per_pos[position] += count


def send(client: httpx.Client, served: dict[str, Served], kind: str, model: str, stream: bool, **body: Any) -> None:
    """One request; its figures go into `served[model]`."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    payload: dict[str, Any] = chat(body.pop("content"), model, **body) if kind == "chat" else {"model": model, **body}
    if not stream:
        reply = client.post(path, json=payload)
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        served[model].add(answer, answer["choices"][0]["finish_reason"], None)
        return
    payload.update(stream=True, stream_options={"include_usage": True})
    chunks = []
    with client.stream("POST", path, json=payload) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    choices = [choice for chunk in chunks for choice in chunk.get("choices") or ()]
    outputs = [c for c in choices if _has_output(c)]
    finish = next(c["finish_reason"] for c in choices if c.get("finish_reason"))
    served[model].add(chunks[-1], finish, len(outputs))


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning") or delta.get("tool_calls") or choice.get("text"))


def serve_known_requests(gateway: GatewayProcess) -> dict[str, Served]:
    served: dict[str, Served] = defaultdict(Served)
    with gateway.client(timeout=120) as client:
        send(client, served, "chat", K2, False, content="What is the capital of France?", max_tokens=24)
        send(client, served, "text", K2, True, prompt="def fib(n):", max_tokens=30)
        send(client, served, "chat", K4, True, content="Tell me a story about a robot.", max_tokens=40)
        send(client, served, "text", K4, False, prompt="The quick brown fox", max_tokens=17)
        # The same prompt again: served from the prompt cache, cached tokens counted.
        send(client, served, "text", K4, False, prompt="The quick brown fox", max_tokens=17)
        # A client's own k on a profile: still counted under the profile.
        send(client, served, "chat", K2, True, content="hello", max_tokens=12, num_draft_tokens=3)
        # The baseline streams everything: its inter-token gaps are then known exactly.
        send(client, served, "chat", BASE, True, content="hello", max_tokens=20)
        send(client, served, "text", BASE, True, prompt="import os", max_tokens=9)
        # Errors: an unknown model (no label value may come from it) and a bad field on a known profile.
        unknown = client.post("/v1/chat/completions", json=chat("hi", UNKNOWN, max_tokens=4))
        assert unknown.status_code == 404, unknown.text
        bad = client.post("/v1/completions", json={"model": K2, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400, bad.text
    return served


@pytest.fixture(scope="module")
def known(gateway: GatewayProcess) -> tuple[Scrape, Scrape, dict[str, Served]]:
    before = scrape(gateway)
    served = serve_known_requests(gateway)
    return before, scrape(gateway), served


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_speculative_counters_equal_the_sums_of_the_responses(known: tuple[Scrape, Scrape, dict[str, Served]]) -> None:
    before, after, served = known

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert served[K2].draft_tokens > 0
    assert served[K4].draft_tokens > 0
    assert 0 < served[K2].accepted + served[K4].accepted < served[K2].draft_tokens + served[K4].draft_tokens
    for profile in (K2, K4, BASE):
        figures = served[profile]
        assert delta("specgate_spec_decode_num_drafts_total", profile=profile) == figures.drafts, profile
        assert delta("specgate_spec_decode_num_draft_tokens_total", profile=profile) == figures.draft_tokens
        assert delta("specgate_spec_decode_num_accepted_tokens_total", profile=profile) == figures.accepted
        for position in range(8):
            assert (
                delta("specgate_spec_decode_num_accepted_tokens_per_pos_total", profile=profile, position=str(position))
                == figures.accepted_per_pos[position]
            ), (profile, position)
        # Drafted per position: position 0 is drafted once per round, and the positions sum to the drafts.
        drafted = "specgate_spec_decode_num_drafted_tokens_per_pos_total"
        assert delta(drafted, profile=profile, position="0") == figures.drafts
        assert delta(drafted, profile=profile) == figures.draft_tokens
    # The client's k=3 on the k=2 profile drafted a third position.
    assert delta("specgate_spec_decode_num_drafted_tokens_per_pos_total", profile=K2, position="2") > 0
    assert delta("specgate_spec_decode_num_drafted_tokens_per_pos_total", profile=K4, position="3") > 0
    # The baseline has no speculative series at all.
    assert after.value("specgate_spec_decode_num_draft_tokens_total", profile=BASE) == 0
    assert not any(n.startswith("specgate_spec_decode") and ("profile", BASE) in ls for n, ls in after.samples)


def test_token_counters_histograms_and_outcomes(known: tuple[Scrape, Scrape, dict[str, Served]]) -> None:
    before, after, served = known

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert served[K4].cached_tokens > 0  # the repeated prompt hit the cache
    for profile in (K2, K4, BASE):
        figures = served[profile]
        assert delta("specgate_prompt_tokens_total", profile=profile) == figures.prompt_tokens, profile
        assert delta("specgate_prompt_tokens_cached_total", profile=profile) == figures.cached_tokens, profile
        assert delta("specgate_generation_tokens_total", profile=profile) == figures.generation_tokens, profile
        assert delta("specgate_requests_total", profile=profile, outcome="success") == figures.requests
        for reason, count in figures.finish_reasons.items():
            assert delta("specgate_request_success_total", profile=profile, finished_reason=reason) == count
        for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
            assert delta(f"specgate_{histogram}_count", profile=profile) == figures.requests, (profile, histogram)
            buckets = delta(f"specgate_{histogram}_bucket", profile=profile, le="+Inf")
            assert buckets == figures.requests
        assert delta("specgate_request_decode_tokens_per_second_count", profile=profile) == figures.with_decode_rate
        gaps = delta("specgate_inter_token_latency_seconds_count", profile=profile)
        assert figures.streamed_gaps <= gaps <= figures.token_gaps, profile
        if profile == BASE:
            assert gaps == figures.streamed_gaps
        # Latencies are real durations: the sums are positive and bounded by the e2e sum.
        assert (
            0
            < delta("specgate_time_to_first_token_seconds_sum", profile=profile)
            <= delta("specgate_e2e_request_latency_seconds_sum", profile=profile)
        )
    assert served[K2].with_decode_rate > 0
    # Errors: the bad field counts against its profile; the unknown model only with empty labels.
    assert delta("specgate_requests_total", profile=K2, outcome="client_error") == 1
    assert delta("specgate_requests_total", profile="", outcome="client_error") == 1
    assert delta("specgate_requests_total", outcome="client_error") == 2
    # Failures are not in the latency histograms.
    assert delta("specgate_e2e_request_latency_seconds_count") == sum(s.requests for s in served.values())


def test_labels_are_only_configured_values(
    known: tuple[Scrape, Scrape, dict[str, Served]], models: tuple[Path, Path]
) -> None:
    _, after, _ = known
    main, draft = (str(path) for path in models)
    assert UNKNOWN not in after.text
    assert after.label_values("profile") == {K2, K4, BASE, ""}
    assert after.label_values("model") == {main, ""}
    assert after.label_values("draft_model") == {draft, ""}
    assert after.label_values("outcome") <= {"success", "client_error"}


def test_pool_gauges_follow_the_backends(
    gateway: GatewayProcess, known: tuple[Scrape, Scrape, dict[str, Served]]
) -> None:
    _, after, _ = known
    info = {dict(ls)["profile"]: dict(ls)["backend"] for n, ls in after.samples if n == "specgate_profile_info"}
    assert info[K2] == info[K4] != info[BASE]  # two draft lengths share one backend
    for backend in (info[K2], info[BASE]):
        states = {
            dict(ls)["state"]: v
            for (n, ls), v in after.samples.items()
            if n == "specgate_backend_state" and ("backend", backend) in ls
        }
        assert states == {"stopped": 0, "starting": 0, "ready": 1, "stopping": 0, "failed": 0}, (backend, states)
        assert after.value("specgate_backend_restarts_total", backend=backend) == 0
        # Loading the tiny models takes a moment, never minutes.
        assert 0 < after.value("specgate_backend_load_seconds", backend=backend) < 120
    for profile in (K2, K4, BASE):
        assert after.value("specgate_num_requests_running", profile=profile) == 0
        assert after.value("specgate_num_requests_waiting", profile=profile) == 0

    # Live: hold the speculative backend with a stream nobody reads, queue a second request behind it.
    with gateway.client(timeout=120) as client:
        blocker = chat("tell me a long story", K2, max_tokens=20000, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=blocker) as held:
            lines = held.iter_lines()
            next(lines)
            queued: dict[str, int] = {}

            def send_queued() -> None:
                with gateway.client(timeout=120) as other:
                    queued["status"] = other.post(
                        "/v1/completions", json={"model": K4, "prompt": "hi", "max_tokens": 4}
                    ).status_code

            thread = threading.Thread(target=send_queued)
            thread.start()
            live = wait_for(
                lambda: (s := scrape(gateway)).value("specgate_num_requests_waiting", profile=K4) == 1 and s,
                30,
                "a request waiting behind the held stream",
            )
            assert live.value("specgate_num_requests_running", profile=K2) == 1
            assert live.value("specgate_num_requests_running", profile=K4) == 0
            assert live.value("specgate_num_requests_running") == 1
            # K4 allows one request running or waiting: a second one is refused, and counted as such.
            refused = client.post("/v1/completions", json={"model": K4, "prompt": "hi", "max_tokens": 4})
            assert refused.status_code == 429, refused.text
        thread.join(timeout=120)
    assert queued["status"] == 200
    end = wait_for(
        lambda: (s := scrape(gateway)).value("specgate_requests_total", profile=K2, outcome="client_gone") == 1 and s,
        30,
        "the departed stream counted",
    )
    assert end.value("specgate_requests_total", profile=K4, outcome="rejected") == 1
    assert end.value("specgate_num_requests_running") == 0
    assert end.value("specgate_num_requests_waiting") == 0


def test_openmetrics_is_offered_to_scrapers_that_ask(gateway: GatewayProcess) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    reply = httpx.get(f"{gateway.url}/metrics", headers={"accept": accept}, timeout=10.0)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(reply.text)}
    assert "specgate_spec_decode_num_draft_tokens" in names
    assert "specgate_time_to_first_token_seconds" in names


# --------------------------------------------------------------------------------------------------
# The Grafana dashboard
# --------------------------------------------------------------------------------------------------

_NAME = re.compile(r"\bspecgate_[a-zA-Z0-9_:]+")


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def test_dashboard_is_importable_and_uses_only_exposed_names(known: tuple[Scrape, Scrape, dict[str, Served]]) -> None:
    _, after, _ = known
    dashboard = json.loads(DASHBOARD.read_text())
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["profile"]["type"] == "query"
    assert "specgate_profile_info" in json.dumps(variables["profile"]["query"])
    assert isinstance(dashboard["title"], str)
    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 30

    exposed = after.sample_names()
    expressions: list[str] = [variable["definition"] for variable in variables.values()]
    titles = []
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        titles.append(panel["title"])
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expressions.append(target["expr"])
    used = {name for expr in expressions for name in _NAME.findall(expr)}
    assert used, expressions
    assert used <= exposed, sorted(used - exposed)
    # What the issue asks the board to show.
    for wanted in (
        "specgate_request_decode_tokens_per_second_bucket",
        "specgate_time_to_first_token_seconds_bucket",
        "specgate_inter_token_latency_seconds_bucket",
        "specgate_spec_decode_num_accepted_tokens_total",
        "specgate_spec_decode_num_drafts_total",
        "specgate_spec_decode_num_accepted_tokens_per_pos_total",
        "specgate_num_requests_running",
        "specgate_num_requests_waiting",
        "specgate_backend_state",
        "specgate_backend_restarts_total",
    ):
        assert wanted in used, wanted
    assert any("histogram_quantile" in expr for expr in expressions)
    assert len(set(titles)) == len(titles)
