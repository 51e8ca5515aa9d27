"""A PNG of a bench run: decode tokens/sec against the draft length (the baseline as a line), and the
acceptance rate by draft position. matplotlib is optional (`pip install 'specgate[bench]'`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.bench.client import BenchError
from app.bench.results import ArmResult, BenchResult


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise BenchError(
            "--plot needs matplotlib: pip install 'specgate[bench]' (or: pip install matplotlib)"
        ) from error
    return plt


def _speed_series(result: BenchResult) -> dict[str, list[tuple[int, float]]]:
    """Per model pair: (k, median decode tok/s), from the sweep if there is one, else the profiles' own k."""
    series: dict[str, list[tuple[int, float]]] = {}
    for sweep in result.sweeps:
        series[sweep.profile] = [(p.k, p.decode_tps) for p in sweep.points if p.decode_tps is not None]
    if series:
        return series
    for arm in result.arms:
        k = arm.arm.effective_k
        if arm.arm.role == "profile" and k is not None and arm.decode_tps is not None:
            series.setdefault(arm.arm.baseline or "speculative", []).append((k, arm.decode_tps.median))
    return {name: sorted(points) for name, points in series.items()}


def _baselines(result: BenchResult) -> list[ArmResult]:
    return [arm for arm in result.arms if arm.arm.role == "baseline" and arm.decode_tps is not None]


def _acceptance_arms(result: BenchResult) -> list[ArmResult]:
    with_positions = [arm for arm in result.arms if arm.acceptance_by_position]
    # A sweep has many arms; the profiles' own k (or the largest k) keeps the plot readable.
    chosen = [arm for arm in with_positions if arm.arm.role == "profile"]
    if not chosen and with_positions:
        chosen = [max(with_positions, key=lambda arm: len(arm.acceptance_by_position))]
    return chosen


def write_plot(result: BenchResult, path: Path) -> Path:
    plt = _pyplot()
    figure, (speed, accept) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in _speed_series(result).items():
        # Series are keyed by the baseline they are compared with: label them as speculative against it.
        label = name if name == "speculative" else f"speculative (vs {name})"
        speed.plot([k for k, _ in points], [tps for _, tps in points], marker="o", label=label)
    for index, base in enumerate(_baselines(result)):
        assert base.decode_tps is not None
        speed.axhline(
            base.decode_tps.median, linestyle="--", color=f"C{index + 5}", label=f"{base.arm.label} (no draft)"
        )
    speed.xaxis.get_major_locator().set_params(integer=True)
    speed.set_xlabel("num_draft_tokens (k)")
    speed.set_ylabel("decode tokens/sec (median)")
    speed.set_title("Decode speed against draft length")
    speed.set_ylim(bottom=0)
    speed.legend(fontsize=7)
    for arm in _acceptance_arms(result):
        positions = list(range(1, len(arm.acceptance_by_position) + 1))
        accept.plot(positions, arm.acceptance_by_position, marker="o", label=arm.arm.label)
    accept.xaxis.get_major_locator().set_params(integer=True)
    accept.set_xlabel("draft position")
    accept.set_ylabel("accepted / verification steps")
    accept.set_title("Acceptance by draft position")
    accept.set_ylim(0, 1.05)
    if accept.get_legend_handles_labels()[0]:
        accept.legend(fontsize=7)
    config = result.run.config
    loads = "/".join(f"{value:.2f}" for value in result.run.load_before) or "?"
    figure.suptitle(
        f"specgate bench: prompts {config.prompts.name}, {config.repetitions} reps, max_tokens {config.max_tokens}, "
        f"load average at start {loads}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
