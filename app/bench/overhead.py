"""`specgate bench overhead`: what the gateway adds, measured in one run against the same backends.

Each phase sends the same request stream directly to a backend, through the gateway, and through a bare
byte relay (app/bench/tcp_relay.py), rotating the order so that machine noise falls on every path alike:

1. a real backend (the launcher on a tiny model, ~1000 tokens/sec): time to first token and token
   throughput, one request at a time;
2. the fake backend in instant mode: requests/sec and latency at several concurrencies, where nothing
   but the proxy's own work separates the paths;
3. with `--real-model`, a real model from the store (the default profiles' 1.5B, say): token throughput
   where a token takes as long as it does in use.

The relay is the floor: what one more hop costs on this machine (a second connection; per chunk a read,
a write and a process wake-up) with no work at all done in it. Gateway minus relay is what the
gateway's own code costs.

The gateway's own CPU time (its process only, from /proc) is read around every batch sent through it:
CPU milliseconds per request and per streamed token, the figures the scale model (app/bench/capacity.py)
weighs against a backend's time per token.

The direct path sends what the gateway would send (`"model": "default_model"`, streaming with usage),
so every path carries the same bytes from the backend.
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
from app.bench.arguments import write_output
from app.bench.client import BenchError
from app.bench.local import INSTANT, REAL, TINY, LocalGateway, local_gateway
from app.bench.rawhttp import Timing, post_stream
from app.bench.report import markdown_table, text_table
from app.bench.runner import stderr_progress
from app.bench.sample_stats import percentile

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
    # A profile's model value (`catalog:NAME`, a directory, `gguf:PATH`) for phase 3; None skips it.
    real_model: str | None = None
    real_requests: int = 6
    real_tokens: int = 32
    # The bare relay as a third path (the floor); off only to save time.
    relay: bool = True


@dataclass
class PathFigures:
    """One path (direct or gateway) in one phase."""

    requests: int
    errors: int
    seconds: float
    ttft: list[float]
    e2e: list[float]
    throughput: list[float]
    decode: list[float]
    first_error: str | None = None
    # Tokens streamed by the requests that succeeded, and the CPU seconds the gateway process spent while
    # they ran (None: not measured, on the direct and relay paths or where /proc is missing).
    tokens: int = 0
    cpu_seconds: float | None = None

    @classmethod
    def from_timings(cls, timings: list[Timing], seconds: float, cpu_seconds: float | None = None) -> PathFigures:
        good = [t for t in timings if t.ok]
        errors = [t.error for t in timings if not t.ok]
        return cls(
            requests=len(timings),
            errors=len(errors),
            seconds=seconds,
            ttft=[t.ttft for t in good if t.ttft is not None],
            e2e=[t.e2e for t in good],
            throughput=[t.throughput for t in good if t.throughput is not None],
            decode=[t.decode_rate for t in good if t.decode_rate is not None],
            first_error=errors[0] if errors else None,
            tokens=sum(t.tokens for t in good),
            cpu_seconds=cpu_seconds,
        )

    def merge(self, other: PathFigures) -> PathFigures:
        return PathFigures(
            self.requests + other.requests,
            self.errors + other.errors,
            self.seconds + other.seconds,
            self.ttft + other.ttft,
            self.e2e + other.e2e,
            self.throughput + other.throughput,
            self.decode + other.decode,
            self.first_error or other.first_error,
            self.tokens + other.tokens,
            None if self.cpu_seconds is None or other.cpu_seconds is None else self.cpu_seconds + other.cpu_seconds,
        )

    @property
    def requests_per_second(self) -> float | None:
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else None

    def ms(self, values: list[float], q: float) -> float | None:
        return percentile(values, q) * 1000.0 if values else None

    @property
    def cpu_ms_per_request(self) -> float | None:
        served = self.requests - self.errors
        return None if self.cpu_seconds is None or served <= 0 else self.cpu_seconds * 1000.0 / served

    @property
    def tokens_per_request(self) -> float | None:
        served = self.requests - self.errors
        return self.tokens / served if served > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "requests_per_second": self.requests_per_second,
            "ttft_ms": {"p50": self.ms(self.ttft, 50), "p99": self.ms(self.ttft, 99)},
            "e2e_ms": {"p50": self.ms(self.e2e, 50), "p99": self.ms(self.e2e, 99)},
            "tokens_per_second_p50": percentile(self.throughput, 50) if self.throughput else None,
            "decode_tokens_per_second_p50": percentile(self.decode, 50) if self.decode else None,
            "tokens": self.tokens,
            "cpu_seconds": self.cpu_seconds,
            "cpu_ms_per_request": self.cpu_ms_per_request,
        }


@dataclass
class Comparison:
    phase: str
    concurrency: int
    direct: PathFigures
    gateway: PathFigures
    # The bare relay (the floor of any proxy hop), when it was measured.
    relay: PathFigures | None = None

    def _path(self, path: str) -> PathFigures | None:
        return {"gateway": self.gateway, "relay": self.relay}[path]

    def added_ms(self, metric: str, q: float, path: str = "gateway") -> float | None:
        via = self._path(path)
        if via is None:
            return None
        direct = self.direct.ms(getattr(self.direct, metric), q)
        through = via.ms(getattr(via, metric), q)
        return None if direct is None or through is None else through - direct

    def ratio(self, metric: str, path: str = "gateway") -> float | None:
        """Median of `metric` (throughput or decode) through `path`, over the direct path's."""
        via = self._path(path)
        direct_values = getattr(self.direct, metric)
        via_values = getattr(via, metric) if via is not None else []
        if not direct_values or not via_values:
            return None
        return percentile(via_values, 50) / percentile(direct_values, 50)

    @property
    def throughput_ratio(self) -> float | None:
        return self.ratio("throughput")

    @property
    def rps_ratio(self) -> float | None:
        direct, gateway = self.direct.requests_per_second, self.gateway.requests_per_second
        return gateway / direct if direct and gateway is not None else None

    def _against_direct(self, path: str) -> dict[str, Any]:
        """What `path` added to the direct figures, and its token rates over direct's."""
        return {
            "added_ttft_ms": {"p50": self.added_ms("ttft", 50, path), "p99": self.added_ms("ttft", 99, path)},
            "added_e2e_ms": {"p50": self.added_ms("e2e", 50, path), "p99": self.added_ms("e2e", 99, path)},
            "throughput_ratio": self.ratio("throughput", path),
            "decode_ratio": self.ratio("decode", path),
        }

    def as_dict(self) -> dict[str, Any]:
        document = {
            "phase": self.phase,
            "concurrency": self.concurrency,
            "direct": self.direct.as_dict(),
            "gateway": self.gateway.as_dict(),
            **self._against_direct("gateway"),
            "requests_per_second_ratio": self.rps_ratio,
        }
        if self.relay is not None:
            document["relay"] = {**self.relay.as_dict(), **self._against_direct("relay")}
        return document


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
        """(goal, measured value, met?) for the goals of the default path; a real model adds one."""
        c1, c16, tiny = self.find(INSTANT, 1), self.find(INSTANT, 16), self.find(TINY, 1)
        p50 = c1.added_ms("e2e", 50) if c1 else None
        p99 = c16.added_ms("e2e", 99) if c16 else None
        ratio = tiny.throughput_ratio if tiny else None
        p50_goal, p99_goal, ratio_goal = GOAL_ADDED_P50_C1_MS, GOAL_ADDED_P99_C16_MS, GOAL_THROUGHPUT_RATIO
        goals = [
            (f"added latency p50 at concurrency 1 < {p50_goal} ms", p50, _below(p50, p50_goal)),
            (f"added latency p99 at concurrency 16 < {p99_goal} ms", p99, _below(p99, p99_goal)),
            (f"token throughput >= {ratio_goal:.0%} of direct (tiny model)", ratio, _above(ratio, ratio_goal)),
        ]
        real = self.find(REAL, 1)
        if real is not None:
            real_ratio = real.throughput_ratio
            goal = f"token throughput >= {ratio_goal:.0%} of direct (real model {self.config.real_model})"
            goals.append((goal, real_ratio, _above(real_ratio, ratio_goal)))
        return goals

    def gateway_cpu(self) -> dict[str, Any] | None:
        """The gateway's CPU per request and per streamed token, from two phases: the instant backend at
        concurrency 1 (a whole answer arrives in one or two socket reads: the per-request part) and the tiny
        model (one read per token, as from a real model: what is left, per token). None if either is missing."""
        instant, tiny = self.find(INSTANT, 1), self.find(TINY, 1)
        if instant is None or tiny is None:
            return None
        per_request = instant.gateway.cpu_ms_per_request
        tiny_request, tiny_tokens = tiny.gateway.cpu_ms_per_request, tiny.gateway.tokens_per_request
        if per_request is None or tiny_request is None or not tiny_tokens:
            return None
        return {
            "ms_per_request": per_request,
            # Clamped: on a busy machine the two phases' noise can exceed the difference.
            "ms_per_token": max(0.0, (tiny_request - per_request) / tiny_tokens),
            "tiny_model_ms_per_request": tiny_request,
            "tiny_model_tokens_per_request": tiny_tokens,
        }

    def floors(self) -> list[str]:
        """What the bare relay cost on the same figures: the part of each that no proxy avoids here."""
        figures: list[tuple[str, Comparison | None, Callable[[Comparison], float | None], str]] = [
            (
                "added latency p50 at concurrency 1",
                self.find(INSTANT, 1),
                lambda c: c.added_ms("e2e", 50, "relay"),
                " ms",
            ),
            (
                "added latency p99 at concurrency 16",
                self.find(INSTANT, 16),
                lambda c: c.added_ms("e2e", 99, "relay"),
                " ms",
            ),
            (
                "token throughput of direct (tiny model)",
                self.find(TINY, 1),
                lambda c: c.ratio("throughput", "relay"),
                "",
            ),
        ]
        return [
            f"bare relay, {label}: {_fmt(value(c), 3)}{unit}"
            for label, c, value, unit in figures
            if c is not None and c.relay is not None
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.__dict__,
            "machine": self.machine,
            "load_average_before": self.load_before,
            "load_average_after": self.load_after,
            "comparisons": [c.as_dict() for c in self.comparisons],
            "goals": [{"goal": goal, "value": value, "met": met} for goal, value, met in self.goals()],
            "floors": self.floors(),
            "gateway_cpu": self.gateway_cpu(),
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
    # The process whose CPU time a batch on this path is charged with (the gateway's), if any.
    cpu_pid: int | None = None


@dataclass
class Batch:
    timings: list[Timing]
    seconds: float
    cpu_seconds: float | None

    def figures(self) -> PathFigures:
        return PathFigures.from_timings(self.timings, self.seconds, self.cpu_seconds)


def _cpu(pid: int | None) -> float | None:
    return None if pid is None else machine.process_cpu_seconds(pid)


async def _batch(target: Target, count: int, concurrency: int) -> Batch:
    """`count` requests with `concurrency` in flight: their timings, the wall time, the CPU time of the
    target's process meanwhile."""
    cpu_before = _cpu(target.cpu_pid)
    timings: list[Timing] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            timings.append(await post_stream("127.0.0.1", target.port, "/v1/chat/completions", target.body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    elapsed = time.perf_counter() - started
    cpu_after = _cpu(target.cpu_pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Batch(timings, elapsed, cpu)


def _rotated(paths: dict[str, Target], index: int) -> list[tuple[str, Target]]:
    """The paths in an order that starts one later each time, so no path always goes first."""
    items = list(paths.items())
    shift = index % len(items)
    return items[shift:] + items[:shift]


def _comparison(phase: str, concurrency: int, figures: dict[str, PathFigures]) -> Comparison:
    return Comparison(phase, concurrency, figures["direct"], figures["gateway"], figures.get("relay"))


async def sequential_phase(
    phase: str, paths: dict[str, Target], count: int, progress: Progress, label: str = "real backend"
) -> Comparison:
    """One request at a time, rotating the path and which path goes first."""
    figures: dict[str, PathFigures] = {}
    for index in range(count):
        for name, target in _rotated(paths, index):
            part = (await _batch(target, 1, 1)).figures()
            figures[name] = part if name not in figures else figures[name].merge(part)
        if (index + 1) % max(1, count // 4) == 0:
            progress(f"overhead: {label}, {index + 1}/{count} request rounds")
    return _comparison(phase, 1, figures)


async def concurrent_phase(
    paths: dict[str, Target], count: int, concurrency: int, rounds: int, progress: Progress
) -> Comparison:
    figures: dict[str, PathFigures] = {}
    per_round = max(1, count // rounds)
    for round_index in range(rounds):
        for name, target in _rotated(paths, round_index):
            part = (await _batch(target, per_round, concurrency)).figures()
            figures[name] = part if name not in figures else figures[name].merge(part)
    comparison = _comparison(INSTANT, concurrency, figures)
    rates = ", ".join(f"{figures[name].requests_per_second or 0:.0f} req/s {name}" for name in paths)
    progress(f"overhead: instant backend, concurrency {concurrency}: {rates}")
    return comparison


def _paths(local: LocalGateway, profile: str, tokens: int) -> dict[str, Target]:
    via, direct = bodies(profile, tokens)
    gateway_port = int(local.url.rsplit(":", 1)[1])
    paths = {
        "direct": Target(local.backend_ports[profile], direct),
        "gateway": Target(gateway_port, via, cpu_pid=local.pid),
    }
    if profile in local.relay_ports:
        paths["relay"] = Target(local.relay_ports[profile], direct)
    return paths


async def measure(local: LocalGateway, config: OverheadConfig, progress: Progress) -> list[Comparison]:
    comparisons = []
    tiny = _paths(local, TINY, config.tokens)
    # Untimed first requests: connection set-up paths, caches, the tiny model's first compile.
    await sequential_phase(TINY, tiny, 5, lambda _: None)
    comparisons.append(await sequential_phase(TINY, tiny, config.requests, progress))
    instant = _paths(local, INSTANT, config.instant_tokens)
    for concurrency in config.concurrency:
        comparisons.append(
            await concurrent_phase(instant, config.instant_requests, concurrency, config.rounds, progress)
        )
    if config.real_model is not None:
        # Direct and gateway only (no relay runs here): the floor says nothing new where a token takes
        # tens of milliseconds.
        real = _paths(local, REAL, config.real_tokens)
        await sequential_phase(REAL, real, 1, lambda _: None)
        label = f"real model {config.real_model}"
        comparisons.append(await sequential_phase(REAL, real, config.real_requests, progress, label))
    return comparisons


def run_overhead(config: OverheadConfig, progress: Progress, env: dict[str, str] | None = None) -> OverheadResult:
    progress("overhead: starting a gateway with a tiny model and the instant fake backend on loopback")
    if config.real_model is not None:
        progress(f"overhead: the real model {config.real_model} loads from the model store first")
    with local_gateway(env=env, real_model=config.real_model, relays=config.relay) as local:
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


_LABELS = {TINY: "tiny model (TTFT)", INSTANT: "instant fake (latency)", REAL: "real model (TTFT)"}


def overhead_rows(result: OverheadResult) -> list[list[str]]:
    rows = [
        [
            "BACKEND",
            "CONC",
            "DIRECT P50/P99 MS",
            "GATEWAY P50/P99 MS",
            "ADDED P50 MS",
            "ADDED P99 MS",
            "RELAY ADDED P50/P99",
            "REQ/S DIRECT",
            "REQ/S GATEWAY",
            "TOK/S RATIO",
            "DECODE RATIO",
            "RELAY TOK/S RATIO",
        ]
    ]
    for c in result.comparisons:
        metric = "e2e" if c.phase == INSTANT else "ttft"
        relay = (
            "-"
            if c.relay is None
            else f"{_fmt(c.added_ms(metric, 50, 'relay'), 3)} / {_fmt(c.added_ms(metric, 99, 'relay'), 3)}"
        )
        rows.append(
            [
                _LABELS[c.phase],
                str(c.concurrency),
                _p50_p99(c.direct, metric),
                _p50_p99(c.gateway, metric),
                _fmt(c.added_ms(metric, 50), 3),
                _fmt(c.added_ms(metric, 99), 3),
                relay,
                _fmt(c.direct.requests_per_second, 0 if c.phase != REAL else 2),
                _fmt(c.gateway.requests_per_second, 0 if c.phase != REAL else 2),
                # An instant answer has no pace of its own: its token rates only restate its latency.
                _fmt(c.throughput_ratio, 3) if c.phase != INSTANT else "-",
                _fmt(c.ratio("decode"), 3) if c.phase != INSTANT else "-",
                _fmt(c.ratio("throughput", "relay"), 3) if c.phase != INSTANT else "-",
            ]
        )
    return rows


def goal_lines(result: OverheadResult) -> list[str]:
    lines = []
    for goal, value, met in result.goals():
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        lines.append(f"{goal}: {_fmt(value, 3)} -> {verdict}")
    lines.extend(result.floors())
    errors = [c for c in result.comparisons if c.direct.errors or c.gateway.errors or (c.relay and c.relay.errors)]
    for c in errors:
        relay_errors = c.relay.errors if c.relay else 0
        first = c.gateway.first_error or c.direct.first_error or (c.relay.first_error if c.relay else None)
        lines.append(
            f"errors at {c.phase}/{c.concurrency}: direct {c.direct.errors}, gateway {c.gateway.errors}, "
            f"relay {relay_errors} ({first})"
        )
    cpu = result.gateway_cpu()
    if cpu is not None:
        lines.append(
            f"gateway CPU (its process): {cpu['ms_per_request']:.2f} ms per request (instant backend, "
            f"concurrency 1) + {cpu['ms_per_token']:.3f} ms per streamed token (tiny model: "
            f"{cpu['tiny_model_ms_per_request']:.2f} ms for {cpu['tiny_model_tokens_per_request']:.0f} tokens)"
        )
    lines.append(f"load average before {result.load_before}, after {result.load_after}")
    return lines


def text_report(result: OverheadResult) -> str:
    return text_table(overhead_rows(result)) + "\n\n" + "\n".join(goal_lines(result))


def markdown_report(result: OverheadResult) -> str:
    notes = "\n".join(f"- {line}" for line in goal_lines(result))
    return markdown_table(overhead_rows(result)) + "\n\n" + notes + "\n"


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
    config = OverheadConfig(
        requests=args.requests,
        tokens=args.tokens,
        instant_requests=args.instant_requests,
        instant_tokens=args.instant_tokens,
        concurrency=args.concurrency,
        rounds=args.rounds,
        real_model=args.real_model,
        real_requests=args.real_requests,
        real_tokens=args.real_tokens,
        relay=not args.no_relay,
    )

    try:
        result = run_overhead(config, stderr_progress)
    except BenchError as error:
        print(f"specgate bench overhead: {error}", file=sys.stderr)
        return 1
    if args.json:
        write_output(args.json, json.dumps(result.as_dict(), indent=2))
    if args.markdown:
        write_output(args.markdown, markdown_report(result))
    if "-" not in (args.json, args.markdown):
        print(text_report(result))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "overhead",
        help="what the gateway adds: the same requests sent directly to a backend and through the gateway",
        description="Starts its own gateway on loopback with a tiny generated model and the instant fake "
        "backend, then sends the same request stream directly, through the gateway and through a bare byte "
        "relay (the floor of any proxy hop), rotating the order.",
    )
    parser.add_argument("--requests", type=int, default=200, help="request pairs to the tiny model (default 200)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per tiny-model answer (default 64)")
    parser.add_argument(
        "--instant-requests", type=int, default=400, help="requests per path and concurrency (default 400)"
    )
    parser.add_argument("--instant-tokens", type=int, default=16, help="tokens per instant answer (default 16)")
    parser.add_argument("--concurrency", type=_concurrency, default=[1, 4, 16], help="default 1,4,16")
    parser.add_argument("--rounds", type=int, default=4, help="rotations of the paths per concurrency")
    parser.add_argument(
        "--real-model",
        metavar="MODEL",
        help="also measure token throughput on a real model already in the store, as a profile names it "
        "(e.g. catalog:qwen2.5-coder-1.5b-instruct); minutes on a CPU",
    )
    parser.add_argument("--real-requests", type=int, default=6, help="request pairs to the real model (default 6)")
    parser.add_argument("--real-tokens", type=int, default=32, help="tokens per real-model answer (default 32)")
    parser.add_argument(
        "--no-relay", action="store_true", help="skip the bare relay (the floor of any proxy hop on this machine)"
    )
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE")
    parser.set_defaults(func=cmd_overhead)
