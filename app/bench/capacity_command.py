"""`specgate bench capacity`: the scale model (app/bench/capacity.py) for a team of N OpenCode users, from
figures measured by the other bench commands (their `--json` files) or given as flags.

Every input says where it came from in the output, so a table can be traced back to a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bench.arguments import write_output
from app.bench.capacity import (
    CapacityError,
    GatewayCost,
    NodeSpeed,
    Row,
    Target,
    TurnShape,
    gateway_limits,
    nodes_to_keep_up,
    plan_team,
    service_cv2,
    service_seconds,
    think_for_turns_per_hour,
)
from app.bench.report import markdown_table, text_table
from app.bench.sample_stats import percentile

DEFAULT_USERS = [1, 2, 5, 10, 20, 50]

# This project's machine (a 2-core Xeon under KVM, MKL, the default speculative profile, float32): what
# `--from-prompt-cache docs/results/cpu-prompt-cache.json --from-bench docs/results/cpu-coding.json` reads
# (docs/scale.md says where each was measured). Flags and --from-* files replace them.
_COLD_PREFILL_TPS = 7207 / 764.578
DEFAULTS: dict[str, float] = {
    # OpenCode's cold 7,207-token first turn took 764.6 s to its first token: the prefill rate at the
    # context length of an OpenCode session.
    "prefill_tps": _COLD_PREFILL_TPS,
    # `balanced` on the coding prompts (issue 15): 6.77 tokens/s (short prompts; slower at 7k tokens).
    "decode_tps": 6.77,
    # A new session's cached first turn: 8.59 s to the first token for its 19 new tokens.
    "turn_overhead_s": 8.594 - 19 / _COLD_PREFILL_TPS,
    "prompt_tokens": 7211,
    "new_tokens": 400,
    "output_tokens": 120,
    "think_s": 60.0,
    # `specgate bench overhead` on this machine (docs/benchmarks.md: 1.3-2 ms of CPU per request, ~0.15 ms
    # per streamed chunk).
    "gateway_ms_per_request": 1.5,
    "gateway_ms_per_token": 0.15,
}


class InputError(ValueError):
    """A --from-* file that does not hold what it should."""


@dataclass
class Inputs:
    values: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS))
    sources: dict[str, str] = field(default_factory=lambda: dict.fromkeys(DEFAULTS, "default (docs/scale.md)"))

    def set(self, key: str, value: float, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source


# ----- reading the other bench commands' JSON -------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: {error}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: not a JSON object")
    return document


def from_bench(inputs: Inputs, path: Path, profile: str | None) -> None:
    """`specgate bench --json`: the profile's median decode rate, and its prefill rate from requests that
    processed at least 100 prompt tokens (the backend's own `timings`)."""
    document = _load(path)
    arms = [arm for arm in document.get("arms") or [] if isinstance(arm, dict)]
    if not arms:
        raise InputError(f"{path}: no arms (not a `specgate bench --json` file?)")
    if profile is None:
        chosen = next((a for a in arms if a.get("role") != "baseline"), arms[0])
    else:
        found = [a for a in arms if profile in (a.get("label"), a.get("profile"))]
        if not found:
            names = ", ".join(str(a.get("label")) for a in arms)
            raise InputError(f"{path}: no arm {profile!r}; it has {names}")
        chosen = found[0]
    label = str(chosen.get("label"))
    decode = (chosen.get("decode_tokens_per_second") or {}).get("median")
    if isinstance(decode, int | float) and decode > 0:
        inputs.set("decode_tps", float(decode), f"{path}: {label}, median decode")
    rates = []
    for sample in document.get("samples") or []:
        timings = sample.get("timings") or {}
        prompt_n, prompt_ms = timings.get("prompt_n"), timings.get("prompt_ms")
        if sample.get("arm") == label and isinstance(prompt_n, int) and prompt_n >= 100 and prompt_ms:
            rates.append(prompt_n / (prompt_ms / 1000.0))
    if rates:
        inputs.set(
            "prefill_tps",
            percentile(rates, 50),
            f"{path}: {label}, median of {len(rates)} request(s) with >= 100 uncached prompt tokens",
        )


def from_prompt_cache(inputs: Inputs, path: Path) -> None:
    """`specgate bench prompt-cache --json`: the prefill rate at OpenCode's context length (the cold turn),
    the prompt size, and the fixed part of a cached turn (the memory phase less its new tokens)."""
    document = _load(path)
    phases = {p.get("phase"): p for p in document.get("phases") or [] if isinstance(p, dict)}
    cold, memory = phases.get("cold"), phases.get("memory")
    if cold is None or not cold.get("backend_prompt_s") or not cold.get("prompt_tokens"):
        raise InputError(f"{path}: no cold phase with a backend time (not a `bench prompt-cache --json` file?)")
    prefill = cold["prompt_tokens"] / cold["backend_prompt_s"]
    inputs.set(
        "prefill_tps", prefill, f"{path}: cold turn, {cold['prompt_tokens']} tokens in {cold['backend_prompt_s']:.1f} s"
    )
    if memory is not None and memory.get("backend_prompt_s") is not None:
        new = int(memory["prompt_tokens"]) - int(memory.get("cached_tokens") or 0)
        overhead = max(0.0, float(memory["backend_prompt_s"]) - new / prefill)
        inputs.set(
            "turn_overhead_s",
            overhead,
            f"{path}: memory phase, {memory['backend_prompt_s']:.1f} s to the first token for {new} new tokens",
        )
        inputs.set("prompt_tokens", float(memory["prompt_tokens"]), f"{path}: memory phase")


def from_overhead(inputs: Inputs, path: Path) -> None:
    """`specgate bench overhead --json`: the gateway's CPU per request and per streamed token."""
    cpu = _load(path).get("gateway_cpu")
    if not isinstance(cpu, dict):
        raise InputError(f"{path}: no gateway_cpu (a `specgate bench overhead --json` file of this version?)")
    inputs.set("gateway_ms_per_request", float(cpu["ms_per_request"]), f"{path}: instant backend, concurrency 1")
    inputs.set("gateway_ms_per_token", float(cpu["ms_per_token"]), f"{path}: tiny model")


# ----- the report -----------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None or math.isinf(value):
        return "unbounded"
    if value < 0.05:
        return "0"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def _nodes_cell(row: Row) -> str:
    if row.nodes is None:
        return f"> {row.needed_open}" if row.needed_open else "-"
    if not row.keeps_up:
        return f"{row.nodes}: CANNOT KEEP UP (needs {nodes_to_keep_up(row)}; {row.needed_open} for the target)"
    return str(row.nodes)


HEADER = [
    "USERS",
    "TURNS/H",
    "LOAD",
    "NODES (ERLANG C)",
    "UTIL",
    "P(WAIT)",
    "P{q} WAIT",
    "MEAN WAIT",
    "MAX_QUEUE",
    "NODES (N USERS)",
    "P{q} WAIT",
    "MAX_QUEUE",
    "GATEWAY CPU",
]


def rows_table(rows: list[Row], quantile: float) -> list[list[str]]:
    q = f"{quantile * 100:g}"
    table = [[cell.replace("{q}", q) for cell in HEADER]]
    for row in rows:
        queue, team = row.open_queue, row.closed_team
        stable = queue is not None and queue.stable
        table.append(
            [
                str(row.users),
                f"{row.turns_per_hour:.0f}",
                f"{row.offered:.2f}",
                _nodes_cell(row),
                f"{queue.utilisation:.0%}" if queue else "-",
                f"{queue.p_wait:.0%}" if queue else "-",
                _seconds(queue.wait_quantile(quantile)) if queue and stable else "unbounded",
                _seconds(queue.mean_wait_s) if queue and stable else "unbounded",
                str(row.queue_limit) if row.queue_limit is not None else "-",
                str(team.servers) if team else "-",
                _seconds(team.wait_quantile(quantile)) if team else "-",
                str(row.closed_queue_limit) if row.closed_queue_limit is not None else "-",
                f"{row.gateway_core_share:.2%} core" if row.gateway_core_share is not None else "-",
            ]
        )
    return table


def notes(inputs: Inputs, node: NodeSpeed, turn: TurnShape, target: Target, args: argparse.Namespace) -> list[str]:
    v = inputs.values
    service = service_seconds(node, turn)
    lines = [
        f"one turn on one node: {service:.1f} s = {node.turn_overhead_s:.1f} s fixed + "
        f"{turn.computed_tokens:.0f} prompt tokens / {node.prefill_tps:.1f} tok/s + "
        f"{turn.output_tokens} output tokens / {node.decode_tps:.2f} tok/s"
        + (
            f" (prefix missed on {turn.prefix_miss:.0%} of turns: service times spread as a mix of two "
            f"exponentials, cv^2 = {service_cv2(node, turn):.1f}; Erlang C waits scaled by (1 + cv^2) / 2, "
            "Allen-Cunneen; the N USERS columns stay exponential)"
            if turn.prefix_miss
            else ""
        ),
        f"users think {v['think_s']:.0f} s between an answer and their next turn; target: "
        f"p{target.quantile * 100:g} wait <= {_seconds(target.wait_s)}, at most {target.refusal:.0%} refused "
        f"(429) at max_queue",
        "LOAD: nodes kept busy (Erlangs). ERLANG C columns: the open model (M/M/c: Poisson arrivals at the team's "
        "rate"
        + ("; turns split at random, each node an M/M/1 with its own queue" if args.routing == "random" else "")
        + "); N USERS columns: exactly N users, each with at most one turn in the system (M/M/c//N), "
        + ("on the nodes given" if args.nodes is not None else "sized for the same target"),
    ]
    if args.routing == "random":
        lines.append("MAX_QUEUE with a random split is per node (each node's own queue)")
    gateway = GatewayCost(v["gateway_ms_per_request"], v["gateway_ms_per_token"])
    limits = gateway_limits(gateway, node, turn)
    lines.append(
        f"gateway: {limits['gateway_ms_per_turn']:.1f} ms of CPU per turn ({gateway.ms_per_request:.2f} ms per "
        f"request + {gateway.ms_per_token:.3f} ms per token) = {limits['gateway_over_service']:.2e} of a node's "
        f"time on it; per token {gateway.ms_per_token:.3f} ms against the backend's "
        f"{limits['backend_ms_per_token']:.0f} ms "
        f"({limits['gateway_over_token']:.1e}); one gateway core keeps up with "
        f"{limits['nodes_per_gateway_core']:,.0f} busy nodes like this one"
    )
    lines.append("inputs:")
    for key in sorted(inputs.values):
        lines.append(f"  {key} = {inputs.values[key]:g}  ({inputs.sources[key]})")
    return lines


def _as_dict(row: Row, quantile: float) -> dict[str, Any]:
    queue, team = row.open_queue, row.closed_team
    stable = queue is not None and queue.stable

    def finite(value: float) -> float | None:
        return None if math.isinf(value) else value

    return {
        "users": row.users,
        "service_s": row.service_s,
        "turns_per_hour": row.turns_per_hour,
        "offered_erlangs": row.offered,
        "nodes": row.nodes,
        "keeps_up": row.keeps_up,
        "nodes_to_keep_up": nodes_to_keep_up(row),
        "nodes_for_target_open": row.needed_open,
        "nodes_for_target_closed": row.needed_closed,
        "utilisation": queue.utilisation if queue else None,
        "p_wait": queue.p_wait if queue else None,
        "wait_quantile_s": finite(queue.wait_quantile(quantile)) if queue and stable else None,
        "mean_wait_s": finite(queue.mean_wait_s) if queue and stable else None,
        "max_queue": row.queue_limit,
        "closed_nodes": team.servers if team else None,
        "closed_wait_quantile_s": team.wait_quantile(quantile) if team else None,
        "closed_utilisation": team.utilisation if team else None,
        "closed_max_queue": row.closed_queue_limit,
        "gateway_core_share": row.gateway_core_share,
    }


# ----- command line ---------------------------------------------------------------------------------------


def _users(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a list like 1,2,5,10") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("user counts must be positive")
    return values


def build_inputs(args: argparse.Namespace) -> Inputs:
    inputs = Inputs()
    if args.from_bench:
        from_bench(inputs, args.from_bench, args.profile)
    if args.from_prompt_cache:
        # After the bench: its prefill rate is OpenCode's context length, the bench's prompts are short.
        from_prompt_cache(inputs, args.from_prompt_cache)
    if args.from_overhead:
        from_overhead(inputs, args.from_overhead)
    flags = {
        "prefill_tps": args.prefill_tps,
        "decode_tps": args.decode_tps,
        "turn_overhead_s": args.turn_overhead,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "output_tokens": args.output_tokens,
        "think_s": args.think_seconds,
        "gateway_ms_per_request": args.gateway_ms_per_request,
        "gateway_ms_per_token": args.gateway_ms_per_token,
    }
    for key, value in flags.items():
        if value is not None:
            inputs.set(key, float(value), "flag")
    if args.cached_share is not None:
        share = args.cached_share
        if not 0.0 <= share <= 1.0:
            raise CapacityError(f"--cached-share is a share, 0 to 1: {share}")
        inputs.set(
            "new_tokens", round(inputs.values["prompt_tokens"] * (1.0 - share)), f"flag (--cached-share {share:g})"
        )
    return inputs


def cmd_capacity(args: argparse.Namespace) -> int:
    try:
        inputs = build_inputs(args)
        v = inputs.values
        node = NodeSpeed(v["prefill_tps"], v["decode_tps"], v["turn_overhead_s"])
        turn = TurnShape(int(v["prompt_tokens"]), int(v["new_tokens"]), int(v["output_tokens"]), args.prefix_miss)
        if args.turns_per_hour is not None:
            think = think_for_turns_per_hour(args.turns_per_hour, service_seconds(node, turn))
            inputs.set("think_s", think, f"flag (--turns-per-hour {args.turns_per_hour:g})")
        target = Target(args.target_wait, args.quantile, args.refusal)
        gateway = GatewayCost(v["gateway_ms_per_request"], v["gateway_ms_per_token"])
        rows = [
            plan_team(
                users, node, turn, inputs.values["think_s"], target, args.nodes, gateway, args.routing == "random"
            )
            for users in args.users
        ]
    except (CapacityError, InputError, KeyError, TypeError) as error:
        print(f"specgate bench capacity: {error}", file=sys.stderr)
        return 2
    table = rows_table(rows, target.quantile)
    lines = notes(inputs, node, turn, target, args)
    if args.json:
        document = {
            "inputs": inputs.values,
            "sources": inputs.sources,
            "service_s": service_seconds(node, turn),
            "service_cv2": service_cv2(node, turn),
            "target": {"wait_s": target.wait_s, "quantile": target.quantile, "refusal": target.refusal},
            "routing": args.routing,
            "prefix_miss": args.prefix_miss,
            "gateway": gateway_limits(gateway, node, turn),
            "rows": [_as_dict(row, target.quantile) for row in rows],
        }
        write_output(args.json, json.dumps(document, indent=2))
    if args.markdown:
        bullets = [f"  - {line.strip()}" if line.startswith("  ") else f"- {line}" for line in lines]
        write_output(args.markdown, markdown_table(table) + "\n\n" + "\n".join(bullets) + "\n")
    if "-" not in (args.json, args.markdown):
        print(text_table(table) + "\n\n" + "\n".join(lines))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "capacity",
        help="how many nodes and what max_queue a team of N OpenCode users needs (a queueing model, no requests)",
        description="From measured figures (--from-* files of the other bench commands, or flags; defaults: "
        "this project's 2-core CPU, docs/scale.md), the nodes and queue limit a team of N OpenCode users needs "
        "for a target wait: M/M/c (Erlang C) and the finite-team model M/M/c//N, and what the gateway's own CPU "
        "costs at that scale. Sends no requests.",
    )
    measured = parser.add_argument_group("measured inputs (files from the other bench commands)")
    measured.add_argument(
        "--from-bench", type=Path, metavar="FILE", help="`specgate bench --json`: decode (and prefill)"
    )
    measured.add_argument("--profile", help="the arm of --from-bench to read (default: its first speculative arm)")
    measured.add_argument(
        "--from-prompt-cache", type=Path, metavar="FILE", help="`specgate bench prompt-cache --json`: prefill at length"
    )
    measured.add_argument(
        "--from-overhead", type=Path, metavar="FILE", help="`specgate bench overhead --json`: the gateway's CPU"
    )
    node = parser.add_argument_group("a node (override the files)")
    node.add_argument("--prefill-tps", type=float, help="prompt tokens/s after the cached prefix, at the turns' length")
    node.add_argument("--decode-tps", type=float, help="output tokens/s")
    node.add_argument("--turn-overhead", type=float, metavar="S", help="seconds per turn beyond its tokens")
    turn = parser.add_argument_group("an OpenCode turn and its users")
    turn.add_argument("--prompt-tokens", type=int, help=f"whole prompt (default {DEFAULTS['prompt_tokens']:.0f})")
    turn.add_argument("--new-tokens", type=int, help=f"after the cached prefix (default {DEFAULTS['new_tokens']:.0f})")
    turn.add_argument("--cached-share", type=float, help="instead of --new-tokens: share of the prompt cached (0-1)")
    turn.add_argument("--output-tokens", type=int, help=f"per answer (default {DEFAULTS['output_tokens']:.0f})")
    turn.add_argument(
        "--prefix-miss", type=float, default=0.0, help="share of turns whose prefix is not cached on their node"
    )
    pace = turn.add_mutually_exclusive_group()
    pace.add_argument(
        "--think-seconds", type=float, help=f"between an answer and the next turn (default {DEFAULTS['think_s']:.0f})"
    )
    pace.add_argument("--turns-per-hour", type=float, help="per user, when never waiting (sets the think time)")
    turn.add_argument("--users", type=_users, default=DEFAULT_USERS, help="team sizes (default 1,2,5,10,20,50)")
    goal = parser.add_argument_group("the target and the fleet")
    goal.add_argument("--target-wait", type=float, default=60.0, metavar="S", help="queue wait (default 60 s)")
    goal.add_argument("--quantile", type=float, default=0.9, help="share of turns within the target (default 0.9)")
    goal.add_argument("--refusal", type=float, default=0.01, help="share refused at max_queue (default 0.01)")
    goal.add_argument("--nodes", type=int, help="evaluate this many nodes instead of sizing")
    goal.add_argument(
        "--routing",
        choices=("central", "random"),
        default="central",
        help="central: one queue in front of all nodes (M/M/c); random: each node its own queue",
    )
    gateway = parser.add_argument_group("the gateway (override --from-overhead)")
    gateway.add_argument("--gateway-ms-per-request", type=float, help="CPU ms per request")
    gateway.add_argument("--gateway-ms-per-token", type=float, help="CPU ms per streamed token")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write JSON (no FILE or -: stdout)")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE", help="write a Markdown report")
    parser.set_defaults(func=cmd_capacity)
