"""`specgate bench overhead`: what the gateway adds, measured in one run against the same backends.

Two phases, each sending the same request stream directly to a backend and through the gateway,
alternating so that machine noise falls on both paths alike:

1. a real backend (the launcher on a tiny model, ~1000 tokens/sec): time to first token and token
   throughput, one request at a time;
2. the fake backend in instant mode: requests/sec and latency at several concurrencies, where nothing
   but the gateway's own work separates the two paths.

The direct path sends what the gateway would send (`"model": "default_model"`, streaming with usage),
so both paths carry the same bytes from the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.bench import machine
from app.bench.client import BenchError
from app.bench.local import INSTANT, TINY, LocalGateway, local_gateway
from app.bench.rawhttp import Timing, post_stream
from app.bench.stats import percentile

GOAL_ADDED_P50_C1_MS = 0.5
GOAL_ADDED_P99_C16_MS = 5.0
GOAL_THROUGHPUT_RATIO = 0.99
Progress = Callable[[str], None]


@dataclass
class OverheadConfig:
    requests: int = 200
    tokens: int = 64
    instant_requests: int = 400
    instant_tokens: int = 16
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    rounds: int = 4


@dataclass
class PathFigures:
    """One path (direct or gateway) in one phase."""

    requests: int
    errors: int
    seconds: float
    ttft: list[float]
    e2e: list[float]
    throughput: list[float]
    first_error: str | None = None

    @classmethod
    def from_timings(cls, timings: list[Timing], seconds: float) -> PathFigures:
        good = [t for t in timings if t.ok]
        errors = [t.error for t in timings if not t.ok]
        return cls(
            requests=len(timings),
            errors=len(errors),
            seconds=seconds,
            ttft=[t.ttft for t in good if t.ttft is not None],
            e2e=[t.e2e for t in good],
            throughput=[t.throughput for t in good if t.throughput is not None],
            first_error=errors[0] if errors else None,
        )

    def merge(self, other: PathFigures) -> PathFigures:
        return PathFigures(
            self.requests + other.requests,
            self.errors + other.errors,
            self.seconds + other.seconds,
            self.ttft + other.ttft,
            self.e2e + other.e2e,
            self.throughput + other.throughput,
            self.first_error or other.first_error,
        )

    @property
    def requests_per_second(self) -> float | None:
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else None

    def ms(self, values: list[float], q: float) -> float | None:
        return percentile(values, q) * 1000.0 if values else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "requests_per_second": self.requests_per_second,
            "ttft_ms": {"p50": self.ms(self.ttft, 50), "p99": self.ms(self.ttft, 99)},
            "e2e_ms": {"p50": self.ms(self.e2e, 50), "p99": self.ms(self.e2e, 99)},
            "tokens_per_second_p50": percentile(self.throughput, 50) if self.throughput else None,
        }


@dataclass
class Comparison:
    phase: str
    concurrency: int
    direct: PathFigures
    gateway: PathFigures

    def added_ms(self, metric: str, q: float) -> float | None:
        direct = self.direct.ms(getattr(self.direct, metric), q)
        gateway = self.gateway.ms(getattr(self.gateway, metric), q)
        return None if direct is None or gateway is None else gateway - direct

    @property
    def throughput_ratio(self) -> float | None:
        if not self.direct.throughput or not self.gateway.throughput:
            return None
        return percentile(self.gateway.throughput, 50) / percentile(self.direct.throughput, 50)

    @property
    def rps_ratio(self) -> float | None:
        direct, gateway = self.direct.requests_per_second, self.gateway.requests_per_second
        return gateway / direct if direct and gateway is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "concurrency": self.concurrency,
            "direct": self.direct.as_dict(),
            "gateway": self.gateway.as_dict(),
            "added_ttft_ms": {"p50": self.added_ms("ttft", 50), "p99": self.added_ms("ttft", 99)},
            "added_e2e_ms": {"p50": self.added_ms("e2e", 50), "p99": self.added_ms("e2e", 99)},
            "throughput_ratio": self.throughput_ratio,
            "requests_per_second_ratio": self.rps_ratio,
        }


@dataclass
class OverheadResult:
    config: OverheadConfig
    comparisons: list[Comparison]
    machine: dict[str, Any]
    load_before: list[float]
    load_after: list[float]

    def find(self, phase: str, concurrency: int) -> Comparison | None:
        return next((c for c in self.comparisons if c.phase == phase and c.concurrency == concurrency), None)

    def goals(self) -> list[tuple[str, float | None, bool | None]]:
        """(goal, measured value, met?) for the three goals of the default path."""
        c1, c16, real = self.find(INSTANT, 1), self.find(INSTANT, 16), self.find(TINY, 1)
        p50 = c1.added_ms("e2e", 50) if c1 else None
        p99 = c16.added_ms("e2e", 99) if c16 else None
        ratio = real.throughput_ratio if real else None
        p50_goal, p99_goal, ratio_goal = GOAL_ADDED_P50_C1_MS, GOAL_ADDED_P99_C16_MS, GOAL_THROUGHPUT_RATIO
        return [
            (f"added latency p50 at concurrency 1 < {p50_goal} ms", p50, _below(p50, p50_goal)),
            (f"added latency p99 at concurrency 16 < {p99_goal} ms", p99, _below(p99, p99_goal)),
            (f"token throughput >= {ratio_goal:.0%} of direct", ratio, _above(ratio, ratio_goal)),
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.__dict__,
            "machine": self.machine,
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "comparisons": [c.as_dict() for c in self.comparisons],
            "goals": [{"goal": goal, "value": value, "met": met} for goal, value, met in self.goals()],
        }


def _below(value: float | None, limit: float) -> bool | None:
    return None if value is None else value < limit


def _above(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


# ----- sending ----------------------------------------------------------------------------------------


def bodies(model: str, tokens: int) -> tuple[bytes, bytes]:
    """The gateway's request and the one the gateway would send the backend for it."""
    common = {
        "messages": [{"role": "user", "content": "Count from one to ten in words, please."}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps({"model": model, **common}).encode(), json.dumps({"model": "default_model", **common}).encode()


@dataclass(frozen=True)
class Target:
    port: int
    body: bytes


async def _batch(target: Target, count: int, concurrency: int) -> tuple[list[Timing], float]:
    """`count` requests with `concurrency` in flight; returns their timings and the wall time."""
    timings: list[Timing] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            timings.append(await post_stream("127.0.0.1", target.port, "/v1/chat/completions", target.body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return timings, time.perf_counter() - started


async def sequential_phase(direct: Target, gateway: Target, count: int, progress: Progress) -> Comparison:
    """One request at a time, alternating the path and which path goes first."""
    results: dict[str, list[Timing]] = {"direct": [], "gateway": []}
    seconds = {"direct": 0.0, "gateway": 0.0}
    for index in range(count):
        order = [("direct", direct), ("gateway", gateway)]
        for name, target in order if index % 2 == 0 else order[::-1]:
            timings, elapsed = await _batch(target, 1, 1)
            results[name] += timings
            seconds[name] += elapsed
        if (index + 1) % max(1, count // 4) == 0:
            progress(f"overhead: real backend, {index + 1}/{count} request pairs")
    return Comparison(
        TINY,
        1,
        PathFigures.from_timings(results["direct"], seconds["direct"]),
        PathFigures.from_timings(results["gateway"], seconds["gateway"]),
    )


async def concurrent_phase(
    direct: Target, gateway: Target, count: int, concurrency: int, rounds: int, progress: Progress
) -> Comparison:
    figures: dict[str, PathFigures | None] = {"direct": None, "gateway": None}
    per_round = max(1, count // rounds)
    for round_index in range(rounds):
        order = [("direct", direct), ("gateway", gateway)]
        for name, target in order if round_index % 2 == 0 else order[::-1]:
            timings, elapsed = await _batch(target, per_round, concurrency)
            part = PathFigures.from_timings(timings, elapsed)
            previous = figures[name]
            figures[name] = part if previous is None else previous.merge(part)
    direct_figures, gateway_figures = figures["direct"], figures["gateway"]
    assert direct_figures is not None
    assert gateway_figures is not None
    comparison = Comparison(INSTANT, concurrency, direct_figures, gateway_figures)
    progress(
        f"overhead: instant backend, concurrency {concurrency}: "
        f"{direct_figures.requests_per_second or 0:.0f} req/s direct, "
        f"{gateway_figures.requests_per_second or 0:.0f} req/s through the gateway"
    )
    return comparison


async def measure(local: LocalGateway, config: OverheadConfig, progress: Progress) -> list[Comparison]:
    gateway_port = int(local.url.rsplit(":", 1)[1])
    comparisons = []
    via, direct = bodies(TINY, config.tokens)
    # Untimed first requests: connection set-up paths, caches, the tiny model's first compile.
    await sequential_phase(Target(local.backend_ports[TINY], direct), Target(gateway_port, via), 5, lambda _: None)
    comparisons.append(
        await sequential_phase(
            Target(local.backend_ports[TINY], direct), Target(gateway_port, via), config.requests, progress
        )
    )
    via, direct = bodies(INSTANT, config.instant_tokens)
    for concurrency in config.concurrency:
        comparisons.append(
            await concurrent_phase(
                Target(local.backend_ports[INSTANT], direct),
                Target(gateway_port, via),
                config.instant_requests,
                concurrency,
                config.rounds,
                progress,
            )
        )
    return comparisons


def run_overhead(config: OverheadConfig, progress: Progress, env: dict[str, str] | None = None) -> OverheadResult:
    progress("overhead: starting a gateway with a tiny model and the instant fake backend on loopback")
    with local_gateway(env=env) as local:
        load_before = machine.load_average()
        comparisons = asyncio.run(measure(local, config, progress))
        load_after = machine.load_average()
    return OverheadResult(config, comparisons, machine.describe(), load_before, load_after)


# ----- reporting --------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _p50_p99(figures: PathFigures, metric: str) -> str:
    values = getattr(figures, metric)
    return f"{_fmt(figures.ms(values, 50))} / {_fmt(figures.ms(values, 99))}"


def overhead_rows(result: OverheadResult) -> list[list[str]]:
    rows = [
        [
            "BACKEND",
            "CONC",
            "DIRECT P50/P99 MS",
            "GATEWAY P50/P99 MS",
            "ADDED P50 MS",
            "ADDED P99 MS",
            "REQ/S DIRECT",
            "REQ/S GATEWAY",
            "TOK/S RATIO",
        ]
    ]
    for c in result.comparisons:
        metric = "ttft" if c.phase == TINY else "e2e"
        label = "tiny model (TTFT)" if c.phase == TINY else "instant fake (latency)"
        rows.append(
            [
                label,
                str(c.concurrency),
                _p50_p99(c.direct, metric),
                _p50_p99(c.gateway, metric),
                _fmt(c.added_ms(metric, 50), 3),
                _fmt(c.added_ms(metric, 99), 3),
                _fmt(c.direct.requests_per_second, 0),
                _fmt(c.gateway.requests_per_second, 0),
                _fmt(c.throughput_ratio, 3),
            ]
        )
    return rows


def goal_lines(result: OverheadResult) -> list[str]:
    lines = []
    for goal, value, met in result.goals():
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"{goal}: {_fmt(value, 3)} -> {verdict}")
    errors = [c for c in result.comparisons if c.direct.errors or c.gateway.errors]
    for c in errors:
        lines.append(
            f"errors at {c.phase}/{c.concurrency}: direct {c.direct.errors}, gateway {c.gateway.errors} "
            f"({c.gateway.first_error or c.direct.first_error})"
        )
    lines.append(f"load average before {result.load_before}, after {result.load_after}")
    return lines


def text_report(result: OverheadResult) -> str:
    from app.bench.report import _table

    return _table(overhead_rows(result)) + "\n\n" + "\n".join(goal_lines(result))


def markdown_report(result: OverheadResult) -> str:
    from app.bench.report import _markdown_table

    notes = "\n".join(f"- {line}" for line in goal_lines(result))
    return _markdown_table(overhead_rows(result)) + "\n\n" + notes + "\n"


# ----- command line -----------------------------------------------------------------------------------


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a list like 1,4,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be positive")
    return values


def cmd_overhead(args: argparse.Namespace) -> int:
    from app.bench.cli import _write

    config = OverheadConfig(
        requests=args.requests,
        tokens=args.tokens,
        instant_requests=args.instant_requests,
        instant_tokens=args.instant_tokens,
        concurrency=args.concurrency,
        rounds=args.rounds,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run_overhead(config, progress)
    except BenchError as error:
        print(f"specgate bench overhead: {error}", file=sys.stderr)
        return 1
    if args.json:
        _write(args.json, json.dumps(result.as_dict(), indent=2))
    if args.markdown:
        _write(args.markdown, markdown_report(result))
    if "-" not in (args.json, args.markdown):
        print(text_report(result))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "overhead",
        help="what the gateway adds: the same requests sent directly to a backend and through the gateway",
        description="Starts its own gateway on loopback with a tiny generated model and the instant fake "
        "backend, then sends the same request stream directly and through the gateway, alternating.",
    )
    parser.add_argument("--requests", type=int, default=200, help="request pairs to the tiny model (default 200)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per tiny-model answer (default 64)")
    parser.add_argument(
        "--instant-requests", type=int, default=400, help="requests per path and concurrency (default 400)"
    )
    parser.add_argument("--instant-tokens", type=int, default=16, help="tokens per instant answer (default 16)")
    parser.add_argument("--concurrency", type=_concurrency, default=[1, 4, 16], help="default 1,4,16")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two paths per concurrency")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE")
    parser.set_defaults(func=cmd_overhead)
