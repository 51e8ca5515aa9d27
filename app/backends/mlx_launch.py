"""MLX's launcher, `mlx.launch`, as the gateway runs it: `python -m app.backends.mlx_launch ARGS` is
`mlx.launch ARGS` (mlx/_distributed_utils/launch.py, imported, not copied) with four changes for a run
nobody watches:

- **No busy loop.** mlx.launch relays each rank's output in a thread that `select`s on the rank's stdin pipe
  for writing, which is always writable: every relay thread spins, a core's worth of CPU for an idle
  backend (measured with mlx 0.32.4). Nothing is ever written to a rank's stdin here (the gateway sends
  none), so the relay waits only for output.
- **Its own stdin a pipe that never speaks.** mlx.launch broadcasts its stdin to the ranks; the guard gives
  it /dev/null, which is always readable and empty: another spin, and a queue that grows without bound.
- **Whole lines, each marked with its rank** (`[rank N] ...`, unless the rank marked it already): mlx.launch
  relays chunks as they are read, so two ranks' output could mix within a line, and nothing says which
  rank wrote what. (A last line without a newline before a rank ends is dropped.)
- **An exit code that says whether a rank failed** (mlx.launch exits 0 even then): 1 if any rank ended
  with another code than 0, or was killed.

Stopping is unchanged and needs nothing here: the gateway signals the whole process group, which holds the
local ranks and the `ssh` clients of remote ones; an ssh client's end hangs up its remote session, and the
remote rank gets SIGHUP (docs/distributed.md). mlx.launch itself ends the other ranks when one fails.

mlx's private module is used as it is in mlx 0.32.x (`RemoteProcess`, `select`, `main`); a later mlx that
changes them fails here at start, loudly, rather than running with a spin.
"""

from __future__ import annotations

import os
import re
import select
import sys
from typing import Any

from mlx._distributed_utils import launch as _mlx_launch

# mlx's private launcher module, patched below: typed loosely on purpose.
launch: Any = _mlx_launch

_RANK_MARK = re.compile(r"\[rank \d+\] ")
# Ranks started in this process, for the exit code.
_STARTED: list[Any] = []


def _select_for_reading(
    rlist: list[int], wlist: list[int], xlist: list[int], timeout: float | None = None
) -> tuple[list[int], list[int], list[int]]:
    """`select` without the write set: nothing is written to a rank's stdin, so waiting for it to be
    writable only turns the relay's wait into a spin."""
    readable, _, exceptional = select.select(rlist, [], xlist, timeout)
    return readable, [], exceptional


class _Rank(launch.RemoteProcess):  # type: ignore[misc]
    """One rank whose output is relayed in whole lines, each with the rank's mark."""

    def __init__(self, rank: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(rank, *args, **kwargs)
        self.rank = rank
        self._partial = {True: "", False: ""}
        _STARTED.append(self)

    def preprocess_output(self, data: str, is_stdout: bool = False) -> str:
        text = self._partial[is_stdout] + super().preprocess_output(data, is_stdout)
        *lines, self._partial[is_stdout] = text.split("\n")
        return "".join((line if _RANK_MARK.match(line) else f"[rank {self.rank}] {line}") + "\n" for line in lines)


def _quiet_stdin() -> None:
    """fd 0 becomes a pipe whose write end this process keeps and never writes: never readable."""
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)
    globals()["_stdin_writer"] = write_end  # kept open for the process's life


def _failed() -> bool:
    for rank in _STARTED:
        code, killed = rank.exit_status
        if killed or code != 0:
            return True
    return False


def main() -> None:
    _quiet_stdin()
    launch.select = _select_for_reading
    launch.RemoteProcess = _Rank
    sys.argv[0] = "mlx.launch"
    launch.main()
    sys.stdout.flush()
    sys.exit(1 if _failed() else 0)


if __name__ == "__main__":
    main()
