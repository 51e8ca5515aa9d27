"""Small, exact statistics for benchmark figures. Pure functions, no numpy: the inputs are short lists."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over repetitions.

    `spread` is the interquartile range relative to the median: robust against the one slow request a
    shared machine produces now and then, which a standard deviation would let dominate.
    """

    n: int
    median: float
    p25: float
    p75: float
    min: float
    max: float

    @property
    def spread(self) -> float | None:
        if self.median == 0:
            return None
        return (self.p75 - self.p25) / abs(self.median)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def summarize(values: Sequence[float | None]) -> Summary | None:
    """Summary of the values that exist; None when there are none (e.g. no acceptance without a draft)."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return Summary(
        n=len(present),
        median=median(present),
        p25=percentile(present, 25.0),
        p75=percentile(present, 75.0),
        min=min(present),
        max=max(present),
    )


def speedup(candidate: float | None, baseline: float | None) -> float | None:
    """candidate / baseline for rates (tokens/sec): above 1 means the candidate is faster."""
    if candidate is None or baseline is None or baseline <= 0:
        return None
    return candidate / baseline


def paired_speedup(pairs: Sequence[tuple[float | None, float | None]]) -> float | None:
    """Median of per-pair ratios (candidate rate / baseline rate).

    The bench interleaves a profile's request with its baseline's request on the same prompt, so each pair
    saw the same machine state; the median of their ratios cancels slow drift (another job starting, thermal
    throttling) that a ratio of two medians would absorb.
    """
    ratios = [ratio for ratio in (speedup(c, b) for c, b in pairs) if ratio is not None]
    return median(ratios) if ratios else None
