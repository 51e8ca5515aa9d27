"""From samples to figures: per-arm medians and spreads, speed-up against the baseline measured in the same
run, greedy equality with the baseline, and the best draft length of a sweep."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from app.bench.client import Sample
from app.bench.runner import Arm, BenchRun
from app.bench.sample_stats import Summary, paired_speedup, speedup, summarize

SNIPPET = 40


@dataclass(frozen=True)
class Divergence:
    """Where a candidate's greedy output first differs from the baseline's (a character offset)."""

    prompt_id: str
    rep: int
    position: int
    baseline: str
    candidate: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "rep": self.rep,
            "position": self.position,
            "baseline": self.baseline,
            "candidate": self.candidate,
        }


@dataclass(frozen=True)
class Equality:
    compared: int
    equal: int
    first_divergence: Divergence | None

    @property
    def identical(self) -> bool:
        return self.compared > 0 and self.equal == self.compared

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "equal": self.equal,
            "identical": self.identical,
            "first_divergence": self.first_divergence.as_dict() if self.first_divergence else None,
        }


def first_difference(a: str, b: str) -> int | None:
    """Index of the first differing character; the shorter length when one is a prefix; None if equal."""
    if a == b:
        return None
    for index, (left, right) in enumerate(zip(a, b, strict=False)):
        if left != right:
            return index
    return min(len(a), len(b))


@dataclass
class ArmResult:
    arm: Arm
    requests: int
    failed: int
    decode_tps: Summary | None
    ttft: Summary | None
    e2e: Summary | None
    server_decode_tps: Summary | None
    completion_tokens: Summary | None
    cached_tokens: Summary | None
    acceptance_rate: float | None
    mean_acceptance_length: float | None
    acceptance_by_position: list[float]
    speedup: float | None = None
    paired_speedup: float | None = None
    equality: Equality | None = None
    errors: list[str] = field(default_factory=list)
    # Requests whose tokens arrived in bursts: their decode rate is the backend's (see Sample.burst).
    bursts: int = 0
    # Draft lengths the gateway chose itself (`num_draft_tokens = "auto"`), as "k (reason)" -> requests.
    chosen_k: dict[str, int] = field(default_factory=dict)
    # The fastest plain decoding measured for this arm's baseline (the baseline itself, or a k = 0 arm on
    # the speculative backend, whichever decoded faster) and the paired speed-up against it.
    fastest_plain: str | None = None
    speedup_vs_fastest_plain: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def summary(value: Summary | None) -> dict[str, Any] | None:
            return value.as_dict() if value else None

        return {
            "label": self.arm.label,
            "profile": self.arm.profile,
            "role": self.arm.role,
            "num_draft_tokens": self.arm.k,
            "baseline": self.arm.baseline,
            "requests": self.requests,
            "failed": self.failed,
            "decode_tokens_per_second": summary(self.decode_tps),
            "burst_requests": self.bursts,
            "num_speculative_tokens_chosen": self.chosen_k,
            "ttft_s": summary(self.ttft),
            "e2e_s": summary(self.e2e),
            "server_decode_tokens_per_second": summary(self.server_decode_tps),
            "completion_tokens": summary(self.completion_tokens),
            "cached_tokens": summary(self.cached_tokens),
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_by_position": self.acceptance_by_position,
            "speedup": self.speedup,
            "paired_speedup": self.paired_speedup,
            "fastest_plain": self.fastest_plain,
            "speedup_vs_fastest_plain": self.speedup_vs_fastest_plain,
            "greedy_equal_to_baseline": self.equality.as_dict() if self.equality else None,
            "errors": self.errors[:5],
        }


@dataclass
class SweepPoint:
    k: int
    label: str
    decode_tps: float | None
    acceptance_rate: float | None
    speedup: float | None


@dataclass
class SweepResult:
    profile: str
    baseline: str | None
    baseline_tps: float | None
    points: list[SweepPoint]

    @property
    def best(self) -> SweepPoint | None:
        measured = [point for point in self.points if point.decode_tps is not None]
        return max(measured, key=lambda point: point.decode_tps or 0.0) if measured else None

    @property
    def verdict(self) -> str:
        best = self.best
        if best is None:
            return "no k could be measured"
        if self.baseline_tps is not None and best.decode_tps is not None and best.decode_tps < self.baseline_tps:
            return (
                f"no draft length pays here: the best, k={best.k}, decodes at {best.speedup or 0:.2f}x the baseline; "
                f"use {self.baseline}"
            )
        suffix = f" ({best.speedup:.2f}x the baseline)" if best.speedup is not None else ""
        if best.k == 0:
            return f"best k = 0: drafting does not pay here{suffix}; use {self.baseline or 'a profile without a draft'}"
        return f"best k = {best.k}{suffix}"

    def as_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "profile": self.profile,
            "baseline": self.baseline,
            "baseline_decode_tokens_per_second": self.baseline_tps,
            "points": [point.__dict__ for point in self.points],
            "best_k": best.k if best else None,
            "verdict": self.verdict,
        }


@dataclass
class BenchResult:
    run: BenchRun
    arms: list[ArmResult]
    sweeps: list[SweepResult]

    @property
    def load_during(self) -> Summary | None:
        return summarize([sample.load for sample in self.run.samples])

    def arm(self, label: str) -> ArmResult | None:
        return next((result for result in self.arms if result.arm.label == label), None)

    def as_dict(self) -> dict[str, Any]:
        config = self.run.config
        return {
            "url": config.url,
            "prompt_set": config.prompts.name,
            "prompts": [prompt.id for prompt in config.prompts.prompts],
            "repetitions": config.repetitions,
            "warmup": config.warmup,
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "sweep_k": config.sweep_k,
            "started": self.run.started,
            "seconds": round(self.run.finished - self.run.started, 1),
            "load_average_before": self.run.load_before,
            "load_average_after": self.run.load_after,
            "load_average_1m_during": self.load_during.as_dict() if self.load_during else None,
            "machine": self.run.machine,
            "arms": [result.as_dict() for result in self.arms],
            "sweeps": [sweep.as_dict() for sweep in self.sweeps],
            "samples": [sample.as_dict() for sample in self.run.samples],
        }


# ----- computing --------------------------------------------------------------------------------------


def analyze(run: BenchRun) -> BenchResult:
    by_arm: dict[str, list[Sample]] = defaultdict(list)
    for sample in run.samples:
        by_arm[sample.arm].append(sample)
    greedy = run.config.temperature == 0
    results = {arm.label: _arm_result(arm, by_arm[arm.label]) for arm in run.arms}
    for arm in run.arms:
        if arm.baseline is None or arm.baseline not in results:
            continue
        result, base = results[arm.label], results[arm.baseline]
        result.speedup = speedup(_median(result.decode_tps), _median(base.decode_tps))
        result.paired_speedup = paired_speedup(_pairs(by_arm[arm.label], by_arm[arm.baseline]))
        if greedy:
            result.equality = compare_outputs(by_arm[arm.label], by_arm[arm.baseline])
    for arm in run.arms:
        # A baseline against itself across repetitions: greedy decoding should be deterministic.
        if arm.role == "baseline" and greedy:
            results[arm.label].equality = compare_outputs(by_arm[arm.label], by_arm[arm.label])
    _against_fastest_plain(run.arms, results, by_arm)
    arms = [results[arm.label] for arm in run.arms]
    return BenchResult(run=run, arms=arms, sweeps=_sweeps(run.arms, results))


def _against_fastest_plain(arms: list[Arm], results: dict[str, ArmResult], by_arm: dict[str, list[Sample]]) -> None:
    """Speed-ups against the fastest plain decoding measured, not only the baseline profile.

    A baseline backend and a speculative backend at k = 0 decode the same model plainly, but not always
    through the same code (mlx_lm's batch generator is 1.3-1.5x slower on an H100): a speed-up against
    the slower of the two would flatter speculation.
    """
    for baseline in {arm.baseline for arm in arms if arm.baseline in results}:
        assert baseline is not None
        plain = [results[baseline]] + [results[a.label] for a in arms if a.baseline == baseline and a.k == 0]
        fastest = max(plain, key=lambda result: _median(result.decode_tps) or 0.0)
        for arm in arms:
            if arm.baseline != baseline:
                continue
            result = results[arm.label]
            result.fastest_plain = fastest.arm.label
            result.speedup_vs_fastest_plain = paired_speedup(_pairs(by_arm[arm.label], by_arm[fastest.arm.label]))


def _median(summary: Summary | None) -> float | None:
    return summary.median if summary else None


def _arm_result(arm: Arm, samples: list[Sample]) -> ArmResult:
    good = [sample for sample in samples if sample.error is None]
    rate, length, by_position = acceptance(good)
    server_tps = [(s.timings or {}).get("predicted_per_second") for s in good]
    return ArmResult(
        arm=arm,
        requests=len(samples),
        failed=len(samples) - len(good),
        decode_tps=summarize([s.decode_tps for s in good]),
        ttft=summarize([s.ttft for s in good]),
        e2e=summarize([s.e2e for s in good]),
        server_decode_tps=summarize([float(v) if isinstance(v, int | float) else None for v in server_tps]),
        completion_tokens=summarize([float(s.completion_tokens) for s in good]),
        cached_tokens=summarize([float(s.cached_tokens) for s in good]),
        acceptance_rate=rate,
        mean_acceptance_length=length,
        acceptance_by_position=by_position,
        errors=[f"{s.prompt_id} rep {s.rep + 1}: {s.error}" for s in samples if s.error],
        bursts=sum(s.burst for s in good),
        chosen_k=chosen_draft_lengths(good),
    )


def chosen_draft_lengths(samples: list[Sample]) -> dict[str, int]:
    """How often the gateway chose each k and why (`auto` profiles report both per answer), by k."""
    counts: dict[tuple[int, str], int] = defaultdict(int)
    for sample in samples:
        spec = sample.spec or {}
        k = spec.get("num_speculative_tokens")
        if isinstance(k, int) and not isinstance(k, bool):
            counts[(k, str(spec.get("num_speculative_tokens_reason") or "?"))] += 1
    return {f"{k} ({reason})": count for (k, reason), count in sorted(counts.items())}


def acceptance(samples: list[Sample]) -> tuple[float | None, float | None, list[float]]:
    """Pooled over requests, as vLLM computes them from its counters: accepted / drafted,
    1 + accepted / verification steps, and per draft position accepted[i] / steps."""
    steps = drafted = accepted = 0
    per_position: list[int] = []
    for sample in samples:
        spec = sample.spec or {}
        steps += int(spec.get("num_spec_steps") or 0)
        drafted += int(spec.get("num_draft_tokens") or 0)
        accepted += int(spec.get("num_accepted_draft_tokens") or 0)
        for index, count in enumerate(spec.get("acceptance_histogram") or []):
            if index >= len(per_position):
                per_position.append(0)
            per_position[index] += int(count)
    rate = accepted / drafted if drafted else None
    length = 1.0 + accepted / steps if steps else None
    return rate, length, [count / steps for count in per_position] if steps else []


def _pairs(candidate: list[Sample], baseline: list[Sample]) -> list[tuple[float | None, float | None]]:
    base = {(s.prompt_id, s.rep): s.decode_tps for s in baseline if s.error is None}
    return [(s.decode_tps, base.get((s.prompt_id, s.rep))) for s in candidate if s.error is None]


def compare_outputs(candidate: list[Sample], baseline: list[Sample]) -> Equality:
    """Each candidate output against the baseline's first output for the same prompt."""
    reference: dict[str, str] = {}
    for sample in sorted(baseline, key=lambda s: s.rep):
        if sample.error is None:
            reference.setdefault(sample.prompt_id, sample.output)
    compared = equal = 0
    first: Divergence | None = None
    for sample in sorted(candidate, key=lambda s: (s.rep, s.prompt_id)):
        expected = reference.get(sample.prompt_id)
        if sample.error is not None or expected is None:
            continue
        compared += 1
        position = first_difference(expected, sample.output)
        if position is None:
            equal += 1
        elif first is None:
            first = Divergence(
                sample.prompt_id,
                sample.rep,
                position,
                expected[position : position + SNIPPET],
                sample.output[position : position + SNIPPET],
            )
    return Equality(compared, equal, first)


def _sweeps(arms: list[Arm], results: dict[str, ArmResult]) -> list[SweepResult]:
    groups: dict[str, list[Arm]] = defaultdict(list)
    for arm in arms:
        if arm.role == "sweep":
            groups[arm.profile].append(arm)
    sweeps = []
    for profile, members in groups.items():
        baseline = members[0].baseline
        base_result = results.get(baseline) if baseline else None
        points = [
            SweepPoint(
                k=arm.k if arm.k is not None else -1,
                label=arm.label,
                decode_tps=_median(results[arm.label].decode_tps),
                acceptance_rate=results[arm.label].acceptance_rate,
                speedup=results[arm.label].paired_speedup,
            )
            for arm in members
        ]
        sweeps.append(SweepResult(profile, baseline, _median(base_result.decode_tps) if base_result else None, points))
    return sweeps
