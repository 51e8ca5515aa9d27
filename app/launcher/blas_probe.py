"""At start, find out which BLAS really serves MLX's float32 matmuls, and how fast it is.

The gateway preloads a fast BLAS (app/blas.py), but a preload can silently fail (a wrong path, a
loader that refuses it, a library missing a dependency): then every matmul runs on the wheel's
reference BLAS, ~50x slower, and nothing else would say so. So the backend checks two things itself:

1. which shared object `cblas_sgemm` resolves to in this process (`dladdr` on the symbol the dynamic
   linker hands out first: the same lookup that binds libmlx's call), and that library's version;
2. a timed float32 matmul on MLX's CPU device: the reference BLAS reaches ~5 GFLOP/s on a modern core,
   MKL and OpenBLAS 100+ per core, so below `FAST_GFLOPS` the BLAS is called slow, whatever its name.

The result goes to the log (a warning when slow) and to the gateway as a `blas` launcher event.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from app.blas import family_of

# A clear line between the reference BLAS (4-6 GFLOP/s on the 2-core Xeons measured) and any optimized
# one (MKL ~400, OpenBLAS ~350 there; one modern core of either is well above this).
FAST_GFLOPS = 25.0
# 2 * 512^3 = 0.27 GFLOP: ~50 ms on the reference BLAS, under 1 ms on MKL.
_PROBE_SIZE = 512
_PROBE_REPEATS = 3


@dataclass(frozen=True)
class BlasReport:
    """What the backend found; `summary` is the short string shown everywhere (e.g. "mkl 2026.2")."""

    summary: str
    library: str | None
    version: str | None
    gflops: float | None
    fast: bool
    expected: str | None
    warning: str | None

    def as_event(self) -> dict[str, object]:
        return asdict(self)

    @property
    def identity(self) -> str:
        """The library and its version, without the timing: `summary` says "(slow)" when the machine is busy."""
        return f"{Path(self.library).name if self.library else 'none'} {self.version or ''}".strip()


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def sgemm_provider() -> str | None:
    """The file whose `cblas_sgemm` this process binds to first; None when no library in the global scope
    has one, which means libmlx uses the BLAS bundled with it (loaded privately, with libmlx)."""
    return _sgemm_file(ctypes.CDLL(None))


def library_file(name: str) -> str | None:
    """The file a library name (a path, or a soname the loader searches for) is, by its `cblas_sgemm`."""
    try:
        return _sgemm_file(ctypes.CDLL(name))
    except OSError:
        return None


def _sgemm_file(library: ctypes.CDLL) -> str | None:
    try:
        symbol = library.cblas_sgemm
    except AttributeError:
        return None
    info = _DlInfo()
    process = ctypes.CDLL(None)
    file_name: bytes | None = info.dli_fname
    if not process.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)):
        return None
    file_name = info.dli_fname
    return os.path.realpath(file_name.decode(errors="replace")) if file_name else None


def bundled_blas() -> str | None:
    """The BLAS mapped next to libmlx (the `mlx_cpu.libs/libblas-*.so` of the wheel), from /proc."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip().split(" ")[-1]
                if "/libblas" in path:
                    return path
    except OSError:
        pass
    return None


def library_version(path: str) -> tuple[str, str | None]:
    """(family, version) of a BLAS library, asked from the library itself where it can say."""
    name = Path(path).name
    family = family_of(name)
    if family == "mkl":
        return family, _mkl_version(path)
    if family == "openblas":
        return family, _openblas_version(path)
    return (family, None) if family == "reference" else (name, None)


def _mkl_version(path: str) -> str | None:
    try:
        library = ctypes.CDLL(path)
        buffer = ctypes.create_string_buffer(256)
        library.MKL_Get_Version_String(buffer, len(buffer))
    except (OSError, AttributeError):
        return None
    # "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..." -> "2026.2"
    text = buffer.value.decode(errors="replace")
    words = text.split("Version", 1)[-1].split()
    return words[0].split("-")[0] if words else None


def _openblas_version(path: str) -> str | None:
    try:
        get_config = ctypes.CDLL(path).openblas_get_config
    except (OSError, AttributeError):
        return None
    get_config.restype = ctypes.c_char_p
    # "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY ..." -> "0.3.21"
    words = (get_config() or b"").decode(errors="replace").split()
    return words[1] if len(words) > 1 else None


def timed_sgemm_gflops() -> float:
    """GFLOP/s of a float32 matmul on MLX's CPU device: the call that decides prompt and decode speed."""
    n = _PROBE_SIZE
    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n), dtype=mx.float32)
        b = mx.random.normal((n, n), dtype=mx.float32)
        mx.eval(a @ b)  # warm: thread pools, page faults
        best = float("inf")
        for _ in range(_PROBE_REPEATS):
            started = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def probe(expected: str | None, note: str = "") -> BlasReport:
    """Identify and time the BLAS serving this process (see the module docstring)."""
    provider = sgemm_provider()
    library = provider or bundled_blas()
    family, version = library_version(library) if library else ("reference", None)
    gflops = round(timed_sgemm_gflops(), 1)
    fast = gflops >= FAST_GFLOPS
    name = family if version is None else f"{family} {version}"
    summary = name if fast else f"{name} (slow)"
    warning = None
    if expected and (provider is None or library_file(expected) != provider):
        warning = f"{expected} was preloaded but cblas_sgemm comes from {library or 'the bundled BLAS'}"
    elif not fast:
        why = f" ({note})" if note else ""
        warning = (
            f"slow BLAS{why}: {name} runs float32 matmuls at {gflops} GFLOP/s; with MKL or OpenBLAS they run "
            "10-100x faster. Install one (pip install mkl on x86-64) or set SPECGATE_BLAS to a library "
            "exporting cblas_sgemm"
        )
    return BlasReport(summary, library, version, gflops, fast, expected or None, warning)


def probe_and_report() -> BlasReport:
    """Run the probe on a CPU backend, print its line to stderr and its event to stdout."""
    # On a GPU (Metal, CUDA) the model's matmuls never reach the CPU BLAS: nothing to verify.
    if mx.default_device().type != mx.DeviceType.cpu:
        report = BlasReport("not used (gpu)", None, None, None, True, None, None)
    else:
        expected = os.environ.get("SPECGATE_BLAS_EXPECTED") or None
        report = probe(expected, os.environ.get("SPECGATE_BLAS_NOTE", ""))
        line = f"specgate launcher: BLAS {report.summary}: sgemm {report.gflops} GFLOP/s ({report.library})"
        print(line, file=sys.stderr, flush=True)
        if report.warning:
            print(f"specgate launcher: WARNING {report.warning}", file=sys.stderr, flush=True)
    return report
