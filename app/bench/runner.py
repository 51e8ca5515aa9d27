"""The bench's schedule: which requests, in which order, and running them.

An *arm* is one thing being measured: a profile with its own draft length, or (for `--sweep-k`) a
speculative profile with a draft length sent per request. Every arm runs every prompt in every
repetition, interleaved: for each (repetition, prompt) all arms run back to back, in an order rotated
from one group to the next, so a slow minute on a shared machine hits the speculative profiles and their
baseline alike, and no arm always goes first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from app.bench import machine
from app.bench.client import BenchError, ProfileInfo, Sample, backend_blas, list_profiles, stream_chat
from app.bench.prompts import Prompt, PromptSet

Role = Literal["profile", "baseline", "sweep"]
Progress = Callable[[str], None]
WARMUP_TOKENS = 8
# Consecutive failed requests after which the run stops: the server is gone or misconfigured.
MAX_CONSECUTIVE_ERRORS = 3


@dataclass(frozen=True)
class Arm:
    label: str
    profile: str
    # Sent as `num_draft_tokens`; None leaves the profile's own.
    k: int | None
    role: Role
    baseline: str | None = None
    # The model pair, for grouping sweep arms (None against servers that do not say).
    pair: tuple[str | None, str | None] = (None, None)
    # The profile's own draft length, from /v1/models.
    profile_k: int | None = None

    @property
    def effective_k(self) -> int | None:
        return self.k if self.k is not None else self.profile_k


@dataclass
class BenchConfig:
    url: str
    prompts: PromptSet
    profiles: list[str] | None = None
    baseline: str | None = None
    repetitions: int = 2
    warmup: int = 1
    max_tokens: int = 64
    temperature: float = 0.0
    sweep_k: list[int] | None = None
    timeout: float = 1800.0
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchRun:
    config: BenchConfig
    arms: list[Arm]
    samples: list[Sample]
    machine: dict[str, Any]
    load_before: list[float]
    load_after: list[float]
    started: float
    finished: float


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- which arms ------------------------------------------------------------------------------------


def resolve_arms(config: BenchConfig, listing: dict[str, ProfileInfo]) -> list[Arm]:
    """The arms to run: the chosen profiles, their baseline twins, and the sweep's k values."""
    names = config.profiles or _default_profiles(listing)
    for name in [*names, *([config.baseline] if config.baseline else [])]:
        _check_present(name, listing)
    arms: list[Arm] = []
    labels: set[str] = set()

    def add(arm: Arm) -> None:
        if arm.label not in labels:
            labels.add(arm.label)
            arms.append(arm)

    baselines = {name: _baseline_for(name, config.baseline, listing) for name in names}
    for name in names:
        base = baselines[name]
        if base is not None and base != name:
            add(Arm(base, base, None, "baseline", None, _pair(listing.get(base)), _k(listing.get(base))))
    for name in names:
        role: Role = "baseline" if name in baselines.values() else "profile"
        base = baselines[name] if baselines[name] != name else None
        add(Arm(name, name, None, role, base, _pair(listing.get(name)), _k(listing.get(name))))
    for arm in _sweep_arms(config, names, baselines, listing):
        add(arm)
    return arms


def _default_profiles(listing: dict[str, ProfileInfo]) -> list[str]:
    if not listing:
        raise BenchError("this server lists no models; name the ones to measure with --profiles")
    present = [info for info in listing.values() if info.state != "not_present"]
    speculative = [info.name for info in present if info.is_speculative]
    if not speculative:
        raise BenchError("no speculative profile is present on this server; choose profiles with --profiles")
    return speculative


def _check_present(name: str, listing: dict[str, ProfileInfo]) -> None:
    if not listing:
        return  # a server without a model list: the requests will tell
    info = listing.get(name)
    if info is None:
        available = ", ".join(sorted(listing)) or "(none)"
        raise BenchError(f"profile {name!r} is not served here; available: {available}")
    if info.state == "not_present":
        raise BenchError(f"profile {name!r} cannot run: {info.detail or 'its model files are not present'}")


def _baseline_for(name: str, override: str | None, listing: dict[str, ProfileInfo]) -> str | None:
    """`--baseline`, else the profile with the same main model and no draft (its twin)."""
    if override is not None:
        return override
    info = listing.get(name)
    if info is None or not info.is_speculative or info.model is None:
        return None
    twins = [
        other.name
        for other in listing.values()
        if other.model == info.model and not other.is_speculative and other.state != "not_present"
    ]
    # A profile named baseline/... is the one meant as the twin when several share the model.
    twins.sort(key=lambda twin: (not twin.startswith("baseline/"), twin))
    return twins[0] if twins else None


def _k(info: ProfileInfo | None) -> int | None:
    return None if info is None else info.num_draft_tokens


def _pair(info: ProfileInfo | None) -> tuple[str | None, str | None]:
    return (None, None) if info is None else (info.model, info.draft_model)


