"""Real programs from Debian packages for tests (Prometheus, Chromium): found, installed, or skipped with why.

CI (`.ci/run`) installs them before the tests. A test session installs one itself only as root on a
machine with apt-get; anywhere else the test is skipped and the reason says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

INSTALL_TIMEOUT_S = 600


def ensure_program(program: str, package: str) -> str:
    """The path of `program`, installing Debian's `package` when it is missing and that is possible."""
    found = shutil.which(program)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            f"{program} is not installed and this test session cannot install it (needs root and apt-get): "
            f"install the Debian package {package!r}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package])
    for step in steps:
        try:
            result = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{' '.join(step)} did not finish in {INSTALL_TIMEOUT_S}s; install {package!r} beforehand")
        if result.returncode != 0:
            pytest.skip(f"{' '.join(step)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    found = shutil.which(program)
    if not found:
        pytest.fail(f"the Debian package {package!r} installed, but {program!r} is not on PATH")
    return found
