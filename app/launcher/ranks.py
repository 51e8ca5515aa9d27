"""The launcher run by `mlx.launch` as several ranks: which rank this is, and decisions they take together.

Under `mlx.launch -n N` (or `--hosts ...`) every rank runs `python -m app.launcher` with the same flags.
mlx_lm.server then shards the main model over the ranks; rank 0 alone serves HTTP and every rank runs the
generation loop in lock-step (each request is broadcast to the others with `all_sum`). The model's
forward pass is itself a chain of collectives, so every rank must run the same computation in the same
order, or the ranks wait for each other forever. Anything rank 0 decides alone (its client left, its disk
holds a prompt) is therefore turned into a decision of all ranks here, at a point every rank reaches:
`agree_any` (one rank says yes: all do) and `agree_equal` (all ranks hold the same value).

Output: only rank 0 prints the launcher's `SPECGATE_EVENT` lines (the supervisor parses them); every
rank's other lines get a `[rank N]` prefix, so that the backend's log (both ranks' output, merged by
`mlx.launch`) tells them apart.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import mlx.core as mx

PIPELINE_FLAG = "--pipeline"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; size 1 when not started by `mlx.launch`."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def first(self) -> bool:
        """Rank 0: the one that serves HTTP and reports to the gateway."""
        return self.rank == 0


@functools.cache
def world() -> World:
    """The ranks (mx.distributed.init: the same group mlx_lm.server uses; a group of 1 when alone)."""
    group = mx.distributed.init()
    return World(rank=group.rank(), size=group.size())


def sharding_mode(server_argv: list[str]) -> str:
    """How mlx_lm.server shards the main model over the ranks: "pipeline" with `--pipeline`, else "tensor"."""
    return "pipeline" if PIPELINE_FLAG in server_argv else "tensor"


def agree_any(flag: bool) -> bool:
    """True on every rank when it is True on at least one; call at the same point on every rank."""
    if not world().distributed:
        return flag
    return bool(mx.distributed.all_sum(mx.array(int(flag), mx.int32)).item())


def agree_equal(value: int) -> bool:
    """Whether every rank holds the same `value`; call at the same point on every rank."""
    if not world().distributed:
        return True
    mine = mx.array(value, mx.int32)
    return bool((mx.distributed.all_min(mine) == mx.distributed.all_max(mine)).item())


class RankPrefixed:
    """A text stream that starts every line with `[rank N] ` and passes everything else through."""

    def __init__(self, stream: TextIO, rank: int) -> None:
        self._stream = stream
        self._prefix = f"[rank {rank}] "
        self._line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        lines = text.split("\n")
        out = []
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            if line and self._line_start:
                out.append(self._prefix)
            out.append(line)
            if not last:
                out.append("\n")
                self._line_start = True
            elif line:
                self._line_start = False
        self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        # fileno, isatty, encoding, buffer...: the underlying stream's.
        return getattr(self._stream, name)


# The stdout as it was before prefixing: `SPECGATE_EVENT` lines go there untouched.
_raw_stdout: TextIO | None = None


def prefix_output(rank: int) -> None:
    """Prefix this process's Python-level output (print, logging, warnings, tracebacks) with its rank."""
    global _raw_stdout
    if _raw_stdout is not None:
        return
    _raw_stdout = sys.stdout
    sys.stdout = RankPrefixed(sys.stdout, rank)
    sys.stderr = RankPrefixed(sys.stderr, rank)


def event_stream() -> TextIO | None:
    """Where a `SPECGATE_EVENT` line goes: stdout unprefixed on rank 0; nowhere on the other ranks."""
    if not world().first:
        return None
    return _raw_stdout if _raw_stdout is not None else sys.stdout
