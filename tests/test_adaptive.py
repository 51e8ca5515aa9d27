"""Adaptive draft length (`num_draft_tokens = "auto"`) and routing to the baseline twin (app/adaptive/).

The estimator is tested on synthetic requests: a simulated backend that follows mlx_lm's
`speculative_generate_step` (each round drafts min(k, tokens left), the target keeps the matching
prefix and adds one token) with chosen costs per round, so the right answer is known. The gateway
tests run real launchers on the tiny model pair.
"""

from __future__ import annotations

import copy
import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.adaptive.collector import PlannerCollector
from app.adaptive.estimator import COST_WINDOW, K_MAX, PROBE_EVERY, WARMUP_K, BackendEstimator, Observation
from app.adaptive.planner import SpeculationPlanner, observation_from_record
from app.adaptive.prompt_classes import prompt_class
from app.profiles import Profile, ProfileError, ProfileSet, parse_profiles
from app.proxy.plan import Load, Plan, apply_plan
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest, build_backend_request
from app.testing.tiny_model import write_pair
from tests.harness import GatewayProcess, chat, running_gateway, wait_for

# --------------------------------------------------------------------------------------------------
# A simulated drafting backend
# --------------------------------------------------------------------------------------------------

Cost = Callable[[int], float]  # seconds of one verification round that drafted d tokens

# The CPU here (reference notes): verifying d+1 tokens costs d+1 main steps (~0.77 s for the 1.5B),
# a 0.5B draft step ~0.26 s. Every k loses: k=2 at 91 % acceptance is ~0.75x.
CPU: Cost = lambda d: 0.77 * (d + 1) + 0.26 * d  # noqa: E731
# An accelerator with a draft that costs almost nothing (prompt lookup): verification nearly flat.
GPU: Cost = lambda d: 0.0052 + 0.0012 * d  # noqa: E731


def simulate(
    k: int,
    accept: float,
    cost: Cost,
    rng: random.Random,
    tokens: int = 64,
    klass: str = "code",
    available: float = 1.0,
) -> Observation:
    """One request of `tokens` tokens at draft length k; `available` < 1: a draft that finds nothing."""
    produced, accepted_total, seconds = 0, 0, []
    drafted_at = [0] * k
    accepted_at = [0] * k
    while produced < tokens:
        drafted = min(k, tokens - produced) if rng.random() < available else 0
        accepted = 0
        while accepted < drafted and rng.random() < accept:
            accepted += 1
        for i in range(drafted):
            drafted_at[i] += 1
        for i in range(accepted):
            accepted_at[i] += 1
        produced += accepted + (1 if produced + accepted < tokens else 0)
        accepted_total += accepted
        seconds.append(cost(drafted) * rng.uniform(0.9, 1.1))
    return Observation(
        k=k,
        prompt_class=klass,
        rounds=tokens - accepted_total,
        # The launcher's clock starts at the first token, i.e. after the first round.
        generation_seconds=sum(seconds[1:]),
        drafted_per_position=drafted_at,
        accepted_per_position=accepted_at,
    )


def serve(
    estimator: BackendEstimator,
    requests: int,
    accept: float,
    cost: Cost,
    rng: random.Random,
    klass: str = "code",
    available: float = 1.0,
    tokens: int = 64,
) -> list[int]:
    """Let the estimator choose k for `requests` requests; returns the k of each."""
    chosen = []
    for _ in range(requests):
        k = estimator.choose(klass).k
        estimator.observe(simulate(k, accept, cost, rng, tokens, klass, available))
        chosen.append(k)
    return chosen


def speedup(k: int, accept: float, cost: Cost) -> float:
    """The true expected speed-up of draft length k (geometric acceptance, full availability)."""
    tokens = 1 + sum(accept ** (i + 1) for i in range(k))
    return tokens * cost(0) / cost(k)


def settled(chosen: Sequence[int], tail: int = 20) -> list[int]:
    return list(chosen[-tail:])