def _sweep_arms(
    config: BenchConfig, names: list[str], baselines: dict[str, str | None], listing: dict[str, ProfileInfo]
) -> list[Arm]:
    """One speculative profile per model pair, at each k of the sweep (sent per request: no restarts)."""
    if not config.sweep_k:
        return []
    arms: list[Arm] = []
    seen: set[tuple[str | None, str | None]] = set()
    for name in names:
        info = listing.get(name)
        pair = _pair(info)
        if info is not None and not info.is_speculative:
            continue
        if pair in seen and pair != (None, None):
            continue
        seen.add(pair)
        for k in config.sweep_k:
            arms.append(Arm(f"{name} k={k}", name, k, "sweep", baselines.get(name), pair, _k(info)))
    if not arms:
        raise BenchError("--sweep-k needs a speculative profile among --profiles")
    return arms


# ----- running ---------------------------------------------------------------------------------------


def schedule(arms: list[Arm], prompts: list[Prompt], repetitions: int) -> list[tuple[int, Prompt, Arm]]:
    order: list[tuple[int, Prompt, Arm]] = []
    group = 0
    for rep in range(repetitions):
        for prompt in prompts:
            shift = group % len(arms)
            order.extend((rep, prompt, arm) for arm in arms[shift:] + arms[:shift])
            group += 1
    return order


def request_body(config: BenchConfig, arm: Arm, prompt: Prompt, max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        **config.extra_body,
        "model": arm.profile,
        "messages": prompt.messages,
        "max_tokens": max_tokens or prompt.max_tokens or config.max_tokens,
        "temperature": config.temperature,
    }
    if prompt.tools:
        body["tools"] = prompt.tools
    if arm.k is not None:
        body["num_draft_tokens"] = arm.k
    return body


class Runner:
    """Runs a bench: resolve arms, warm up, measure; `progress` gets one line per request."""

    def __init__(self, config: BenchConfig, progress: Progress = stderr_progress) -> None:
        self.config = config
        self.progress = progress
        self.http = httpx.Client(trust_env=False, timeout=config.timeout)

    def run(self) -> BenchRun:
        try:
            return self._run()
        finally:
            self.http.close()

    def _run(self) -> BenchRun:
        listing = list_profiles(self.http, self.config.url)
        arms = resolve_arms(self.config, listing)
        prompts = self.config.prompts.prompts
        self.progress(f"bench: {len(arms)} arms x {len(prompts)} prompts x {self.config.repetitions} repetitions")
        for arm in arms:
            compare = f" (compared with {arm.baseline})" if arm.baseline else ""
            self.progress(f"  {arm.label}{compare}")
        load_before = machine.load_average()
        started = time.time()
        self._warm_up(arms, prompts)
        samples = self._measure(arms, prompts)
        return BenchRun(
            config=self.config,
            arms=arms,
            samples=samples,
            machine=machine.describe(backend_blas(self.http, self.config.url, [arm.profile for arm in arms])),
            load_before=load_before,
            load_after=machine.load_average(),
            started=started,
            finished=time.time(),
        )

    def _warm_up(self, arms: list[Arm], prompts: list[Prompt]) -> None:
        """Load every backend and fill its prompt cache, so no measured request pays for a model load."""
        tokens = min(WARMUP_TOKENS, self.config.max_tokens)
        for index in range(self.config.warmup):
            prompt = prompts[index % len(prompts)]
            for arm in arms:
                self.progress(f"warm-up {index + 1}/{self.config.warmup} {arm.label} (loads the model on first use)")
                sample = self._send(arm, prompt, -1, tokens)
                if sample.error is not None:
                    raise BenchError(f"warm-up request to {arm.profile} failed: {sample.error}")

    def _measure(self, arms: list[Arm], prompts: list[Prompt]) -> list[Sample]:
        order = schedule(arms, prompts, self.config.repetitions)
        samples: list[Sample] = []
        failures = 0
        for index, (rep, prompt, arm) in enumerate(order, start=1):
            sample = self._send(arm, prompt, rep, None)
            samples.append(sample)
            self.progress(f"[{index}/{len(order)}] {progress_line(sample)}")
            failures = failures + 1 if sample.error else 0
            if failures >= MAX_CONSECUTIVE_ERRORS:
                raise BenchError(f"{failures} requests in a row failed; last: {sample.error}")
        return samples

    def _send(self, arm: Arm, prompt: Prompt, rep: int, max_tokens: int | None) -> Sample:
        sample = Sample(arm=arm.label, profile=arm.profile, prompt_id=prompt.id, rep=rep, k=arm.k)
        body = request_body(self.config, arm, prompt, max_tokens)
        stream_chat(self.http, self.config.url, body, sample, self.config.timeout)
        loads = machine.load_average()
        sample.load = loads[0] if loads else None
        return sample


def progress_line(sample: Sample) -> str:
    head = f"{sample.arm} {sample.prompt_id} rep {sample.rep + 1}"
    if sample.error:
        return f"{head}: FAILED: {sample.error}"
    parts = [f"{sample.completion_tokens} tok"]
    if sample.ttft is not None:
        parts.append(f"ttft {sample.ttft:.2f}s")
    if sample.decode_tps is not None:
        parts.append(f"{sample.decode_tps:.2f} tok/s")
    if sample.spec and sample.spec.get("num_draft_tokens"):
        rate = sample.spec.get("draft_acceptance_rate") or 0.0
        parts.append(
            f"accepted {sample.spec.get('num_accepted_draft_tokens')}/{sample.spec['num_draft_tokens']} ({rate:.0%})"
        )
    if sample.load is not None:
        parts.append(f"load {sample.load:.2f}")
    return f"{head}: " + ", ".join(parts)
