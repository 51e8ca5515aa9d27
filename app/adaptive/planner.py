"""Decisions for speculative profiles: the draft length of `auto` requests, and routing to the baseline twin.

The planner decides and learns; it never writes into a request or its record. `plan` returns a `Plan`
(app/proxy/plan.py) that the proxy applies; `observe` reads finished records, turns them into
Observations and feeds the estimator of the backend that served them (app/adaptive/estimator.py).
Lives in the event loop with the handler: `plan` runs before admission, `observe` after a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.adaptive.estimator import BackendEstimator, Observation
from app.adaptive.prompt_classes import prompt_class
from app.backends.pool import BackendPool, BackendSlot
from app.profiles import BackendSpec, Profile, ProfileSet
from app.proxy.plan import Plan
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest


def observation_from_record(record: RequestRecord, klass: str) -> Observation | None:
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

    def __init__(self, pool: BackendPool, profiles: ProfileSet) -> None:
        self.pool = pool
        self.profiles = profiles
        self.estimators: dict[BackendSpec, BackendEstimator] = {}
        self._routes: dict[tuple[str, str], _RouteCount] = {}
        self._classes_seen: dict[str, set[str]] = {}

    def estimator(self, spec: BackendSpec) -> BackendEstimator:
        estimator = self.estimators.get(spec)
        if estimator is None:
            estimator = self.estimators[spec] = BackendEstimator()
        return estimator

    def plan(self, profile: Profile, body: dict[str, Any], request: BackendRequest) -> Plan:
        """The slot and draft length for a request: `body` as the client sent it, `request` as rewritten."""
        slot = self.pool.slot_for(profile)
        if not profile.is_speculative:
            return Plan(slot, request.num_draft_tokens)
        twin = self._twin_under_contention(profile, slot)
        if twin is not None:
            self._count_route(profile.name, twin.name)
            # The twin has no draft: the request goes without a draft length.
            return Plan(self.pool.slot_for(twin), None, routed_to=twin.name)
        klass = prompt_class(request.kind, request.body)
        if "num_draft_tokens" in body:
            return Plan(slot, request.num_draft_tokens, k_reason="client", prompt_class=klass)
        if not profile.adaptive:
            return Plan(slot, request.num_draft_tokens, k_reason="fixed", prompt_class=klass)
        self._classes_seen.setdefault(profile.name, set()).add(klass)
        choice = self.estimator(profile.backend_spec).choose(klass)
        return Plan(slot, choice.k, k_reason=choice.reason, prompt_class=klass)

    def _twin_under_contention(self, profile: Profile, slot: BackendSlot) -> Profile | None:
        routing = profile.routing
        if routing is None or slot.admission.waiting < routing.queue_threshold:
            return None
        twin = self.profiles.get(routing.twin)
        if twin is None:
            return None
        twin_slot = self.pool.slot_for(twin)
        # Never load a model because of a queue: the twin must be up (preload it), and less busy.
        if not twin_slot.backend.is_running:
            return None
        admission = twin_slot.admission
        if admission.running >= admission.concurrency and admission.waiting >= slot.admission.waiting:
            return None
        return twin

    def _count_route(self, profile: str, twin: str) -> None:
        key = (profile, twin)
        self._routes.setdefault(key, _RouteCount(profile, twin)).count += 1

    def observe(self, record: RequestRecord) -> None:
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
