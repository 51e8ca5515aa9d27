"""The model behind `num_draft_tokens = "auto"`: from finished requests, the expected speed of each draft
length k on one backend, and the k to use next. Plain arithmetic on counts and timings: no request,
record, pool or metrics types (app/adaptive/planner.py turns records into Observations).

## The model (per backend; acceptance also per prompt class)

A request decoded with draft length k runs R verification rounds (R = generated tokens - accepted
tokens: every round ends with one token of the target). Each round drafts d <= k tokens (fewer at
the end of a request; a prompt-lookup draft may find nothing) and verifies them in one pass:

    seconds per round      c(k) ~= c_verify(k) + k * c_draft ~= c0 + s * x(k)
    drafted per round      x(k)  = sum_{i<k} a_i
    tokens per round       E(k)  = 1 + sum_{i<k} a_i * q_i
    expected tokens/sec    E(k) / c(k); speed-up over plain decoding E(k) * c0 / c(k)

- q_i: probability that drafted position i is accepted, i.e. that positions 0..i all match. The
  launcher's `accepted_per_position[i] / drafted_per_position[i]` estimates it directly (both count
  rounds). It is the product of the per-position conditional acceptances p_0 * ... * p_i.
- a_i: probability that a round drafts position i when k > i (1 for a model draft except near the
  end of a request; below 1 for prompt lookup).
- c0: the plain decode step, measured by k = 0 requests (the backend decodes without drafting).
- s: seconds added per drafted token: a draft step plus the extra verification work of one more
  token. c_verify and c_draft cannot be told apart from a request's totals (every round pays
  both), and the choice of k does not need them apart; `s` is their sum, fitted through c0 over
  the draft lengths measured (least squares of c(k) - c0 on x(k)).

Only `generation_seconds` (first token -> last token) is used: it spans R - 1 rounds, so one
request gives c = generation_seconds / (R - 1) at its mean drafted per round D / R. Costs are kept
per k as the median of the last few requests (robust to one slow request on a shared machine, and
a new regime wins after two); a k never measured is predicted by c0 + s * x(k). Acceptance counts
decay with every observation that carries drafts (a prompt-class change shows within a few
requests); a class's estimate leans on the backend's pooled one until it has data of its own,
and positions never drafted extrapolate the last measured conditional acceptance.

## Exploration

Decisions start by measuring: k = 0 until c0 is known, then k = 2 once until some drafting cost is
known (requests of fixed-k profiles on the same backend count too). After that every
PROBE_EVERY-th decision for a prompt class on a backend is a probe of a neighbour of the current best (k+1, k-1, 0,
k+2, in turn), so a bounded share of traffic keeps the costs of the alternatives current and a
changed machine or prompt mix is noticed.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Draft lengths `auto` chooses from. Clients may still ask for up to 64 themselves.
K_MAX = 12
# One decision in this many is a probe: the bounded share of traffic spent on exploring.
PROBE_EVERY = 10
# The draft length tried once to learn what drafting costs, when nothing has measured it yet.
WARMUP_K = 2
# Requests kept per draft length for its cost (the median of them is used), and how many requests
# on the backend a cost at k > 0 stays valid: a k nobody tried lately is predicted from fresh ones.
COST_WINDOW = 3
COST_MEMORY = 60
# Two successive requests off their predicted cost by this factor, the same way, mean a new regime.
SHIFT = 1.6
# Acceptance counts are multiplied by this on each observation that drafted (memory ~4 requests).
ACCEPTANCE_DECAY = 0.75
# Pseudo-rounds of prior belief: for the backend (towards PRIOR_CONDITIONAL) and for a class
# (towards the backend's pooled estimate).
PRIOR_ROUNDS = 4.0
CLASS_PRIOR_ROUNDS = 8.0
PRIOR_CONDITIONAL = 0.6
# Drafted rounds at a position before its conditional acceptance is used to extrapolate deeper ones.
EXTRAPOLATE_FROM_ROUNDS = 4.0
# A longer k must beat a shorter one by this factor: drafting that barely pays is not worth its noise.
PREFER_SHORTER = 1.01
# Requests with fewer rounds say little about the time per round.
MIN_ROUNDS = 3
# Why the estimator chose k: to measure what it lacks, by its model, or to explore a neighbour.
Reason = Literal["warmup", "model", "probe"]


@dataclass(frozen=True)
class Observation:
    """What one finished request on a drafting backend tells the estimator."""

    k: int
    prompt_class: str
    rounds: int
    generation_seconds: float
    drafted_per_position: Sequence[int] = ()
    accepted_per_position: Sequence[int] = ()

    @property
    def drafted(self) -> int:
        return sum(self.drafted_per_position)


@dataclass(frozen=True)
class AcceptanceEstimate:
    """Per draft position i: p[i] = P(i accepted | 0..i-1 accepted), q[i] = p[0] * ... * p[i]
    (P(positions 0..i all accepted | i drafted)), a[i] = P(a round drafts i | k > i)."""

    p: tuple[float, ...]
    q: tuple[float, ...]
    a: tuple[float, ...]

    def tokens_per_round(self, k: int) -> float:
        return 1.0 + sum(self.a[i] * self.q[i] for i in range(k))

    def drafted_per_round(self, k: int) -> float:
        return sum(self.a[:k])


class Acceptance:
    """Decayed per-position counts behind the conditional acceptance and the draft's availability.

    The conditional at position i is counted within each request, on the rounds that reached it
    (accepted at i over accepted at i-1): pooling `accepted[i] / drafted[i]` over requests of
    different k would mix populations, since only requests with long k reach deep positions.
    """

    def __init__(self, positions: int = K_MAX) -> None:
        self.accepted = [0.0] * positions  # rounds that accepted position i
        self.reached = [0.0] * positions  # rounds that drafted i with 0..i-1 accepted (estimated)
        self.drafted = [0.0] * positions
        self.eligible = [0.0] * positions  # rounds of requests whose k > i
        self.observations = 0

    def add(self, obs: Observation) -> None:
        if obs.drafted == 0:
            return
        self.observations += 1
        for counts in (self.accepted, self.reached, self.drafted, self.eligible):
            for i in range(len(counts)):
                counts[i] *= ACCEPTANCE_DECAY
        drafted, accepted = obs.drafted_per_position, obs.accepted_per_position
        for i in range(min(len(self.accepted), len(drafted), obs.k)):
            self.drafted[i] += drafted[i]
            self.eligible[i] += max(obs.rounds, drafted[i])
            self.accepted[i] += accepted[i] if i < len(accepted) else 0
            if i == 0:
                self.reached[0] += drafted[0]
            elif drafted[i - 1] > 0:
                # Rounds that accepted i-1 and went on to draft i; a draft that runs dry (prompt
                # lookup) is assumed to do so independently of acceptance.
                self.reached[i] += accepted[i - 1] * drafted[i] / drafted[i - 1]

    def estimate(self, prior: AcceptanceEstimate | None = None, strength: float = PRIOR_ROUNDS) -> AcceptanceEstimate:
        """Posterior means per position, shrunk towards `prior`; without one, positions with few
        rounds lean on the deepest conditional that has enough (PRIOR_CONDITIONAL before any)."""
        p: list[float] = []
        q: list[float] = []
        a: list[float] = []
        product, conditional = 1.0, PRIOR_CONDITIONAL
        for i in range(len(self.accepted)):
            prior_p = prior.p[i] if prior is not None else conditional
            prior_a = prior.a[i] if prior is not None else 1.0
            value = (self.accepted[i] + strength * prior_p) / (self.reached[i] + strength)
            value = min(max(value, 0.0), 0.99)
            if self.reached[i] >= EXTRAPOLATE_FROM_ROUNDS:
                conditional = value
            product *= value
            p.append(value)
            q.append(product)
            a.append(min(1.0, (self.drafted[i] + strength * prior_a) / (self.eligible[i] + strength)))
        return AcceptanceEstimate(tuple(p), tuple(q), tuple(a))


class RoundCosts:
    """Seconds per verification round, per draft length, from the last few requests at each.

    A change of regime (the machine got busier or idle) shows as two successive requests, at any k,
    each off its prediction by SHIFT or more in the same direction. The older samples are then
    dropped: the k's measured since speak for themselves, plain decoding is measured again when
    needed, and the old per-draft-token cost, scaled by the shift, stands in until a drafting request
    measures it again (so a busy CPU does not pay for another drafting warm-up).
    """

    def __init__(self) -> None:
        # k -> (seconds per round, drafted per round, observation number)
        self.samples: dict[int, deque[tuple[float, float, int]]] = {}
        self.observations = 0
        self._previous_surprise = 1.0
        self._prior_slope: float | None = None

    def add(self, obs: Observation) -> None:
        if obs.rounds < MIN_ROUNDS or obs.generation_seconds <= 0:
            return
        self.observations += 1
        # generation_seconds starts at the first token, i.e. after the first round.
        per_round = obs.generation_seconds / (obs.rounds - 1)
        drafted = obs.drafted / obs.rounds
        expected = self.predict(obs.k, drafted)
        surprise = 1.0 if expected is None or expected <= 0 else per_round / expected
        if abs(math.log(surprise)) < math.log(SHIFT):
            surprise = 1.0
        same_way = surprise != 1.0 and (surprise > 1.0) == (self._previous_surprise > 1.0)
        if same_way and self._previous_surprise != 1.0:
            self._restart(math.sqrt(surprise * self._previous_surprise))
            surprise = 1.0
        self._previous_surprise = surprise
        self.samples.setdefault(obs.k, deque(maxlen=COST_WINDOW)).append((per_round, drafted, self.observations))

    def _restart(self, factor: float) -> None:
        slope = self.draft_token_seconds
        if slope is not None:
            self._prior_slope = slope * factor
        # Keep the previous request's sample: it was the first of the new regime.
        since = self.observations - 1
        for k in list(self.samples):
            kept = [sample for sample in self.samples[k] if sample[2] >= since]
            self.samples[k] = deque(kept, maxlen=COST_WINDOW)

    def measured(self, k: int) -> tuple[float, float] | None:
        """(median seconds per round, mean drafted per round) at draft length k, if measured lately."""
        # The plain step never expires: it anchors every prediction, and a new regime replaces it anyway.
        oldest = self.observations - COST_MEMORY if k > 0 else 0
        # tuple(): one C-level copy, safe while a scrape in another thread reads and the loop appends.
        fresh = [(s, d) for s, d, n in tuple(self.samples.get(k, ())) if n > oldest]
        if not fresh:
            return None
        return statistics.median(s for s, _ in fresh), statistics.fmean(d for _, d in fresh)

    @property
    def lengths(self) -> list[int]:
        """Draft lengths with a current measurement."""
        return [k for k in sorted(self.samples) if self.measured(k) is not None]

    @property
    def plain_step(self) -> float | None:
        measured = self.measured(0)
        return measured[0] if measured else None

    @property
    def draft_token_seconds(self) -> float | None:
        """s: least squares of c(k) - c0 on drafted per round, through the origin; never negative."""
        c0 = self.plain_step
        points = [m for k in self.lengths if k > 0 and (m := self.measured(k)) is not None and m[1] > 0]
        if c0 is None:
            return None
        if not points:
            return self._prior_slope
        slope = sum((c - c0) * x for c, x in points) / sum(x * x for _, x in points)
        return max(slope, 0.0)

    def predict(self, k: int, drafted_per_round: float) -> float | None:
        measured = self.measured(k)
        if measured is not None:
            return measured[0]
        c0, s = self.plain_step, self.draft_token_seconds
        if c0 is None or s is None:
            return None
        return c0 + s * drafted_per_round


@dataclass(frozen=True)
class Choice:
    """A draft length and why; the expectations are those of the model (None while warming up)."""

    k: int
    reason: Reason
    expected_speedup: float | None = None
    tokens_per_round: float | None = None
    round_seconds: float | None = None


class BackendEstimator:
    """Costs of one backend and acceptance per prompt class; chooses k for the next request."""

    def __init__(self, k_max: int = K_MAX) -> None:
        self.k_max = k_max
        self.costs = RoundCosts()
        self.pooled = Acceptance()
        self.classes: dict[str, Acceptance] = {}
        # Per prompt class: with one counter, classes that alternate would leave all probes to one.
        self.decisions: dict[str, int] = {}
        self.probes_by_class: dict[str, int] = {}
        self.observations = 0

    def observe(self, obs: Observation) -> None:
        self.observations += 1
        self.costs.add(obs)
        self.pooled.add(obs)
        self.classes.setdefault(obs.prompt_class, Acceptance()).add(obs)

    def acceptance(self, klass: str) -> AcceptanceEstimate:
        pooled = self.pooled.estimate()
        mine = self.classes.get(klass)
        return mine.estimate(pooled, CLASS_PRIOR_ROUNDS) if mine is not None else pooled

    def evaluate(self, klass: str, k: int) -> Choice | None:
        """The model's expectations for draft length k on prompts of `klass`; None without costs."""
        c0 = self.costs.plain_step
        estimate = self.acceptance(klass)
        cost = self.costs.predict(k, estimate.drafted_per_round(k))
        if c0 is None or cost is None or cost <= 0:
            return None
        tokens = estimate.tokens_per_round(k)
        return Choice(k, "model", tokens * c0 / cost, tokens, cost)

    def best(self, klass: str) -> Choice:
        """The best k by the model, or the measurement the model still lacks. No side effects."""
        if self.costs.plain_step is None:
            return Choice(0, "warmup")
        if self.costs.draft_token_seconds is None:
            return Choice(WARMUP_K, "warmup")
        best: Choice | None = None
        # Trust region: one step beyond the longest k measured. Deeper positions are extrapolated,
        # and a jump on an extrapolation costs whole requests; the model climbs a step per request.
        reach = min(self.k_max, max(self.costs.lengths) + 1)
        for k in range(reach + 1):
            candidate = self.evaluate(klass, k)
            if candidate is None or candidate.expected_speedup is None:
                continue
            if best is None or candidate.expected_speedup > PREFER_SHORTER * (best.expected_speedup or 0.0):
                best = candidate
        return best if best is not None else Choice(0, "warmup")

    def choose(self, klass: str) -> Choice:
        """`best`, except that every PROBE_EVERY-th decision probes a neighbour of it."""
        choice = self.best(klass)
        if choice.reason == "warmup":
            return choice
        decisions = self.decisions[klass] = self.decisions.get(klass, 0) + 1
        if decisions % PROBE_EVERY:
            return choice
        neighbours = self.neighbours(choice.k)
        probes = self.probes_by_class[klass] = self.probes_by_class.get(klass, 0) + 1
        k = neighbours[(probes - 1) % len(neighbours)]
        expected = self.evaluate(klass, k)
        if expected is None:
            return Choice(k, "probe")
        return Choice(k, "probe", expected.expected_speedup, expected.tokens_per_round, expected.round_seconds)

    @property
    def probes(self) -> int:
        return sum(self.probes_by_class.values())

    def neighbours(self, k: int) -> list[int]:
        ordered = [k + 1, k - 1, 0, k + 2]
        seen: list[int] = []
        for n in ordered:
            if 0 <= n <= self.k_max and n != k and n not in seen:
                seen.append(n)
        return seen

    def explain(self, klass: str | None = None) -> dict[str, Any]:
        """The estimates behind the choice, as plain data (status page, tests, logs)."""
        classes = [klass] if klass is not None else sorted(self.classes) or ["chat"]
        per_class = {}
        for name in classes:
            best = self.best(name)
            estimate = self.acceptance(name)
            depth = max(best.k, 4)
            per_class[name] = {
                "k": best.k,
                "reason": best.reason,
                "expected_speedup": _round(best.expected_speedup),
                "tokens_per_round": _round(best.tokens_per_round),
                "acceptance_by_position": [_round(v) for v in estimate.q[:depth]],
            }
        measured = {k: m for k in self.costs.lengths if (m := self.costs.measured(k)) is not None}
        return {
            "plain_step_seconds": _round(self.costs.plain_step, 6),
            "draft_token_seconds": _round(self.costs.draft_token_seconds, 6),
            "round_seconds": {str(k): _round(m[0], 6) for k, m in measured.items()},
            "observations": self.observations,
            "probes": self.probes,
            "classes": per_class,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)