# --------------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------------


def test_cpu_costs_settle_on_no_drafting_even_at_high_acceptance() -> None:
    estimator = BackendEstimator()
    chosen = serve(estimator, 60, accept=0.91, cost=CPU, rng=random.Random(1))
    assert chosen[:2] == [0, WARMUP_K]  # measure plain decoding, then what drafting costs
    best = estimator.best("code")
    assert best.k == 0
    assert best.reason == "model"
    # After the warm-up only the bounded share of probes drafts at all.
    drafting = [k for k in chosen[2:] if k > 0]
    assert len(drafting) <= len(chosen[2:]) // PROBE_EVERY
    assert max(drafting) <= 2  # probes stay next to the current best
    # Plain step and per-draft-token cost recovered: c(d) = 0.77 + 1.03 d.
    assert estimator.costs.plain_step == pytest.approx(0.77, rel=0.1)
    assert estimator.costs.draft_token_seconds == pytest.approx(1.03, rel=0.15)


def test_gpu_costs_with_high_acceptance_choose_drafting_near_the_best_k() -> None:
    estimator = BackendEstimator()
    chosen = serve(estimator, 100, accept=0.85, cost=GPU, rng=random.Random(2))
    best_true = max(speedup(k, 0.85, GPU) for k in range(K_MAX + 1))
    tail = settled(chosen, 4 * PROBE_EVERY)
    assert tail.count(0) <= len(tail) // PROBE_EVERY  # only probes of plain decoding
    # Mean true speed-up of the draft lengths used lately, probes included: >= 95 % of the best fixed k.
    achieved = sum(speedup(k, 0.85, GPU) for k in tail) / len(tail)
    assert achieved >= 0.95 * best_true
    best = estimator.best("code")
    assert best.expected_speedup is not None
    assert best.expected_speedup == pytest.approx(speedup(best.k, 0.85, GPU), rel=0.15)


def test_a_machine_that_becomes_fast_is_noticed_within_a_bounded_number_of_requests() -> None:
    estimator = BackendEstimator()
    rng = random.Random(3)
    serve(estimator, 40, accept=0.9, cost=CPU, rng=rng)
    assert estimator.best("code").k == 0
    chosen = serve(estimator, 50, accept=0.9, cost=GPU, rng=rng)
    # Only probes see drafting at work while k=0 is chosen: two probes per neighbouring k suffice.
    first = next(i for i, k in enumerate(chosen) if k > 0 and estimator.best("code").k > 0)
    assert first < 5 * PROBE_EVERY
    assert estimator.best("code").k >= 2


def test_a_machine_that_becomes_slow_is_noticed_within_a_few_requests() -> None:
    estimator = BackendEstimator()
    rng = random.Random(4)
    serve(estimator, 40, accept=0.9, cost=GPU, rng=rng)
    assert estimator.best("code").k >= 2
    chosen = serve(estimator, 20, accept=0.9, cost=CPU, rng=rng)
    # The chosen k itself is measured on every request: two slow ones outvote the old median.
    switched = next(i for i, k in enumerate(chosen) if k == 0)
    assert switched <= 2 * COST_WINDOW
    assert estimator.best("code").k == 0


def test_collapsing_acceptance_stops_drafting() -> None:
    estimator = BackendEstimator()
    rng = random.Random(5)
    serve(estimator, 40, accept=0.9, cost=GPU, rng=rng)
    assert estimator.best("code").k >= 3
    # Sampling at temperature 0.8: the draft rarely matches. At 5 % acceptance drafting loses.
    chosen = serve(estimator, 15, accept=0.05, cost=GPU, rng=rng)
    assert estimator.best("code").k == 0
    assert chosen[-5:].count(0) >= 4


