"""The BLAS under the backends (app/blas.py, app/launcher/blas_probe.py): chosen, verified, reported.

The gateway tests start real launchers on a tiny generated model: what they check is what the backend
itself found in its own process (the library serving `cblas_sgemm`, a timed matmul), not what was asked.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app import blas
from app.profiles import ProfileError, parse_profiles
from app.settings import Settings
from app.testing.tiny_model import write_pair
from tests.harness import GatewayProcess, chat, running_gateway

MKL = blas.find_mkl()
needs_mkl = pytest.mark.skipif(
    MKL is None,
    reason="no MKL here (it is a dependency on Linux x86-64 only): pip install mkl",
)

FAST = "tiny/fast"
REFERENCE = "tiny/reference"
NOT_SERVED = "tiny/not-served"


# ----- choosing ------------------------------------------------------------------------------------


def test_auto_and_off_are_words_in_any_case() -> None:
    assert blas.validate_value(" Auto ") == "auto"
    assert blas.validate_value("OFF") == "off"


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_value_is_refused_with_what_to_write(value: str) -> None:
    with pytest.raises(blas.BlasChoiceError, match="'auto', 'off' or a path"):
        blas.validate_value(value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(blas.BlasChoiceError, match="is not a file"):
        blas.validate_value(str(tmp_path / "libnothing.so"))


def test_a_file_that_is_no_library_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "libfake.so"
    text.write_text("not an ELF file")
    with pytest.raises(blas.BlasChoiceError, match="does not export cblas_sgemm"):
        blas.validate_value(str(text))


def test_a_library_without_cblas_sgemm_is_refused() -> None:
    import _ctypes  # a real shared object, with no BLAS in it

    with pytest.raises(blas.BlasChoiceError, match="does not export cblas_sgemm"):
        blas.validate_value(str(_ctypes.__file__))


@needs_mkl
def test_auto_preloads_mkl_and_sleeps_its_idle_threads_early() -> None:
    assert MKL is not None
    chosen = blas.plan("auto")
    assert chosen.library == MKL
    assert chosen.family == "mkl"
    env: dict[str, str] = {"LD_PRELOAD": "libother.so"}
    chosen.apply(env)
    # Ours first, the user's preload kept; thread settings from the user's environment win.
    assert env["LD_PRELOAD"] == f"{MKL}:libother.so"
    assert env["KMP_BLOCKTIME"] == "1"
    assert env["SPECGATE_BLAS_EXPECTED"] == str(MKL)
    mine = {"KMP_BLOCKTIME": "200"}
    chosen.apply(mine)
    assert mine["KMP_BLOCKTIME"] == "200"


def test_off_preloads_nothing_and_says_why() -> None:
    env: dict[str, str] = {}
    blas.plan("off").apply(env)
    assert "LD_PRELOAD" not in env
    assert env["SPECGATE_BLAS_EXPECTED"] == ""
    if sys.platform.startswith("linux"):
        assert "blas = off" in env["SPECGATE_BLAS_NOTE"]


def test_without_mkl_or_openblas_auto_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "find_mkl", lambda: None)
    monkeypatch.setattr(blas, "find_system_openblas", lambda: None)
    chosen = blas.plan("auto")
    if not sys.platform.startswith("linux"):
        pytest.skip("nothing is preloaded outside Linux")
    assert chosen.library is None
    hint = "pip install mkl" if platform.machine() == "x86_64" else "libopenblas0-pthread"
    assert hint in chosen.note


def test_the_setting_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="is not a file"):
        Settings(blas=str(tmp_path / "missing.so"))
    assert Settings(blas="OFF").blas == "off"


def test_a_profile_names_its_blas_and_a_bad_one_names_the_field(tmp_path: Path) -> None:
    (good,) = parse_profiles('[profiles."a"]\nmodel = "/m"\nbackend = { blas = "off" }\n')
    assert good.backend.blas == "off"
    with pytest.raises(ProfileError, match="blas") as error:
        parse_profiles(f'[profiles."a"]\nmodel = "/m"\nbackend = {{ blas = "{tmp_path}/nope.so" }}\n')
    assert "a" in str(error.value)


# ----- verified and reported by real backends -------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("blas")
    main, _ = write_pair(workdir / "models")
    # Same model in all three; different `backend` settings make three backends.
    profiles = f"""
[profiles."{FAST}"]
model = "{main}"

