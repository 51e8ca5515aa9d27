"""Invalid profile files: each a ProfileError naming the file (and the profile and field where there is one),
at start (`specgate serve` exits 2 with the message, no traceback) and on reload (the running profiles stay,
and the file watcher keeps working for later edits) (issue 19 item 14).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from app.profiles import ProfileError, load_profiles
from tests.harness import PYTHON, ROOT, fake_model_dir, fake_profile, running_gateway, wait_for

GOOD = '[profiles."ok"]\nmodel = "/m"\n'


def write(text: str | bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return make


def profile(fields: str) -> Callable[[Path], None]:
    return write(f'[profiles."bad/one"]\nmodel = "/m"\n{fields}\n')


# (id, how to make `bad.toml`, fragments the error must name)
CASES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("field name", profile('name = "other"'), ("bad/one", "'name'")),
    ("field source_file", profile('source_file = "x"'), ("bad/one", "'source_file'")),
    ("not UTF-8", write(b'[profiles."a"]\nmodel = "/m\xff"\n'), ("not UTF-8",)),
    ("UTF-16", write('[profiles."a"]\nmodel = "/m"\n'.encode("utf-16")), ("not UTF-8",)),
    ("a directory", lambda path: path.mkdir(), ("not a regular file",)),
    ("a FIFO", lambda path: os.mkfifo(path), ("not a regular file",)),
    ("too large", write("# " + "x" * (2 << 20) + "\n"), ("over the limit",)),
    ("nested too deeply", write("a = " + "[" * 5000 + "]" * 5000 + "\n"), ("nested too deeply",)),
    ("name with a line break", write('[profiles."a\\nb"]\nmodel = "/m"\n'), ("profile name",)),
    ("name with ESC", write('[profiles."a\\u001bb"]\nmodel = "/m"\n'), ("profile name",)),
    ("alias with a space", profile('aliases = ["b c"]'), ("bad/one", "'aliases'")),
    ("ttl inf", profile("ttl = inf"), ("bad/one", "'ttl'", "finite")),
    ("temperature nan", profile("sampling = { temperature = nan }"), ("bad/one", "sampling.temperature")),
    ("model with NUL", profile('draft_model = "/d\\u0000"'), ("bad/one", "'draft_model'", "NUL")),
    ("command empty", profile("backend = { command = [] }"), ("bad/one", "backend.command")),
    ("env value a table", profile("backend = { env = { A = { b = 1 } } }"), ("bad/one", "backend.env")),
    ("backend a string", profile('backend = "fast"'), ("bad/one", "'backend'")),
    ("profiles a number", write("profiles = 3\n"), ("'profiles'",)),
    ("prompt file missing", profile('system_prompt_file = "none.txt"'), ("bad/one", "system_prompt_file")),
    ("prompt file a directory", profile('system_prompt_file = "sub"'), ("bad/one", "not a regular file")),
    ("prompt file not UTF-8", profile('system_prompt_file = "binary.txt"'), ("bad/one", "not UTF-8")),
    ("prompt file with NUL", profile('system_prompt_file = "a\\u0000b"'), ("bad/one", "system_prompt_file")),
]


def profiles_dir(parent: Path, make_bad: Callable[[Path], None]) -> Path:
    directory = parent / "profiles"
    (directory / "prompts" / "sub").mkdir(parents=True)
    (directory / "prompts" / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    (directory / "a-good.toml").write_text(GOOD)
    make_bad(directory / "bad.toml")
    return directory


@pytest.mark.parametrize(("make_bad", "fragments"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_invalid_files_are_profile_errors_naming_what_is_wrong(
    tmp_path: Path, make_bad: Callable[[Path], None], fragments: tuple[str, ...]
) -> None:
    directory = profiles_dir(tmp_path, make_bad)
    with pytest.raises(ProfileError) as caught:
        load_profiles(directory)
    message = str(caught.value)
    assert "bad.toml" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", ["field name", "not UTF-8", "a directory", "a FIFO"])
def test_serve_refuses_them_at_start(tmp_path: Path, case: str) -> None:
    make_bad, fragments = next(c[1:] for c in CASES if c[0] == case)
    directory = profiles_dir(tmp_path, make_bad)
    result = subprocess.run(
        [PYTHON, "-m", "app.cli", "serve", "--port", "0", "--no-prepare", "--profiles-dir", str(directory)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "bad.toml" in result.stderr
    assert all(fragment in result.stderr for fragment in fragments), result.stderr
    assert "Traceback" not in result.stderr


def test_the_watcher_survives_every_bad_file_and_keeps_reloading(tmp_path: Path) -> None:
    model = fake_model_dir(tmp_path)
    env = {"SPECGATE_RELOAD_ON_CHANGE": "true", "SPECGATE_RELOAD_POLL_SECONDS": "0.2"}
    with running_gateway(tmp_path / "gw", fake_profile("first", model), env) as gateway:
        prompts = gateway.profiles_dir / "prompts"
        (prompts / "sub").mkdir(parents=True)
        (prompts / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
        bad = gateway.profiles_dir / "bad.toml"
        for index, (case, make_bad, _) in enumerate(CASES):
            before = gateway.log().count("profile reload (profile files changed) rejected")
            make_bad(bad)
            wait_for(
                lambda before=before: gateway.log().count("profile reload (profile files changed) rejected") > before,
                15,
                f"the reload to reject {case!r}",
            )
            rejection = gateway.log().split("profile reload (profile files changed) rejected")[-1].splitlines()[0]
            assert "bad.toml" in rejection, (case, rejection)
            if bad.is_dir():
                bad.rmdir()
            else:
                bad.unlink()
            # A good edit after each bad one is applied: the watcher is alive.
            (gateway.profiles_dir / "more.toml").write_text(fake_profile(f"later-{index}", model))
            wait_for(lambda index=index: f"later-{index}" in gateway.models(), 15, f"a good edit after {case!r}")
            assert "first" in gateway.models()
        assert "Traceback" not in gateway.log()