def test_prompt_classes_get_their_own_k() -> None:
    estimator = BackendEstimator()
    rng = random.Random(6)
    for _ in range(40):
        serve(estimator, 1, accept=0.9, cost=GPU, rng=rng, klass="code")
        serve(estimator, 1, accept=0.15, cost=GPU, rng=rng, klass="chat")
    assert estimator.best("code").k >= 3
    assert estimator.best("chat").k <= 1
    # A class never seen leans on the backend's pooled acceptance.
    assert estimator.acceptance("code-sampled") == estimator.pooled.estimate()
    assert estimator.best("code-sampled").k > 0


def test_a_draft_that_often_finds_nothing_is_modelled_by_its_availability() -> None:
    # Prompt lookup: a round drafts only where an n-gram matched (here 40 % of rounds).
    estimator = BackendEstimator()
    # Long answers: the estimate remembers a few requests, and a short one has few rounds that draft.
    serve(estimator, 60, accept=0.9, cost=GPU, rng=random.Random(7), available=0.4, tokens=256)
    estimate = estimator.acceptance("code")
    assert estimate.a[0] == pytest.approx(0.4, abs=0.12)
    assert estimate.q[0] == pytest.approx(0.9, abs=0.08)
    best = estimator.best("code")
    assert best.k >= 2
    assert best.tokens_per_round is not None
    # Expected tokens per round count only rounds that drafted: far below what full availability gives.
    truth = 1 + 0.4 * sum(0.9 ** (i + 1) for i in range(best.k))
    assert best.tokens_per_round == pytest.approx(truth, rel=0.35)
    assert best.tokens_per_round < 0.7 * (1 + sum(0.9 ** (i + 1) for i in range(best.k)))


def test_probes_are_a_bounded_share_and_visit_the_neighbours() -> None:
    estimator = BackendEstimator()
    rng = random.Random(8)
    serve(estimator, 2, accept=0.9, cost=GPU, rng=rng)  # warm-up
    reasons = []
    for _ in range(100):
        choice = estimator.choose("code")
        reasons.append(choice.reason)
        estimator.observe(simulate(choice.k, 0.9, GPU, rng))
    assert reasons.count("probe") == 100 // PROBE_EVERY
    assert estimator.neighbours(3) == [4, 2, 0, 5]
    assert estimator.neighbours(0) == [1, 2]


def test_short_requests_and_failures_teach_nothing_about_cost() -> None:
    estimator = BackendEstimator()
    estimator.observe(Observation(k=0, prompt_class="chat", rounds=2, generation_seconds=0.5))
    assert estimator.costs.plain_step is None
    record = RequestRecord("r", "p", "m", "d", "chat", False, 2)
    record.outcome = "client_gone"
    assert observation_from_record(record, "chat") is None


def test_observation_from_a_record_counts_rounds_as_target_tokens() -> None:
    record = RequestRecord("r", "p", "m", "d", "chat", False, 3)
    record.outcome = "success"
    record.absorb_usage({"prompt_tokens": 5, "completion_tokens": 10})
    record.absorb_launcher(
        {
            "num_drafts": 4,
            "num_draft_tokens": 10,
            "num_accepted_tokens": 6,
            "drafted_per_position": [4, 3, 3],
            "accepted_per_position": [3, 2, 1],
            "generation_seconds": 0.3,
        }
    )
    obs = observation_from_record(record, "code")
    assert obs is not None
    assert (obs.k, obs.rounds, obs.drafted, obs.generation_seconds) == (3, 4, 10, 0.3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write a Python function that reverses a string. Reply with code only.", "code"),
        ("Write a SQL query that returns the ten most recent orders.", "code"),
        ("fix this: for (i = 0; i < n; i++) { a[i] = b[i]; }", "code"),
        ("Explain in two sentences what dependency injection is.", "chat"),
        ("Give three short tips for writing readable code.", "chat"),
        ("Write a haiku about compilers.", "chat"),
    ],
)
def test_prompt_class(text: str, expected: str) -> None:
    assert prompt_class("chat", {"messages": [{"role": "user", "content": text}]}) == expected
    assert prompt_class("completion", {"prompt": text, "temperature": 0.7}) == expected + "-sampled"


