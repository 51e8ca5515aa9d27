"""Real programs from npm packages for tests (OpenCode): found, installed, or skipped with why.

A package is installed once per version into a folder of its own under the pytest cache
(`.pytest_cache/d/npm-<package>-<version>`), with npm's ordinary client; a machine without npm, or
where the install fails (no registry, a timeout), skips the test and the reason says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_TIMEOUT_S = 300


def _installed(prefix: Path, program: str) -> str | None:
    launcher = prefix / "node_modules" / ".bin" / program
    return str(launcher) if os.access(launcher, os.X_OK) else None


def ensure_npm_program(cache: pytest.Cache, program: str, package: str, version: str) -> str:
    """The path of `program` from npm's `package`@`version`, installing it into the pytest cache when missing."""
    prefix = cache.mkdir(f"npm-{package}-{version}")
    found = _installed(prefix, program)
    if found:
        return found
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: install Node.js and npm (or `npm install -g {package}@{version}`)")
    step = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"{package}@{version}"]
    try:
        result = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{' '.join(step)} did not finish in {INSTALL_TIMEOUT_S}s; run it beforehand")
    if result.returncode != 0:
        pytest.skip(f"{' '.join(step)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    found = _installed(prefix, program)
    if not found:
        pytest.fail(f"npm installed {package}@{version}, but it has no {program!r} in {prefix}/node_modules/.bin")
    return found
