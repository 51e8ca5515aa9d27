"""`specgate opencode-config`: printed blocks, and merges into existing OpenCode configs that must lose nothing."""

from __future__ import annotations

import difflib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.cli import build_parser
from app.integrations import jsonc
from tests.harness import FAKE_BACKEND, PYTHON, ROOT, running_gateway, toml_list


def write_profiles(directory: Path, model_dir: Path) -> Path:
    """Three profiles: full limits (with an alias), limits from the model's config.json, and none at all."""
    profiles = directory / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    # A present model whose config.json says nothing about its context.
    unsized = model_dir.parent / f"{model_dir.name}-unsized"
    unsized.mkdir(parents=True, exist_ok=True)
    (unsized / "config.json").write_text("{}")
    backend = f"backend = {{ command = {toml_list([*FAKE_BACKEND])} }}"
    (profiles / "gw.toml").write_text(
        f"""
[profiles."speculative/tiny-balanced"]
display_name = "Tiny + draft (balanced, k=5)"
model = "{model_dir}"
draft_model = "{model_dir}"
num_draft_tokens = 5
context_length = 4096
max_output_tokens = 1024
aliases = ["tiny"]
{backend}

[profiles."baseline/tiny"]
display_name = "Tiny (no draft)"
model = "{model_dir}"
max_output_tokens = 512
{backend}

[profiles."baseline/unsized"]
model = "{unsized}"
{backend}

[profiles."baseline/missing"]
model = "/nonexistent/model"
{backend}
"""
    )
    return profiles


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    return write_profiles(tmp_path, tmp_path / "model")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(["opencode-config", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def only_insertions(before: str, after: str) -> bool:
    """True when `after` is `before` with text added and nothing changed or removed."""
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    return all(tag in ("equal", "insert") for tag, *_ in matcher.get_opcodes())


EXPECTED_BALANCED = {"name": "Tiny + draft (balanced, k=5)", "limit": {"context": 4096, "output": 1024}}
EXPECTED_BASELINE = {"name": "Tiny (no draft)", "limit": {"context": 2048, "output": 512}}


# ----- printing --------------------------------------------------------------------------------------


def test_prints_a_complete_config_with_every_profile(profiles_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--profiles-dir", str(profiles_dir))
    assert code == 0, err
    config = json.loads(out)
    assert config["$schema"] == "https://opencode.ai/config.json"
    block = config["provider"]["specgate"]
    assert block["npm"] == "@ai-sdk/openai-compatible"
    assert block["options"] == {
        "baseURL": "http://127.0.0.1:8000/v1",
        # A CPU may take minutes to the first token: OpenCode's 300 s header wait is too short.
        "timeout": False,
        "headerTimeout": 900_000,
        "chunkTimeout": 900_000,
    }
    assert block["models"] == {
        "speculative/tiny-balanced": EXPECTED_BALANCED,
        # No context_length in the profile: the model's own max_position_embeddings.
        "baseline/tiny": EXPECTED_BASELINE,
        # Neither limit known: no "limit" (OpenCode would take a made-up one as fact), and a warning.
        "baseline/unsized": {"name": "baseline/unsized"},
    }
    assert "'baseline/unsized' has no context_length or max_output_tokens" in err
    # A profile whose model is not here cannot serve: left out, and said so.
    assert "left out (their models are not present, so they cannot serve): baseline/missing" in err
    # Titles go to the one profile on another backend without a draft.
    assert config["small_model"] == "specgate/baseline/unsized"


def test_selects_profiles_by_name_or_alias_and_refuses_unknown_ones(
    profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--profiles", "tiny", "baseline/tiny")
    assert code == 0
    assert list(json.loads(out)["provider"]["specgate"]["models"]) == ["speculative/tiny-balanced", "baseline/tiny"]

    code, out, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--profiles", "tiny", "nope/x")
    assert code == 2
    assert out == ""
    assert "no profile named 'nope/x'" in err
    assert "speculative/tiny-balanced" in err  # the names that do exist


def test_api_key_is_an_env_reference_never_the_key(profiles_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--api-key-env", "MY_GATEWAY_KEY")
    assert code == 0
    options = json.loads(out)["provider"]["specgate"]["options"]
    assert options["apiKey"] == "{env:MY_GATEWAY_KEY}"


# ----- merging into existing files -------------------------------------------------------------------


def test_write_creates_a_missing_file_and_fills_an_empty_one(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, content in ((tmp_path / "new" / "opencode.json", None), (tmp_path / "empty.json", "")):
        if content is not None:
            path.write_text(content)
        code, out, err = run_cli(
            capsys, "--profiles-dir", str(profiles_dir), "--profiles", "tiny", "--write", str(path)
        )
        assert code == 0, err
        assert out == ""  # the summary goes to stderr; stdout stays clean for pipes
        config = json.loads(path.read_text())
        assert config["$schema"] == "https://opencode.ai/config.json"
        assert config["provider"]["specgate"]["models"] == {"speculative/tiny-balanced": EXPECTED_BALANCED}
        assert "added speculative/tiny-balanced" in err


# A config as people keep it: schema, a default model, other providers, MCP servers, an agent; 4-space indents.
REAL_CONFIG = {
    "$schema": "https://opencode.ai/config.json",
    "model": "anthropic/claude-sonnet-4-5",
    "theme": "tokyonight",
    "provider": {
        "ollama": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Ollama (local)",
            "options": {"baseURL": "http://localhost:11434/v1"},
            "models": {"qwen2.5-coder:7b": {"name": "Qwen 2.5 Coder 7B"}},
        },
        "anthropic": {"options": {"apiKey": "{env:ANTHROPIC_API_KEY}"}},
    },
    "mcp": {"docs": {"type": "remote", "url": "https://example.invalid/mcp", "enabled": True}},
    "agent": {"review": {"model": "ollama/qwen2.5-coder:7b", "tools": {"write": False}}},
}


def test_merge_keeps_other_providers_and_keys_byte_for_byte(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "opencode.json"
    original = json.dumps(REAL_CONFIG, indent=4) + "\n"
    path.write_text(original)
    path.chmod(0o600)  # it may hold keys: a rewrite must not widen its permissions
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--write", str(path))
    assert code == 0, err
    merged_text = path.read_text()
    merged = json.loads(merged_text)
    assert only_insertions(original, merged_text), merged_text
    specgate = merged["provider"].pop("specgate")
    # The file had no small_model: one is added (titles on another backend); a user's own is never replaced.
    assert merged.pop("small_model") == "specgate/baseline/unsized"
    assert merged == REAL_CONFIG
    assert set(specgate["models"]) == {"speculative/tiny-balanced", "baseline/tiny", "baseline/unsized"}
    # The inserted block follows the file's own 4-space layout.
    assert '\n        "specgate": {\n            "npm"' in merged_text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".opencode.json")]  # no temp file left

    # A second run changes nothing: the merge is idempotent.
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--write", str(path))
    assert code == 0
    assert path.read_text() == merged_text
    assert "updated " in err


def test_merge_updates_a_previous_specgate_block_keeping_user_additions(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    previous: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "ollama": REAL_CONFIG["provider"]["ollama"],
            "specgate": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "old name",
                "options": {"baseURL": "http://old-host:9999/v1", "timeout": 600000},
                "models": {
                    "speculative/tiny-balanced": {
                        "name": "stale display name",
                        "limit": {"context": 1, "output": 1},
                        "tool_call": True,  # a user's own setting on a model specgate still lists
                    },
                    "speculative/removed-profile": {"name": "gone"},
                },
                "whitelist": ["speculative/tiny-balanced"],
            },
        },
        "model": "specgate/speculative/tiny-balanced",
    }
    path = tmp_path / "opencode.json"
    path.write_text(json.dumps(previous, indent=2))
    code, _, err = run_cli(
        capsys,
        "--profiles-dir",
        str(profiles_dir),
        "--profiles",
        "speculative/tiny-balanced",
        "baseline/tiny",
        "--base-url",
        "http://127.0.0.1:8123/v1",
        "--write",
        str(path),
    )
    assert code == 0, err
    merged = json.loads(path.read_text())
    block = merged["provider"]["specgate"]
    # The user's own timeout is kept; the others are filled in.
    assert block["options"] == {
        "baseURL": "http://127.0.0.1:8123/v1",
        "timeout": 600000,
        "headerTimeout": 900_000,
        "chunkTimeout": 900_000,
    }
    assert block["name"] == "specgate (local MLX, speculative decoding)"
    assert block["whitelist"] == ["speculative/tiny-balanced"]
    assert block["models"] == {
        "speculative/tiny-balanced": {**EXPECTED_BALANCED, "tool_call": True},
        "baseline/tiny": EXPECTED_BASELINE,
    }
    assert merged["provider"]["ollama"] == REAL_CONFIG["provider"]["ollama"]
    assert merged["model"] == "specgate/speculative/tiny-balanced"
    assert "added baseline/tiny" in err
    assert "updated speculative/tiny-balanced" in err
    assert "removed speculative/removed-profile" in err


# OpenCode reads its config with jsonc-parser: comments and trailing commas are legal, and users write them.
JSONC_CONFIG = """// OpenCode config: keep these notes
{
  "$schema": "https://opencode.ai/config.json",
  /* the default model */
  "model": "ollama/qwen2.5-coder:7b", // fast enough
  "provider": {
    "ollama": {
      "npm": "@ai-sdk/openai-compatible",
      "options": { "baseURL": "http://localhost:11434/v1" }, // not a comment: "http://x"
    },
  },
}
"""


def test_jsonc_comments_and_trailing_commas_are_preserved(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "opencode.jsonc"
    path.write_text(JSONC_CONFIG)
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--profiles", "tiny", "--write", str(path))
    assert code == 0, err
    text = path.read_text()
    assert only_insertions(JSONC_CONFIG, text), text
    document = jsonc.parse(text)
    assert document.has_comments
    config = document.root.value
    assert config["provider"]["specgate"]["models"] == {"speculative/tiny-balanced": EXPECTED_BALANCED}
    assert config["provider"]["ollama"]["options"] == {"baseURL": "http://localhost:11434/v1"}
    assert config["model"] == "ollama/qwen2.5-coder:7b"
    assert "comments inside" not in err

    # Updating that block again: still every comment outside it, and the block replaced in place.
    code, _, err = run_cli(
        capsys, "--profiles-dir", str(profiles_dir), "--profiles", "baseline/tiny", "--write", str(path)
    )
    assert code == 0, err
    again = path.read_text()
    for comment in ("// OpenCode config: keep these notes", "/* the default model */", "// fast enough"):
        assert comment in again
    assert list(jsonc.parse(again).root.value["provider"]["specgate"]["models"]) == ["baseline/tiny"]


def test_a_users_small_model_is_kept_and_the_choice_can_be_forced_or_skipped(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "opencode.json"
    path.write_text(json.dumps({"small_model": "ollama/tiny"}))
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--write", str(path))
    assert code == 0, err
    assert json.loads(path.read_text())["small_model"] == "ollama/tiny"
    code, out, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--small-model", "baseline/tiny")
    assert code == 0, err
    assert json.loads(out)["small_model"] == "specgate/baseline/tiny"
    code, out, _ = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--no-small-model")
    assert "small_model" not in json.loads(out)
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--small-model", "baseline/missing")
    assert code == 2
    assert "not among the listed profiles" in err
    # Only profiles of one backend: nothing to pick, and the warning says what that means.
    code, out, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--profiles", "tiny", "baseline/tiny")
    assert code == 0
    assert "small_model" not in json.loads(out)
    assert "small_model not set" in err


def test_jsonc_insert_into_objects_of_every_shape() -> None:
    """The splice itself: empty objects, one-line objects, trailing commas, a comment on the last line."""
    cases = {
        "{}": {"k": 1},
        '{"a": 1}': {"a": 1, "k": 1},
        '{\n  "a": 1 // note\n}': {"a": 1, "k": 1},
        '{\n  "a": 1,\n}': {"a": 1, "k": 1},
        "{\n  // only a comment\n}": {"k": 1},
        '{\n\t"a": [1, 2]\n}\n': {"a": [1, 2], "k": 1},
    }
    for text, expected in cases.items():
        document = jsonc.parse(text)
        out = jsonc.insert_member(document, document.root, "k", 1)
        assert jsonc.parse(out).root.value == expected, (text, out)
        assert only_insertions(text, out), (text, out)
    tabbed = jsonc.insert_member(jsonc.parse('{\n\t"a": 1\n}'), jsonc.parse('{\n\t"a": 1\n}').root, "k", {"x": 1})
    assert '\n\t"k": {\n\t\t"x": 1\n\t}\n}' in tabbed


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"provider": {"ollama": {}', "cannot read it as JSON or JSONC"),
        ('{"a": 1} trailing', "cannot read it as JSON or JSONC"),
        ("/* unterminated", "cannot read it as JSON or JSONC"),
        ('["not", "an", "object"]', "not a JSON object"),
        ('{"provider": "ollama"}', "'provider' is a str"),
    ],
)
def test_refuses_files_it_cannot_merge_into_and_leaves_them_alone(
    profiles_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "opencode.json"
    path.write_text(content)
    code, _, err = run_cli(capsys, "--profiles-dir", str(profiles_dir), "--write", str(path))
    assert code == 2
    assert message in err
    assert str(path) in err
    assert path.read_text() == content


def test_parse_errors_name_line_and_column() -> None:
    with pytest.raises(jsonc.JsoncError, match="line 3 column 3"):
        jsonc.parse('{\n  "a": 1\n  "b": 2\n}')


# ----- from a running gateway -------------------------------------------------------------------------


def test_from_a_running_gateway_through_the_installed_command(tmp_path: Path) -> None:
    """`--url`: the profiles the gateway serves, with their limits; the real `specgate` entry point."""
    profiles_text = (write_profiles(tmp_path / "src", tmp_path / "model") / "gw.toml").read_text()
    with running_gateway(tmp_path / "gw", profiles_text) as gateway:
        target = tmp_path / "opencode.json"
        target.write_text(json.dumps(REAL_CONFIG, indent=2))
        result = subprocess.run(
            [PYTHON, "-m", "app.cli", "opencode-config", "--url", gateway.url, "--write", str(target)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "SPECGATE_PROFILES_DIR": str(tmp_path / "nowhere")},  # must not be needed
        )
    assert result.returncode == 0, result.stderr
    block = json.loads(target.read_text())["provider"]["specgate"]
    assert block["options"]["baseURL"] == f"{gateway.url}/v1"
    assert block["models"]["speculative/tiny-balanced"] == EXPECTED_BALANCED
    # The gateway reports what its profile says; the model's config.json fallback is a local-files feature.
    assert block["models"]["baseline/tiny"] == {"name": "Tiny (no draft)"}
    assert "apiKey" not in block["options"]