# --------------------------------------------------------------------------------------------------
# Profiles and the planner
# --------------------------------------------------------------------------------------------------

TWINS = """
[profiles."spec/auto"]
model = "/m"
draft_model = "/d"
num_draft_tokens = "auto"
routing = { twin = "base", queue_threshold = 2 }

[profiles."base"]
model = "/m"
backend = { max_concurrency = 4 }
"""


def test_auto_and_routing_parse() -> None:
    profiles = ProfileSet(parse_profiles(TWINS))
    auto = profiles.get("spec/auto")
    assert auto is not None
    assert auto.adaptive
    assert auto.default_draft_tokens == 0
    assert auto.routing is not None
    assert auto.routing.queue_threshold == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('num_draft_tokens = "auto"', 'num_draft_tokens = "fast"'), "num_draft_tokens"),
        (('twin = "base"', 'twin = "nope"'), "no profile named 'nope'"),
        (('[profiles."base"]\nmodel = "/m"', '[profiles."base"]\nmodel = "/other"'), "same model and dtype"),
        (('draft_model = "/d"\n', ""), "only a profile with a draft model"),
    ],
)
def test_invalid_auto_or_routing_is_refused_with_the_field(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ProfileError, match=message) as caught:
        ProfileSet(parse_profiles(TWINS.replace(*change), source="twins.toml"))
    assert "twins.toml" in str(caught.value)
    assert "spec/auto" in str(caught.value)


@dataclass
class _BackendLoad:
    """One backend's load, set by a test; the planner sees it as an app.proxy.plan.Load."""

    concurrency: int
    running: int = 0
    waiting: int = 0
    up: bool = True


class _Loads:
    """The load function the gateway gives its planner (app.proxy.plan.pool_load), over loads a test sets."""

    def __init__(self, profiles: ProfileSet) -> None:
        self.by_spec = {p.backend_spec: _BackendLoad(1 if p.is_speculative else 4) for p in profiles}
        self.profiles = profiles

    def of(self, name: str) -> _BackendLoad:
        return self.by_spec[self.profiles.profiles[name].backend_spec]

    def __call__(self, profile: Profile) -> Load:
        load = self.by_spec[profile.backend_spec]
        return Load(load.waiting, load.running, load.concurrency, load.up)


FIXED = """
[profiles."spec/3"]
model = "/m"
draft_model = "/d"
num_draft_tokens = 3
"""


@pytest.fixture
def loads() -> _Loads:
    return _Loads(ProfileSet(parse_profiles(TWINS + FIXED)))


@pytest.fixture
def planner(loads: _Loads) -> SpeculationPlanner:
    return SpeculationPlanner(loads, loads.profiles)


def _plan(planner: SpeculationPlanner, body: dict[str, Any]) -> tuple[Plan, BackendRequest, RequestRecord]:
    """Plan a request as the handler does: the planner decides without writing, apply_plan writes."""
    profile = planner.profiles.get(body["model"])
    assert profile is not None
    request = build_backend_request("chat", body, profile)
    before = copy.deepcopy(request)
    plan = planner.plan(profile, body, request)
    assert request == before, "the planner must not change the request"
    record = RequestRecord("r", profile.name, profile.model, profile.draft_model, "chat", False, plan.num_draft_tokens)
    apply_plan(plan, request, record)
    return plan, request, record


