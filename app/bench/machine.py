"""The machine a figure was measured on: absolute times mean nothing without it."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine, read every figure next to these."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, its children not counted; None where the system
    does not say (Linux's /proc only)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
    fields = text[text.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and the state.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(blas: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The machine; `blas`: what each measured profile's backend reported running its matmuls on."""
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": blas or {},
        "versions": {
            name: _version(name)
            for name in (
                *("specgate", "mlx", "mlx-cpu", "mlx-lm", "mkl"),
                *("uvicorn", "uvloop", "httptools", "httpx", "fastapi", "orjson"),
            )
        },
    }
