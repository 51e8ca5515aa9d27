"""Bench results as a terminal table, Markdown, or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence

from app.bench.results import ArmResult, BenchResult, Equality, SweepResult
from app.bench.sample_stats import Summary

HEADER = ["ARM", "N", "DECODE TOK/S", "TTFT S", "E2E S", "ACCEPT", "MAL", "SPEED-UP", "GREEDY = BASELINE"]


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(summary: Summary | None, digits: int = 2) -> str:
    if summary is None:
        return "-"
    spread = summary.spread
    return f"{summary.median:.{digits}f}" + (f" ±{spread * 50:.0f}%" if spread is not None and summary.n > 1 else "")


def _speedup(result: ArmResult) -> str:
    if result.paired_speedup is None:
        return "-"
    return f"{result.paired_speedup:.2f}x"


def _equality(equality: Equality | None, role: str) -> str:
    if equality is None:
        return "-"
    if equality.identical:
        what = "deterministic" if role == "baseline" else "identical"
        return f"{what} ({equality.equal}/{equality.compared})"
    where = equality.first_divergence
    at = f", first at char {where.position} of {where.prompt_id}" if where else ""
    return f"DIFFERS ({equality.equal}/{equality.compared} equal{at})"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def arm_rows(result: BenchResult) -> list[list[str]]:
    rows = []
    for arm in result.arms:
        rows.append(
            [
                arm.arm.label,
                str(arm.requests - arm.failed) + (f" ({arm.failed} failed)" if arm.failed else ""),
                _spread(arm.decode_tps),
                _spread(arm.ttft),
                _spread(arm.e2e),
                _percent(arm.acceptance_rate),
                _num(arm.mean_acceptance_length),
                _speedup(arm),
                _equality(arm.equality, arm.arm.role),
            ]
        )
    return rows


def sweep_rows(sweep: SweepResult) -> list[list[str]]:
    rows = [["K", "DECODE TOK/S", "ACCEPT", "SPEED-UP"]]
    if sweep.baseline is not None:
        rows.append([f"baseline ({sweep.baseline})", _num(sweep.baseline_tps), "-", "1.00x"])
    for point in sweep.points:
        speed = "-" if point.speedup is None else f"{point.speedup:.2f}x"
        rows.append([str(point.k), _num(point.decode_tps), _percent(point.acceptance_rate), speed])
    return rows


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _footer(result: BenchResult) -> list[str]:
    run = result.run
    config = run.config
    during = result.load_during
    load = f", 1-minute load during: median {during.median:.2f}, max {during.max:.2f}" if during else ""
    lines = [
        f"prompt set {config.prompts.name} ({len(config.prompts.prompts)} prompts), {config.repetitions} repetitions, "
        f"max_tokens {config.max_tokens}, temperature {config.temperature}, {run.finished - run.started:.0f}s; "
        f"load average before {run.load_before}, after {run.load_after}{load}",
        "DECODE: tokens after the first / (last token - first token), client side; ±: half the interquartile "
        "range, relative. SPEED-UP: median over prompts and repetitions of decode tok/s / the baseline's on the "
        "same prompt and repetition. MAL: mean acceptance length (tokens per verification step).",
    ]
    blas = run.machine.get("blas") or {}
    if blas:
        kinds = sorted({str(value) for value in blas.values()})
        lines.append(f"machine: {run.machine.get('cpu')}, {run.machine.get('cpus')} CPUs; BLAS: {', '.join(kinds)}")
    fastest = {arm.fastest_plain for arm in result.arms if arm.fastest_plain and arm.fastest_plain != arm.arm.baseline}
    for label in sorted(fastest):
        against = ", ".join(
            f"{arm.arm.label} {arm.speedup_vs_fastest_plain:.2f}x"
            for arm in result.arms
            if arm.fastest_plain == label and arm.speedup_vs_fastest_plain is not None and arm.arm.label != label
        )
        lines.append(f"fastest plain decoding measured: {label}, faster than the baseline; against it: {against}")
    for arm in result.arms:
        where = arm.equality.first_divergence if arm.equality else None
        if where is not None:
            lines.append(
                f"{arm.arm.label}: {where.prompt_id} rep {where.rep + 1} differs from {arm.arm.baseline or 'itself'} "
                f"at char {where.position}: baseline {where.baseline!r}, this {where.candidate!r}"
            )
        if arm.chosen_k:
            chosen = ", ".join(f"k={what} x{count}" for what, count in arm.chosen_k.items())
            lines.append(f"{arm.arm.label}: draft lengths chosen by the gateway: {chosen}")
        if arm.bursts:
            lines.append(
                f"{arm.arm.label}: {arm.bursts} requests arrived in bursts (a busy machine); their decode rate is "
                "the backend's own"
            )
        for error in arm.errors[:3]:
            lines.append(f"{arm.arm.label}: failed: {error}")
    return lines


def text_report(result: BenchResult) -> str:
    parts = [text_table([HEADER, *arm_rows(result)])]
    for sweep in result.sweeps:
        parts.append(f"\nsweep of num_draft_tokens for {sweep.profile}:\n" + text_table(sweep_rows(sweep)))
        parts.append(f"-> {sweep.verdict}")
    parts.append("")
    parts.extend(_footer(result))
    return "\n".join(parts)


def markdown_report(result: BenchResult) -> str:
    parts = [markdown_table([HEADER, *arm_rows(result)])]
    for sweep in result.sweeps:
        parts.append(f"\nSweep of `num_draft_tokens` for `{sweep.profile}`:\n\n" + markdown_table(sweep_rows(sweep)))
        parts.append(f"\n**{sweep.verdict}**")
    parts.append("")
    parts.extend(f"- {line}" for line in _footer(result))
    return "\n".join(parts) + "\n"


def json_report(result: BenchResult) -> str:
    return json.dumps(result.as_dict(), indent=2)