def test_planner_routes_only_past_the_threshold_and_to_a_twin_with_room(
    planner: SpeculationPlanner, loads: _Loads
) -> None:
    spec_load, twin_load = loads.of("spec/auto"), loads.of("base")
    body = chat("hi", "spec/auto")
    spec_load.running, spec_load.waiting = 1, 1
    plan, request, record = _plan(planner, body)
    assert plan.routed_to is None
    assert plan.profile.name == "spec/auto"
    assert request.body["num_draft_tokens"] == 0  # warm-up: plain decoding is measured first
    spec_load.waiting = 2
    plan, request, record = _plan(planner, body)
    assert plan.routed_to == "base"
    assert plan.profile.name == "base"
    assert "num_draft_tokens" not in request.body
    assert request.num_draft_tokens is None
    # The record says where it went, and has no draft figures to read or count.
    assert (record.routed_to, record.draft_model, record.num_draft_tokens) == ("base", None, None)
    # A twin that is full and queued at least as long gains nothing.
    twin_load.running, twin_load.waiting = 4, 2
    assert _plan(planner, body)[0].routed_to is None
    # A twin that is not running is not started because of a queue.
    twin_load.running, twin_load.waiting = 0, 0
    twin_load.up = False
    assert _plan(planner, body)[0].routed_to is None
    assert planner.routed() == [("spec/auto", "base", 1)]


def test_planner_sends_the_estimators_k_for_auto_and_leaves_fixed_and_plain_profiles_alone(
    planner: SpeculationPlanner,
) -> None:
    estimator = planner.estimator(planner.profiles.profiles["spec/auto"].backend_spec)
    estimator.observe(simulate(0, 0.9, CPU, random.Random(10)))  # plain decoding measured: drafting next
    plan, request, record = _plan(planner, chat("hello", "spec/auto"))
    assert (plan.num_draft_tokens, plan.k_reason, plan.prompt_class) == (WARMUP_K, "warmup", "chat")
    assert request.body["num_draft_tokens"] == request.num_draft_tokens == record.num_draft_tokens == WARMUP_K
    assert (record.k_reason, record.prompt_class, record.routed_to) == ("warmup", "chat", None)
    plan, request, record = _plan(planner, chat("hello", "spec/3"))
    assert (request.body["num_draft_tokens"], record.num_draft_tokens, record.k_reason) == (3, 3, "fixed")
    plan, request, record = _plan(planner, chat("hello", "base"))
    assert "num_draft_tokens" not in request.body
    assert (plan.num_draft_tokens, record.k_reason, record.prompt_class) == (None, None, None)


def _finished(record: RequestRecord, accepted: int = 6) -> RequestRecord:
    """`record` as the launcher's figures leave it: 20 tokens, `accepted` of them drafted, 0.5 s."""
    k = record.num_draft_tokens or 0
    rounds = 20 - accepted
    record.outcome = "success"
    record.absorb_usage({"prompt_tokens": 5, "completion_tokens": 20})
    record.absorb_launcher(
        {
            "num_draft_tokens": k * rounds,
            "num_accepted_tokens": accepted,
            "drafted_per_position": [rounds] * k,
            "accepted_per_position": [accepted] + [0] * (k - 1) if k else [],
            "generation_seconds": 0.5,
        }
    )
    return record


def test_planner_keeps_a_client_k_and_learns_from_it(planner: SpeculationPlanner) -> None:
    plan, request, record = _plan(planner, chat("def f(x): return x", "spec/auto", num_draft_tokens=5))
    assert request.body["num_draft_tokens"] == 5
    assert plan.k_reason == "client"
    assert plan.prompt_class == "code"
    planner.observe(_finished(record))
    estimator = planner.estimator(planner.profiles.profiles["spec/auto"].backend_spec)
    measured = estimator.costs.measured(5)
    assert measured is not None
    assert measured[0] == pytest.approx(0.5 / 13)  # 14 rounds: the clock starts after the first
    assert estimator.classes["code"].observations == 1


