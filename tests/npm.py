"""Real programs from npm packages for tests (OpenCode): found, installed, or skipped with why.

A package is installed once per version into a folder of its own under the pytest cache
(`.pytest_cache/d/npm-<package>-<version>`), with npm's ordinary client. Without npm, a program of that
name on PATH is used as it is; where neither works (no npm, no registry, a failed or broken install)
the test is skipped and the reason says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Below pytest-timeout's 300 s, so a registry that does not answer skips the test rather than failing it.
INSTALL_TIMEOUT_S = 150
VERSION_TIMEOUT_S = 30


def _installed(prefix: Path, program: str) -> str | None:
    launcher = prefix / "node_modules" / ".bin" / program
    return str(launcher) if os.access(launcher, os.X_OK) else None


def _check_runs(path: str, how_to_fix: str) -> str:
    """`path` when `path --version` works, in a scratch HOME so nothing of the user's is read or written."""
    with tempfile.TemporaryDirectory(prefix="npm-program-home-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
        try:
            result = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S, env=env
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"{path} --version did not run ({error}); {how_to_fix}")
    if result.returncode != 0:
        pytest.skip(f"{path} --version failed ({result.returncode}): {result.stderr.strip()[-300:]}; {how_to_fix}")
    return path


def ensure_npm_program(cache: pytest.Cache, program: str, package: str, version: str) -> str:
    """The path of `program` from npm's `package`@`version`, installing it into the pytest cache when missing."""
    prefix = cache.mkdir(f"npm-{package}-{version}")
    found = _installed(prefix, program)
    if found:
        return _check_runs(found, f"delete {prefix} to install it again")
    npm = shutil.which("npm")
    if npm is None:
        on_path = shutil.which(program)
        if on_path:
            return _check_runs(on_path, f"install npm, or {package}@{version} with it")
        pytest.skip(f"neither npm nor {program} is installed: install Node.js and npm (the test installs {package})")
    # --prefer-offline: a pinned version already in npm's cache installs without asking the registry.
    flags = ["--no-audit", "--no-fund", "--prefer-offline", "--fetch-retries=1", "--fetch-timeout=30000"]
    step = [npm, "install", *flags, "--prefix", str(prefix), f"{package}@{version}"]
    try:
        result = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{' '.join(step)} did not finish in {INSTALL_TIMEOUT_S}s; run it beforehand")
    if result.returncode != 0:
        pytest.skip(f"{' '.join(step)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    found = _installed(prefix, program)
    if not found:
        pytest.skip(f"npm installed {package}@{version}, but it has no {program!r} in {prefix}/node_modules/.bin")
    return _check_runs(found, f"delete {prefix} to install it again")
