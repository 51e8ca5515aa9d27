"""Which BLAS a backend's MLX runs its float32 matmuls on, and the environment that makes it so.

Why this exists: the `mlx-cpu` wheel bundles Netlib's *reference* BLAS, and MLX sends every float32
matmul to `cblas_sgemm`. Any library that exports `cblas_sgemm`, preloaded into the backend
(`LD_PRELOAD`), takes over by symbol interposition. Measured on a 2-core Xeon (docs/benchmarks.md,
"BLAS"): Qwen2.5-Coder-1.5B float32 decodes at 0.5 tok/s on the reference BLAS, 2.2 on Debian's
OpenBLAS 0.3.21 and 4.7 on MKL; prompt processing goes from 0.8 to 32-35 tok/s on either.

The choice, `SPECGATE_BLAS` or a profile's `backend.blas`:

- `auto` (default): MKL's single dynamic library (`libmkl_rt`) from the `mkl` package, a dependency on
  Linux x86-64. MKL over OpenBLAS because decode, the phase users wait for, is a one-row matmul that is
  bound by memory bandwidth, and MKL's is 2x faster there (52.8 vs 19.4 GB/s on a 1x1536 @ 1536x8960
  product). PyPI's OpenBLAS (`scipy-openblas32`) cannot be used: it prefixes its symbols
  (`scipy_cblas_sgemm`). Where there is no MKL wheel (Linux aarch64), a system OpenBLAS
  (`apt-get install libopenblas0-pthread`) is used when present. On macOS MLX runs on Metal and
  Accelerate: nothing to preload.
- `off`: the wheel's own BLAS (the backend reports it as slow).
- a path to a shared library exporting `cblas_sgemm`.

The backend verifies what it got (app/launcher/blas_probe.py) and reports it; nothing here is assumed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

AUTO = "auto"
OFF = "off"

# OpenMP threads of MKL wait this many milliseconds for more work before they sleep (Intel's default is
# 200, spinning). With two backends busy on two cores, spinning threads steal the other backend's core:
# measured (two 1.5B decodes at once) 4.60 tok/s in all at the default, 4.95 at 1 ms, 5.04 with one thread
# each; alone, 1 ms loses nothing (4.64 vs 4.65 tok/s) where one thread halves decode (2.63). So every
# backend keeps all cores and sleeps its idle threads after 1 ms. A value in the environment wins.
MKL_THREAD_ENV = {"KMP_BLOCKTIME": "1"}

# Where the value is read from, for messages that must tell the user what to change.
SETTING_NAME = "SPECGATE_BLAS"


class BlasChoiceError(ValueError):
    """A BLAS value that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class BlasPlan:
    """What the supervisor does to a backend's environment for its BLAS."""

    # Shared library to preload; None: MLX keeps the BLAS it was built with.
    library: Path | None
    # Family for messages ("mkl", "openblas", "custom"); the backend reports what it really got.
    family: str
    env: dict[str, str] = field(default_factory=dict)
    # Why nothing is preloaded, when nothing is (shown with a slow report).
    note: str = ""

    def apply(self, env: dict[str, str]) -> None:
        """Add the preload and thread settings to a backend's environment (the user's values win)."""
        if self.library is not None:
            preload = env.get("LD_PRELOAD", "").strip()
            env["LD_PRELOAD"] = f"{self.library}:{preload}" if preload else str(self.library)
        for name, value in self.env.items():
            env.setdefault(name, value)
        # The backend checks that this library is the one serving cblas_sgemm.
        env["SPECGATE_BLAS_EXPECTED"] = str(self.library) if self.library is not None else ""
        env["SPECGATE_BLAS_NOTE"] = self.note


def validate_value(value: str) -> str:
    """Check a `blas` value as a setting or profile field is read; returns it normalised."""
    value = value.strip()
    if value.lower() in (AUTO, OFF):
        return value.lower()
    if not value:
        raise BlasChoiceError("blas: empty; use 'auto', 'off' or a path to a library exporting cblas_sgemm")
    path = Path(value).expanduser()
    if not path.is_file():
        raise BlasChoiceError(
            f"blas: {value!r} is not a file; use 'auto', 'off' or a path to a library exporting cblas_sgemm"
        )
    if not exports_cblas_sgemm(path):
        raise BlasChoiceError(f"blas: {value!r} does not export cblas_sgemm (MLX calls that symbol); pick another")
    return str(path)


def exports_cblas_sgemm(path: Path) -> bool:
    """Whether `path` loads and exports `cblas_sgemm` (loaded locally: it replaces nothing here)."""
    try:
        library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    except OSError:
        return False
    return hasattr(library, "cblas_sgemm")


def plan(value: str) -> BlasPlan:
    """Turn a validated `blas` value into what the supervisor does."""
    if not sys.platform.startswith("linux"):
        # macOS: MLX runs on Metal, and its CPU ops on Accelerate; other systems: nothing known to do.
        return BlasPlan(None, "native", note=f"nothing to preload on {sys.platform}")
    if value == OFF:
        return BlasPlan(None, "bundled", note=f"blas = off ({SETTING_NAME} or the profile's backend.blas)")
    if value == AUTO:
        return _auto_plan()
    library = Path(value)
    family = family_of(library.name)
    return BlasPlan(library, family, dict(MKL_THREAD_ENV) if family == "mkl" else {})


def _auto_plan() -> BlasPlan:
    mkl = find_mkl()
    if mkl is not None:
        return BlasPlan(mkl, "mkl", dict(MKL_THREAD_ENV))
    openblas = find_system_openblas()
    if openblas is not None:
        return BlasPlan(openblas, "openblas")
    hint = (
        "pip install mkl"
        if platform.machine() in ("x86_64", "AMD64")
        else "apt-get install libopenblas0-pthread (or set SPECGATE_BLAS to a library exporting cblas_sgemm)"
    )
    return BlasPlan(None, "bundled", note=f"no MKL or OpenBLAS found: {hint}")


@functools.cache  # asked at every backend start; the installed files do not change while we run
def find_mkl() -> Path | None:
    """`libmkl_rt` of the installed `mkl` distribution (PyPI puts it in the environment's lib/)."""
    try:
        files = metadata.distribution("mkl").files or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name.startswith("libmkl_rt.so"):
            located = Path(str(entry.locate())).resolve()
            if located.is_file():
                return located
    return None


@functools.cache  # find_library runs ldconfig: once is enough
def find_system_openblas() -> Path | None:
    """A system OpenBLAS that exports the plain `cblas_sgemm` (Debian's does; PyPI's does not)."""
    name = ctypes.util.find_library("openblas")
    # A soname ("libopenblas.so.0") is what LD_PRELOAD and dlopen both search the system paths for.
    if name is None or not exports_cblas_sgemm(Path(name)):
        return None
    return Path(name)


def family_of(file_name: str) -> str:
    """ "mkl", "openblas", "reference" (Netlib's libblas, as the mlx-cpu wheel bundles it) or "custom"."""
    if file_name.startswith("libmkl"):
        return "mkl"
    if "openblas" in file_name:
        return "openblas"
    if file_name.startswith("libblas"):
        return "reference"
    return "custom"