def test_planner_learns_nothing_from_routed_or_failed_requests(planner: SpeculationPlanner) -> None:
    estimator = planner.estimator(planner.profiles.profiles["spec/auto"].backend_spec)
    failed = _finished(_plan(planner, chat("hello", "spec/auto", num_draft_tokens=2))[2])
    failed.outcome = "backend_error"
    planner.observe(failed)
    routed = _finished(_plan(planner, chat("hello", "spec/auto", num_draft_tokens=2))[2])
    routed.routed_to = "base"
    planner.observe(routed)
    assert estimator.observations == 0
    planner.observe(_finished(_plan(planner, chat("hello", "spec/auto", num_draft_tokens=2))[2]))
    assert estimator.observations == 1


def _scrape(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def test_collector_exports_k_estimates_and_routes(planner: SpeculationPlanner, loads: _Loads) -> None:
    registry = CollectorRegistry()
    registry.register(PlannerCollector(planner))
    estimator = planner.estimator(planner.profiles.profiles["spec/auto"].backend_spec)
    serve(estimator, 30, accept=0.91, cost=CPU, rng=random.Random(9), klass="chat")
    _plan(planner, chat("hello", "spec/auto"))  # the profile has now seen the chat class
    labels = {"profile": "spec/auto", "prompt_class": "chat"}
    assert _scrape(registry, "specgate_adaptive_num_draft_tokens", labels) == 0
    assert _scrape(registry, "specgate_adaptive_expected_speedup", labels) == 1.0
    assert _scrape(registry, "specgate_adaptive_acceptance", {**labels, "position": "0"}) == pytest.approx(
        0.91, abs=0.1
    )
    plain = _scrape(registry, "specgate_adaptive_plain_step_seconds", {"profile": "spec/auto"})
    assert plain == pytest.approx(0.77, rel=0.1)
    assert _scrape(registry, "specgate_adaptive_round_seconds", {"profile": "spec/auto", "k": "0"}) == plain
    per_draft = _scrape(registry, "specgate_adaptive_draft_token_seconds", {"profile": "spec/auto"})
    assert per_draft == pytest.approx(1.03, rel=0.15)
    assert _scrape(registry, "specgate_adaptive_probes_total", {"profile": "spec/auto"}) == estimator.probes > 0
    # Only `auto` profiles have estimates to export.
    assert _scrape(registry, "specgate_adaptive_plain_step_seconds", {"profile": "spec/3"}) is None
    routes = {"profile": "spec/auto", "twin": "base"}
    assert _scrape(registry, "specgate_routed_requests_total", routes) is None
    loads.of("spec/auto").waiting = 2
    assert _plan(planner, chat("hello", "spec/auto"))[0].routed_to == "base"
    assert _scrape(registry, "specgate_routed_requests_total", routes) == 1
    explained = planner.explain("spec/auto")
    assert explained is not None
    assert explained["classes"]["chat"]["k"] == 0
    assert planner.explain("base") is None


# --------------------------------------------------------------------------------------------------
# Through a real gateway, tiny models
# --------------------------------------------------------------------------------------------------


def _profiles(main: Path, draft: Path) -> str:
    greedy = "sampling = { temperature = 0.0 }"
    return f"""
[profiles."speculative/tiny-auto"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = "auto"
routing = {{ twin = "baseline/tiny", queue_threshold = 1 }}
{greedy}

[profiles."speculative/tiny-3"]
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 3
{greedy}

[profiles."baseline/tiny"]
model = "{main}"
{greedy}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    main, draft = write_pair(tmp_path_factory.mktemp("tiny"), noise=0.02)
    with running_gateway(tmp_path_factory.mktemp("gw"), _profiles(main, draft), {"SPECGATE_MAX_BACKENDS": "2"}) as gw:
        yield gw


PROMPTS = ["hello", "def fib(n):", "What is the capital of France?", "Write a Python function that adds numbers."]


def _metrics_text(gateway: GatewayProcess) -> str:
    reply = httpx.get(f"{gateway.url}/metrics", timeout=5)
    assert reply.status_code == 200, reply.text
    return reply.text


def _answer(client: httpx.Client, model: str, content: str, max_tokens: int = 40) -> dict[str, Any]:
    reply = client.post("/v1/chat/completions", json=chat(content, model, max_tokens=max_tokens))
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _text(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def test_auto_profile_serves_the_baseline_greedy_output_and_shows_its_k(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        expected = {p: _text(_answer(client, "baseline/tiny", p)) for p in PROMPTS}
        reasons, ks = [], []
        # Enough requests for warm-up, model choices and a probe, on repeated prompts (prompt cache).
        for _ in range(3):
            for prompt in PROMPTS:
                body = _answer(client, "speculative/tiny-auto", prompt)
                assert _text(body) == expected[prompt], prompt
                spec = body["metrics"]["speculative_decoding"]
                reasons.append(spec["num_speculative_tokens_reason"])
                ks.append(spec["num_speculative_tokens"])
                assert (spec["num_draft_tokens"] > 0) == (spec["num_speculative_tokens"] > 0)
        assert reasons[:2] == ["warmup", "warmup"]
        assert ks[:2] == [0, WARMUP_K]
        assert "model" in reasons
        # Streamed, the usage chunk says the same.
        stream_body = chat("def fib(n):", "speculative/tiny-auto", max_tokens=40, stream=True)
        stream_body["stream_options"] = {"include_usage": True}
        with client.stream("POST", "/v1/chat/completions", json=stream_body) as reply:
            lines = [line[5:].strip() for line in reply.iter_lines() if line.startswith("data:")]
        usage = [json.loads(x) for x in lines if x != "[DONE]" and '"usage"' in x]
        assert "num_speculative_tokens" in usage[-1]["metrics"]["speculative_decoding"]
    status = httpx.get(f"{gateway.url}/status.json", timeout=5).json()
    auto = next(p for p in status["profiles"] if p["name"] == "speculative/tiny-auto")
    assert auto["num_draft_tokens"] == "auto"
    assert auto["adaptive"]["classes"]
    metrics = _metrics_text(gateway)
    gauges = [line for line in metrics.splitlines() if line.startswith("specgate_adaptive_num_draft_tokens{")]
    assert any('profile="speculative/tiny-auto"' in line for line in gauges), metrics[:2000]
    assert 'specgate_adaptive_plain_step_seconds{profile="speculative/tiny-auto"}' in metrics


def test_a_queue_routes_requests_to_the_twin_and_says_so(gateway: GatewayProcess) -> None:
    prompt = "What is the capital of France?"
    with gateway.client(timeout=120) as client:
        expected = _text(_answer(client, "baseline/tiny", prompt))  # also: the twin is up
        # Hold the speculative backend: a long stream that this test does not read (backpressure).
        blocker_body = chat("tell me a long story", "speculative/tiny-3", max_tokens=20000, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=blocker_body) as blocker:
            # Keep the iterator: dropping it would close the response, and the backend with it.
            lines = blocker.iter_lines()
            next(lines)
            queued: dict[str, Any] = {}

            def send_queued() -> None:
                with gateway.client(timeout=120) as other:
                    queued["body"] = _answer(other, "speculative/tiny-auto", prompt)

            thread = threading.Thread(target=send_queued)
            thread.start()
            wait_for(
                lambda: gateway.models()["speculative/tiny-auto"]["backend"]["waiting"] == 1,
                30,
                "a request waiting for the speculative backend",
            )
            routed = _answer(client, "speculative/tiny-auto", prompt)
        thread.join(timeout=120)
    spec = routed["metrics"]["speculative_decoding"]
    assert spec["routed_to"] == "baseline/tiny"
    assert spec["num_draft_tokens"] == 0
    assert _text(routed) == expected
    # The request that waited was served by the speculative backend itself.
    assert "routed_to" not in queued["body"]["metrics"]["speculative_decoding"]
    assert _text(queued["body"]) == expected
    metrics = _metrics_text(gateway)
    assert 'specgate_routed_requests_total{profile="speculative/tiny-auto",twin="baseline/tiny"} 1.0' in metrics