[profiles."{REFERENCE}"]
model = "{main}"
backend = {{ blas = "off" }}

[profiles."{NOT_SERVED}"]
model = "{main}"
# MKL is asked for, but the profile's own environment empties LD_PRELOAD: it never reaches the process.
backend = {{ blas = "{MKL}", env = {{ LD_PRELOAD = "" }} }}
"""
    with running_gateway(workdir, profiles, {"SPECGATE_MAX_BACKENDS": "3"}) as running:
        yield running


def _serve(gateway: GatewayProcess, profile: str) -> dict[str, Any]:
    with gateway.client() as client:
        reply = client.post("/v1/chat/completions", json=chat("hello there", profile, max_tokens=4, temperature=0))
    assert reply.status_code == 200, reply.text
    status = httpx.get(f"{gateway.url}/status.json", timeout=5).json()
    (backend,) = [b for b in status["backends"] if profile in b["profiles"]]
    result: dict[str, Any] = backend
    return result


@needs_mkl
def test_a_backend_reports_mkl_where_the_user_looks(gateway: GatewayProcess) -> None:
    backend = _serve(gateway, FAST)
    assert backend["blas"].startswith("mkl 20"), backend
    detail = backend["blas_detail"]
    assert detail["fast"] is True
    assert detail["warning"] is None
    assert detail["gflops"] >= 25
    assert Path(detail["library"]).name.startswith("libmkl_rt")
    assert gateway.models()[FAST]["backend"]["blas"] == backend["blas"]
    logs = httpx.get(f"{gateway.url}/logs/{FAST}", params={"lines": 500}, timeout=5).text
    assert "BLAS mkl" in logs


def test_the_bundled_blas_is_reported_slow_and_the_backend_keeps_serving(gateway: GatewayProcess) -> None:
    backend = _serve(gateway, REFERENCE)
    assert backend["blas"] == "reference (slow)"
    detail = backend["blas_detail"]
    assert detail["fast"] is False
    assert "blas = off" in detail["warning"]
    assert "pip install mkl" in detail["warning"] or "SPECGATE_BLAS" in detail["warning"]
    assert gateway.models()[REFERENCE]["backend"]["blas"] == "reference (slow)"
    # Said where the operator looks: the gateway's own log and the backend's log tail.
    assert "slow BLAS" in gateway.log()
    logs = httpx.get(f"{gateway.url}/logs/{REFERENCE}", params={"lines": 500}, timeout=5).text
    assert "gateway: BLAS: slow BLAS" in logs or "BLAS: slow BLAS" in logs


@needs_mkl
def test_a_preload_that_never_arrived_is_found_out(gateway: GatewayProcess) -> None:
    backend = _serve(gateway, NOT_SERVED)
    detail = backend["blas_detail"]
    assert backend["blas"] == "reference (slow)"
    assert detail["expected"] == str(MKL)
    assert "was preloaded but cblas_sgemm comes from" in detail["warning"]
    assert "was preloaded but" in gateway.log()


def test_the_status_page_has_a_blas_column() -> None:
    from app.status import page_html

    page = page_html()
    assert "<th>BLAS</th>" in page
    assert "blasCell(tr, b)" in page


# ----- batch variance: what exactness of speculation rests on ------------------------------------------


def _batch_variance(blas_value: str) -> str:
    command = [sys.executable, "-m", "app.bench.batch_variance", "--blas", blas_value]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# The batch-variance command is a benchmark (a minute of CPU on the reference BLAS): in the slow run.
@pytest.mark.slow
def test_the_reference_blas_rounds_a_row_the_same_in_any_batch() -> None:
    out = _batch_variance("off")
    assert out.startswith("BLAS: reference (slow)")
    rows = [line for line in out.splitlines() if line.startswith("  x[m, ")]
    assert len(rows) == 6
    assert all(line.endswith("batch-invariant") for line in rows), out


@pytest.mark.slow
@needs_mkl
def test_the_batch_variance_command_runs_on_mkl_and_names_the_rows_that_differ() -> None:
    out = _batch_variance("auto")
    assert out.startswith("BLAS: mkl 20")
    rows = [line for line in out.splitlines() if line.startswith("  x[m, ")]
    assert len(rows) == 6
    # Either verdict is a fact about the MKL installed; each line must be one of the two.
    assert all(
        line.endswith("batch-invariant") or "rows differ from the 1-row product at m = [" in line for line in rows
    )
