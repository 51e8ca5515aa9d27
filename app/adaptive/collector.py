"""The planner's figures for /metrics: a custom collector, so they are computed at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.adaptive.planner import SpeculationPlanner
from app.profiles import Profile


class PlannerCollector:
    """The k of each `auto` profile and prompt class, the estimates behind it, and routes to twins."""

    def __init__(self, planner: SpeculationPlanner) -> None:
        self.planner = planner

    def describe(self) -> list[Metric]:
        return list(self._metrics([]))

    def collect(self) -> Iterator[Metric]:
        adaptive = [p for p in self.planner.profiles if p.adaptive]
        return self._metrics(adaptive)

    def _metrics(self, profiles: Iterable[Profile]) -> Iterator[Metric]:
        k = GaugeMetricFamily(
            "specgate_adaptive_num_draft_tokens",
            "Draft length an auto profile uses now for a prompt class (0: no drafting)",
            labels=["profile", "prompt_class"],
        )
        speedup = GaugeMetricFamily(
            "specgate_adaptive_expected_speedup",
            "Expected decode speed at the chosen k over plain decoding on the same backend",
            labels=["profile", "prompt_class"],
        )
        acceptance = GaugeMetricFamily(
            "specgate_adaptive_acceptance",
            "Estimated probability that drafted positions 0..position are all accepted",
            labels=["profile", "prompt_class", "position"],
        )
        plain = GaugeMetricFamily(
            "specgate_adaptive_plain_step_seconds",
            "Measured seconds per decode step without drafting",
            labels=["profile"],
        )
        per_draft = GaugeMetricFamily(
            "specgate_adaptive_draft_token_seconds",
            "Fitted seconds a drafted token adds to a round (draft step plus its verification)",
            labels=["profile"],
        )
        rounds = GaugeMetricFamily(
            "specgate_adaptive_round_seconds",
            "Measured seconds per verification round at draft length k",
            labels=["profile", "k"],
        )
        probes = CounterMetricFamily(
            "specgate_adaptive_probes", "Requests sent with a neighbouring k to explore", labels=["profile"]
        )
        routed = CounterMetricFamily(
            "specgate_routed_requests",
            "Requests of a speculative profile served by its baseline twin because of its queue",
            labels=["profile", "twin"],
        )
        for profile in profiles:
            self._profile_samples(profile, k, speedup, acceptance, plain, per_draft, rounds, probes)
        for name, twin, count in self.planner.routed():
            routed.add_metric([name, twin], count)
        yield from (k, speedup, acceptance, plain, per_draft, rounds, probes, routed)

    def _profile_samples(self, profile: Profile, *families: Any) -> None:
        k, speedup, acceptance, plain, per_draft, rounds, probes = families
        estimator = self.planner.estimator(profile.backend_spec)
        info = self.planner.explain(profile.name) or {}
        for klass, figures in info.get("classes", {}).items():
            k.add_metric([profile.name, klass], figures["k"])
            if figures["expected_speedup"] is not None:
                speedup.add_metric([profile.name, klass], figures["expected_speedup"])
            for position, value in enumerate(figures["acceptance_by_position"]):
                if value is not None:
                    acceptance.add_metric([profile.name, klass, str(position)], value)
        if estimator.costs.plain_step is not None:
            plain.add_metric([profile.name], estimator.costs.plain_step)
        if estimator.costs.draft_token_seconds is not None:
            per_draft.add_metric([profile.name], estimator.costs.draft_token_seconds)
        for length in estimator.costs.lengths:
            measured = estimator.costs.measured(length)
            if measured is not None:
                rounds.add_metric([profile.name, str(length)], measured[0])
        probes.add_metric([profile.name], estimator.probes)
