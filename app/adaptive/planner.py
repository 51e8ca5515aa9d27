"""Decisions for speculative profiles: the draft length of `auto` requests, and routing to the baseline twin.

The planner decides and learns; it never writes into a request or its record. It knows the proxy and the
backends only through the contract in app/proxy/plan.py: `plan` reads a `PlannedRequest` and the backends'
`Load` (a function it is given) and returns a `Plan` that the proxy applies; `observe` reads a
`FinishedRequest`, turns it into an Observation and feeds the estimator of the backend that served it
(app/adaptive/estimator.py).
Lives in the event loop with the handler: `plan` runs before admission, `observe` after a request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.adaptive.estimator import BackendEstimator, Observation
from app.adaptive.prompt_classes import prompt_class
from app.profiles import BackendSpec, Profile, ProfileSet
from app.proxy.plan import FinishedRequest, Load, Plan, PlannedRequest


def observation_from_record(record: FinishedRequest, klass: str) -> Observation | None:
    """What a finished request tells the estimator; None for a failure or a request without figures."""
    spec = record.spec
    seconds = record.backend_generation_seconds
    if record.outcome != "success" or spec is None or seconds is None or record.num_draft_tokens is None:
        return None
    return Observation(
        k=record.num_draft_tokens,
        prompt_class=klass,
        rounds=record.generation_tokens - spec.num_accepted_tokens,
        generation_seconds=seconds,
        drafted_per_position=tuple(spec.drafted_per_position),
        accepted_per_position=tuple(spec.accepted_per_position),
    )


@dataclass
class _RouteCount:
    profile: str
    twin: str
    count: int = 0


class SpeculationPlanner:
    """Chooses k for `auto` profiles and routes to the baseline twin under contention."""

    def __init__(self, load: Callable[[Profile], Load], profiles: ProfileSet) -> None:
        # The load of a profile's backend now (app/proxy/plan.py's pool_load, wired by the gateway).
        self.load = load
        self.profiles = profiles
        self.estimators: dict[BackendSpec, BackendEstimator] = {}
        self._routes: dict[tuple[str, str], _RouteCount] = {}
        self._classes_seen: dict[str, set[str]] = {}

    def estimator(self, spec: BackendSpec) -> BackendEstimator:
        estimator = self.estimators.get(spec)
        if estimator is None:
            estimator = self.estimators[spec] = BackendEstimator()
        return estimator

    def plan(self, profile: Profile, body: Mapping[str, Any], request: PlannedRequest) -> Plan:
        """The profile to serve and the draft length: `body` as the client sent it, `request` as rewritten."""
        if not profile.is_speculative:
            return Plan(profile, request.num_draft_tokens)
        twin = self._twin_under_contention(profile)
        if twin is not None:
            self._count_route(profile.name, twin.name)
            # The twin has no draft: the request goes without a draft length.
            return Plan(twin, None, routed_to=twin.name)
        klass = prompt_class(request.kind, request.body)
        if "num_draft_tokens" in body:
            return Plan(profile, request.num_draft_tokens, k_reason="client", prompt_class=klass)
        if not profile.adaptive:
            return Plan(profile, request.num_draft_tokens, k_reason="fixed", prompt_class=klass)
        self._classes_seen.setdefault(profile.name, set()).add(klass)
        choice = self.estimator(profile.backend_spec).choose(klass)
        return Plan(profile, choice.k, k_reason=choice.reason, prompt_class=klass)

    def _twin_under_contention(self, profile: Profile) -> Profile | None:
        routing = profile.routing
        if routing is None:
            return None
        load = self.load(profile)
        if load.waiting < routing.queue_threshold:
            return None
        twin = self.profiles.get(routing.twin)
        if twin is None:
            return None
        twin_load = self.load(twin)
        # Never load a model because of a queue: the twin must be up (preload it), and less busy.
        if not twin_load.backend_up:
            return None
        if twin_load.running >= twin_load.concurrency and twin_load.waiting >= load.waiting:
            return None
        return twin

    def _count_route(self, profile: str, twin: str) -> None:
        key = (profile, twin)
        self._routes.setdefault(key, _RouteCount(profile, twin)).count += 1

    def observe(self, record: FinishedRequest) -> None:
        """Handler observer: every finished request on a drafting backend feeds its estimator."""
        if record.routed_to is not None:
            return
        profile = self.profiles.get(record.profile)
        if profile is None or not profile.is_speculative:
            return
        obs = observation_from_record(record, record.prompt_class or "chat")
        if obs is not None:
            self.estimator(profile.backend_spec).observe(obs)

    def explain(self, name: str) -> dict[str, Any] | None:
        """An `auto` profile's current choice and the estimates behind it (status page, /metrics)."""
        profile = self.profiles.get(name)
        if profile is None or not profile.adaptive:
            return None
        estimator = self.estimator(profile.backend_spec)
        info = estimator.explain()
        seen = self._classes_seen.get(profile.name)
        if seen:
            info["classes"] = {k: v for k, v in info["classes"].items() if k in seen} or info["classes"]
        return info

    def routed(self) -> list[tuple[str, str, int]]:
        return [(r.profile, r.twin, r.count) for r in self._routes.values()]
