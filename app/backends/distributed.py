"""A distributed backend's command: MLX's launcher (`mlx.launch`) around the usual backend command.

A profile's `distributed` table (app/profiles.py) becomes

    <python> -m app.backends.mlx_launch --backend B (--hosts 127.0.0.1 -n R | --hostfile F)
        --starting-port P [--env K=V ...] -- <the usual backend command> [--pipeline]

`app.backends.mlx_launch` is MLX's own `mlx.launch` with the fixes a supervised, unattended run needs
(see that module); `LaunchPlan.mlx_launch` is the same launch as an `mlx.launch` command line, which a
user can paste into a shell on this host to reproduce what the gateway runs.

Every rank gets the same command. Rank 0 serves HTTP on the `--port` it is given (the gateway's side of
this host: it listens on 127.0.0.1); the other ranks serve nothing, they compute in lock-step with rank 0.

Ports: the ring backend listens on `starting_port + i` for its i-th address (JACCL's coordinator on the
starting port, NCCL on `--nccl-port`); mlx.launch's defaults are fixed numbers, so every start gets fresh
ones here: two backends (or a restart while the old sockets linger) must not meet on the same port.

`hosts = [...]`: the hostfile mlx.launch reads is written here (`run_dir/<backend>.hostfile.json`), one
rank per host, with each host's address as the gateway resolves it (the ring backend connects by IP).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import shlex
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.errors import BackendStartFailed
from app.profiles import Distributed

# mlx.launch with specgate's fixes (app/backends/mlx_launch.py), run by the gateway's own interpreter.
MLX_LAUNCH_COMMAND = (sys.executable, "-m", "app.backends.mlx_launch")
# Where fresh ring/coordinator ports are drawn from: below the ephemeral ranges of Linux (32768-60999) and
# macOS (49152-65535), so an outgoing connection of this or another program never holds one of them.
PORT_RANGE = (20000, 32000)
# Environment variables whose values /v1/models and the status page do not show.
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


@dataclass(frozen=True)
class LaunchPlan:
    """What the guard runs for a distributed backend, and how to say it to a user."""

    argv: list[str]
    # The same launch with MLX's `mlx.launch` entry point, as one shell line (secret values masked).
    mlx_launch: str
    # The hostfile written for `hosts = [...]` (or the profile's own); None for `ranks` on this host.
    hostfile: Path | None
    ranks: int


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def fresh_ports(count: int, is_free: Callable[[int], bool] = port_is_free, tries: int = 200) -> int:
    """The first of `count` consecutive ports that are free now, drawn at random from PORT_RANGE: parallel
    gateways and tests then rarely try the same ones, and a restart does not reuse its predecessor's."""
    rng = random.SystemRandom()
    low, high = PORT_RANGE
    for _ in range(tries):
        first = rng.randrange(low, high - count)
        if all(is_free(first + offset) for offset in range(count)):
            return first
    raise BackendStartFailed(f"no {count} consecutive free ports found in {low}-{high}")


def host_address(host: str) -> str:
    """The IPv4 address of an SSH destination (`name`, `user@name` or an address) as this host resolves it."""
    name = host.rpartition("@")[2]
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(name))
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as error:
        raise BackendStartFailed(
            f"distributed host {host!r} has no address here ({error}); give its IP, or use a hostfile"
        ) from error
    return str(infos[0][4][0])


def hostfile_for(hosts: Sequence[str], address: Callable[[str], str] = host_address) -> list[dict[str, object]]:
    """mlx.launch's hostfile for one rank per host (mlx/_distributed_utils/common.py `Hostfile.from_file`)."""
    return [{"ssh": host, "ips": [address(host)]} for host in hosts]


def _hostfile_ranks(path: Path) -> tuple[int, int]:
    """(hosts, addresses) of an MLX hostfile (checked when the profile was loaded)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BackendStartFailed(f"cannot read the hostfile {path}: {error}") from error
    hosts = data.get("hosts", []) if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise BackendStartFailed(f"the hostfile {path} lists no hosts")
    addresses = sum(max(1, len(host.get("ips", []))) for host in hosts if isinstance(host, dict))
    return len(hosts), addresses


def shown_env(name: str, value: str) -> str:
    """`NAME=value` as shown to users: a value that may be a secret is masked."""
    if any(word in name.upper() for word in _SECRET_WORDS):
        return f"{name}=***"
    return f"{name}={value}"


def launch_plan(
    distributed: Distributed,
    inner: Sequence[str],
    env: Mapping[str, str],
    hostfile_path: Path,
    *,
    ports: Callable[[int], int] = fresh_ports,
    address: Callable[[str], str] = host_address,
) -> LaunchPlan:
    """The mlx.launch command that runs `inner` (the usual backend command) on every rank.

    `env` is what every rank needs besides the profile's `distributed.env` (which wins): local ranks inherit
    the gateway's environment, remote ones get only what `--env` names. `hostfile_path` is where the hostfile
    of `hosts = [...]` is written."""
    placement: list[str]
    hostfile: Path | None = None
    if distributed.ranks is not None:
        ranks = addresses = distributed.ranks
        placement = ["--hosts", "127.0.0.1", "-n", str(ranks)]
    elif distributed.hosts is not None:
        ranks = addresses = len(distributed.hosts)
        hostfile_path.parent.mkdir(parents=True, exist_ok=True)
        hostfile_path.write_text(json.dumps(hostfile_for(distributed.hosts, address), indent=2) + "\n")
        hostfile = hostfile_path
        placement = ["--hostfile", str(hostfile)]
    else:
        assert distributed.hostfile is not None
        hostfile = Path(distributed.hostfile)
        ranks, addresses = _hostfile_ranks(hostfile)
        placement = ["--hostfile", str(hostfile)]
    if distributed.backend == "nccl":
        port_flags = ["--nccl-port", str(ports(1))]
    elif distributed.backend == "mpi":
        port_flags = []  # mpirun places the ranks and they meet through it
    else:
        port_flags = ["--starting-port", str(ports(addresses))]
    merged = {**env, **dict(distributed.env)}
    env_flags = [flag for name, value in sorted(merged.items()) for flag in ("--env", f"{name}={value}")]
    command = [*inner, *(["--pipeline"] if distributed.mode == "pipeline" else [])]
    arguments = ["--backend", distributed.backend, *placement, *port_flags, *env_flags, "--", *command]
    shown = [
        shown_env(*item.split("=", 1)) if previous == "--env" else item
        for previous, item in zip(["", *arguments[:-1]], arguments, strict=True)
    ]
    mlx_launch = shlex.join([str(Path(sys.executable).with_name("mlx.launch")), *shown])
    return LaunchPlan([*MLX_LAUNCH_COMMAND, *arguments], mlx_launch, hostfile, ranks)
