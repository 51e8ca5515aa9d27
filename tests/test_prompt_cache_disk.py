"""Prompt caches on disk (app/launcher/disk_tier.py), tested on real launchers and a real gateway.

A prompt served by one backend process must come back from disk in the next one (restart, TTL unload),
with greedy output token for token what the model computes without any cache (ground truth in this
process, as in tests/test_launcher.py). Caches of another model or settings are never used; damaged
files are ignored and deleted; the bound in bytes holds, oldest entries first.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.launcher.prompt_files import SUFFIX, read_header
from tests.conftest import LauncherFactory, LauncherProcess, TinyPair
from tests.harness import running_gateway, wait_for
from tests.test_launcher import Reference, body_for

MIN_TOKENS = 32
MAX_TOKENS = 24

# Long enough (~1,000 tokens of the tiny tokenizer) that a restore is worth something; built from the
# tokenizer's training text so that it tokenizes the way real text does.
SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: def fibonacci(n) returns the quick brown fox, answer briefly and precisely." for i in range(30)
)
OTHER_SYSTEM = "Hello! How can I help you today? " + " ".join(
    f"Numbers {i} {i + 1} and symbols {{}} [] () <> = + - * / for item {i}." for i in range(30)
)


@pytest.fixture(scope="module")
def reference(tiny_pair: TinyPair) -> Reference:
    return Reference(tiny_pair)


def messages(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


VARIANTS = {
    "draft": lambda pair: ["--model", str(pair.main), "--draft-model", str(pair.draft), "--num-draft-tokens", "3"],
    # No draft, one request at a time: the gateway runs such backends with --single-stream.
    "plain": lambda pair: ["--model", str(pair.main), "--single-stream"],
    # No draft, mlx_lm's batch generator (profiles with max_concurrency > 1).
    "batched": lambda pair: ["--model", str(pair.main)],
}


def launcher_args(pair: TinyPair, variant: str, directory: Path, *extra: str) -> list[str]:
    return [
        *VARIANTS[variant](pair),
        "--prompt-cache-dir",
        str(directory),
        "--prompt-cache-min-tokens",
        str(MIN_TOKENS),
        *extra,
    ]


def disk_stats(launcher: LauncherProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(launcher.base_url + "/specgate/stats", timeout=5.0).json()
    return stats["prompt_cache_disk"]


def saved(launcher: LauncherProcess) -> int:
    return sum(store["saved"] for store in disk_stats(launcher)["stores"])


def wait_saved(launcher: LauncherProcess, count: int) -> None:
    wait_for(lambda: saved(launcher) >= count, 30.0, f"{count} prompt(s) saved to disk ({launcher.stderr()[-2000:]})")


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*/*{SUFFIX}"))


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    # Bitwise equal between two runs only if the KV they attend to is: a restored cache slightly off
    # still gives the same greedy tokens on a tiny model, but not the same log-probabilities.
    logprobs: list[float]
    cached_tokens: int
    specgate: dict[str, Any]


def ask(launcher: LauncherProcess, chat: list[dict[str, str]], k: int | None = None) -> Answer:
    body = {**body_for("chat", chat, MAX_TOKENS, k), "stream": False, "logprobs": True}
    response = httpx.post(launcher.base_url + "/v1/chat/completions", json=body, timeout=30.0)
    assert response.status_code == 200, response.text
    payload = response.json()
    choice = payload["choices"][0]
    return Answer(
        text=choice["message"]["content"] or "",
        token_ids=[entry["id"] for entry in choice["logprobs"]["content"]],
        logprobs=[entry["logprob"] for entry in choice["logprobs"]["content"]],
        cached_tokens=int(payload["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)),
        specgate=payload["specgate"],
    )


def restored(got: Answer) -> int:
    return int(got.specgate["cached_tokens_disk"])


def restart(factory: LauncherFactory, launcher: LauncherProcess) -> LauncherProcess:
    launcher.stop()
    return factory.ready(*launcher.args)


def assert_greedy(reference: Reference, got: Answer, chat: list[dict[str, str]]) -> None:
    tokens = reference.prompt_tokens("chat", chat)
    assert got.token_ids == reference.greedy(tokens, MAX_TOKENS).tokens


# --------------------------------------------------------------------------------------------------
# Restarts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["draft", "plain", "batched"])
def test_restart_restores_the_prompt_from_disk_and_output_is_unchanged(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, reference: Reference, tmp_path: Path, variant: str
) -> None:
    # A question of more than MIN_TOKENS: the batch generator stores the system prompt on its own first.
    chat = messages("Tell me a story about a robot who learns to paint. " * 4)
    prompt = reference.prompt_tokens("chat", chat)
    first = launcher_factory.ready(*launcher_args(tiny_pair, variant, tmp_path))
    cold = ask(first, chat)
    assert cold.cached_tokens == 0
    assert restored(cold) == 0
    assert_greedy(reference, cold, chat)
    wait_saved(first, 1)

    second = restart(launcher_factory, first)
    warm = ask(second, chat)
    # All but the last prompt token (fed again to start generation) came from disk.
    assert warm.cached_tokens == len(prompt) - 1
    assert disk_stats(second)["stores"][0]["restored_tokens"] == len(prompt) - 1
    if variant != "batched":
        # The batch generator looks caches up outside the per-request path: no per-request split there.
        assert restored(warm) == len(prompt) - 1
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == cold.logprobs
    assert_greedy(reference, warm, chat)


def test_multi_turn_conversation_continues_from_disk_writing_only_new_tokens(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, reference: Reference, tmp_path: Path
) -> None:
    launcher = launcher_factory.ready(*launcher_args(tiny_pair, "draft", tmp_path))
    chat = messages("Hello! How can I help you today?")
    follow_ups = [
        "Tell me more about the quick brown fox and the lazy dog, " * 4,
        "What is the capital of France? Answer briefly and precisely, " * 4,
        "Continue the conversation about speculative decoding, " * 4,
    ]
    prompts: list[list[int]] = []
    for turn, follow_up in enumerate(follow_ups):
        prompts.append(reference.prompt_tokens("chat", chat))
        got = ask(launcher, chat, k=1 + turn)
        assert_greedy(reference, got, chat)
        if turn == 2:
            # Served by a new process: the earlier turns came from disk.
            assert restored(got) == common_prefix(prompts[1], prompts[2]) > len(prompts[0])
        stored = turn + 1
        wait_for(lambda: len(entries(tmp_path)) == stored, 30.0, f"turn {turn}'s prompt on disk")  # noqa: B023
        chat = [*chat, {"role": "assistant", "content": got.text}, {"role": "user", "content": follow_up}]
        if turn == 1:
            launcher = restart(launcher_factory, launcher)
    # Turns 2 and 3 extended the stored prompts: children that hold only their own tokens.
    headers = [read_header(path) for path in entries(tmp_path)]
    assert sorted(h.length for h in headers) == [len(p) for p in prompts]
    (root,) = [h for h in headers if h.parent is None]
    children = [h for h in headers if h.parent is not None]
    assert all(h.parent_length > len(h.tokens) for h in children)
    assert sum(h.size for h in children) < root.size

    launcher = restart(launcher_factory, launcher)
    prompt = reference.prompt_tokens("chat", chat)
    got = ask(launcher, chat, k=2)
    assert restored(got) == common_prefix(prompts[2], prompt) > len(prompts[1])
    assert_greedy(reference, got, chat)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_a_new_session_reuses_the_shared_system_prompt(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, reference: Reference, tmp_path: Path
) -> None:
    first_session, second_session = messages("Tell me a story about a robot"), messages("import os and sys")
    first_tokens = reference.prompt_tokens("chat", first_session)
    second_tokens = reference.prompt_tokens("chat", second_session)
    shared = common_prefix(first_tokens, second_tokens)
    launcher = launcher_factory.ready(*launcher_args(tiny_pair, "draft", tmp_path))
    ask(launcher, first_session)
    wait_saved(launcher, 1)

    launcher = restart(launcher_factory, launcher)
    got = ask(launcher, second_session)
    assert restored(got) == shared == got.cached_tokens
    assert shared > len(second_tokens) - 20  # the system prompt, not just the template's first tokens
    assert_greedy(reference, got, second_session)


def test_ttl_unload_then_the_prompt_comes_from_disk_through_the_gateway(tiny_pair: TinyPair, tmp_path: Path) -> None:
    profiles = f"""
[profiles."tiny"]
model = "{tiny_pair.main}"
draft_model = "{tiny_pair.draft}"
ttl = 1

[profiles."tiny-memory-only"]
model = "{tiny_pair.main}"
backend = {{ prompt_cache_disk_bytes = 0 }}
"""
    env = {"SPECGATE_PROMPT_CACHE_MIN_TOKENS": str(MIN_TOKENS)}
    with running_gateway(tmp_path / "gateway", profiles, env) as gateway, gateway.client() as client:
        body = {"model": "tiny", "messages": messages("Tell me a story"), "max_tokens": 16, "temperature": 0}
        cold = client.post("/v1/chat/completions", json=body).json()
        assert cold["timings"]["cache_disk_n"] == 0
        pid = gateway.backend_pid("tiny")
        # The backend is unloaded once idle for its TTL; its prompt is on disk by then.
        wait_for(lambda: gateway.models()["tiny"]["state"] == "stopped", 30.0, "the TTL unload")
        warm = client.post("/v1/chat/completions", json=body).json()
        assert gateway.backend_pid("tiny") not in (None, pid)
        prompt = warm["usage"]["prompt_tokens"]
        assert warm["timings"]["cache_disk_n"] == warm["timings"]["cache_n"] == prompt - 1
        assert warm["choices"][0]["message"] == cold["choices"][0]["message"]

        recent = client.get("/status.json").json()["requests"]  # newest first
        assert [r["disk_cached_tokens"] for r in recent if r["profile"] == "tiny"] == [prompt - 1, 0]
        assert _metric(client, "specgate_prompt_tokens_cached_disk_total", "tiny") == prompt - 1

        # A profile with the disk tier off: nothing below its identity, nothing restored.
        memory_only = {**body, "model": "tiny-memory-only"}
        client.post("/v1/chat/completions", json=memory_only)
        assert client.post("/v1/chat/completions", json=memory_only).json()["timings"]["cache_disk_n"] == 0
        cache_root = tmp_path / "gateway" / "store" / ".prompt-cache"
        assert len([d for d in cache_root.iterdir() if d.is_dir()]) == 1


def _metric(client: httpx.Client, name: str, profile: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and f'profile="{profile}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {profile} not in /metrics")


# --------------------------------------------------------------------------------------------------
# Bound, damage, identity
# --------------------------------------------------------------------------------------------------


def test_the_bound_in_bytes_evicts_the_least_recently_used_first(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, reference: Reference, tmp_path: Path
) -> None:
    chats = [messages("one", system) for system in (SYSTEM, OTHER_SYSTEM, SYSTEM.upper())]
    # Each entry's size, measured in a directory of its own; then a bound that holds the newest two.
    sizes = []
    for index, chat in enumerate(chats):
        probe_dir = tmp_path / f"probe-{index}"
        probe = launcher_factory.ready(*launcher_args(tiny_pair, "plain", probe_dir))
        ask(probe, chat)
        wait_saved(probe, 1)
        probe.stop()
        (path,) = entries(probe_dir)
        sizes.append(path.stat().st_size)
    bound = sizes[1] + sizes[2] + sizes[0] // 2

    directory = tmp_path / "bounded"
    args = launcher_args(tiny_pair, "plain", directory, "--prompt-cache-disk-bytes", str(bound))
    launcher = launcher_factory.ready(*args)
    for count, chat in enumerate(chats, start=1):
        ask(launcher, chat)
        wait_saved(launcher, count)
        time.sleep(0.05)  # distinct modification times, even on a coarse clock
    assert sorted(path.stat().st_size for path in entries(directory)) == sorted(sizes[1:])
    assert disk_stats(launcher)["stores"][0]["evicted"] == 1

    launcher = restart(launcher_factory, launcher)
    assert restored(ask(launcher, chats[2])) > 0
    got = ask(launcher, chats[0])
    assert restored(got) == 0
    assert_greedy(reference, got, chats[0])


DAMAGE = {
    "flipped byte": lambda data: data[:-100] + bytes([data[-100] ^ 0x40]) + data[-99:],
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"\x00" * 64,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_ignored_with_a_warning_and_deleted(
    launcher_factory: LauncherFactory,
    tiny_pair: TinyPair,
    reference: Reference,
    tmp_path: Path,
    damage: str,
) -> None:
    chat = messages("What is the capital of France?")
    launcher = launcher_factory.ready(*launcher_args(tiny_pair, "draft", tmp_path))
    ask(launcher, chat)
    wait_saved(launcher, 1)
    launcher.stop()
    (path,) = entries(tmp_path)
    path.write_bytes(DAMAGE[damage](path.read_bytes()))

    launcher = launcher_factory.ready(*launcher.args)
    got = ask(launcher, chat)
    assert restored(got) == 0
    assert got.cached_tokens == 0
    assert_greedy(reference, got, chat)
    assert f"prompt cache on disk: deleting {path.name}" in launcher.stderr()
    assert disk_stats(launcher)["stores"][0]["discarded"] == 1
    # The request's own prompt was saved again in its place.
    wait_saved(launcher, 1)
    assert read_header(path).length == len(reference.prompt_tokens("chat", chat))


def test_a_cache_of_another_model_or_settings_is_never_used(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, reference: Reference, tmp_path: Path
) -> None:
    chat = messages("Tell me a story about a robot who learns to paint.")
    speculative = launcher_factory.ready(*launcher_args(tiny_pair, "draft", tmp_path))
    ask(speculative, chat)
    wait_saved(speculative, 1)
    speculative.stop()
    (foreign,) = entries(tmp_path)

    # Same main model, other settings: no draft (its KV list is shorter), bfloat16 (other values).
    for variant, extra in (("plain", ()), ("draft", ("--dtype", "bfloat16"))):
        launcher = launcher_factory.ready(*launcher_args(tiny_pair, variant, tmp_path, *extra))
        got = ask(launcher, chat)
        assert restored(got) == 0, variant
        assert got.cached_tokens == 0, variant
        wait_saved(launcher, 1)
        launcher.stop()
    identities = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(identities) == 3

    # A file moved into another identity's directory is refused by its header, and deleted.
    plain_dir = next(d for d in identities if d != foreign.parent and "float32" in (d / "identity.json").read_text())
    for path in plain_dir.glob(f"*{SUFFIX}"):
        path.unlink()
    moved = plain_dir / foreign.name
    shutil.copy(foreign, moved)
    launcher = launcher_factory.ready(*launcher_args(tiny_pair, "plain", tmp_path))
    got = ask(launcher, chat)
    assert restored(got) == 0
    assert got.cached_tokens == 0
    assert_greedy(reference, got, chat)
    assert f"prompt cache on disk: deleting {moved.name}: it belongs to identity" in launcher.stderr()


def test_identity_records_what_it_hashes(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, tmp_path: Path
) -> None:
    launcher = launcher_factory.ready(*launcher_args(tiny_pair, "draft", tmp_path))
    ask(launcher, messages("hello"))
    wait_saved(launcher, 1)
    (directory,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    note = json.loads((directory / "identity.json").read_text())
    assert note["model"]["path"] == str(tiny_pair.main.resolve())
    assert note["draft"]["path"] == str(tiny_pair.draft.resolve())
    assert note["dtype"] == "float32"
    assert note["blas"]
    assert note["mlx"]
    assert note["mlx_lm"]


@pytest.fixture
def two_launchers(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, tmp_path: Path
) -> Iterator[list[LauncherProcess]]:
    launchers = [launcher_factory.start(*launcher_args(tiny_pair, "draft", tmp_path)) for _ in range(2)]
    for launcher in launchers:
        launcher.wait_ready()
    yield launchers
    for launcher in launchers:
        launcher.stop()


def test_two_backends_of_one_model_share_the_directory(
    two_launchers: list[LauncherProcess], reference: Reference, tmp_path: Path
) -> None:
    one, two = two_launchers
    chat = messages("Tell me a story about a robot")
    ask(one, chat)
    wait_saved(one, 1)
    got = ask(two, chat)
    assert restored(got) == len(reference.prompt_tokens("chat", chat)) - 1
    assert_greedy(reference, got, chat)
    assert len(entries(tmp_path)) == 1


# --------------------------------------------------------------------------------------------------
# The benchmark command, at a tiny scale
# --------------------------------------------------------------------------------------------------


def test_bench_prompt_cache_measures_cold_memory_and_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.bench.prompt_cache import PromptCacheConfig, run_prompt_cache, text_report
    from app.testing.tiny_model import TinyModelSpec, write_model

    # OpenCode's system prompt is ~6,000 tokens of the tiny tokenizer: a model with room for it.
    model = write_model(tmp_path / "long-context", TinyModelSpec(max_position_embeddings=16384))
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "bench.toml").write_text(f'[profiles."tiny"]\nmodel = "{model}"\n')
    monkeypatch.setenv("SPECGATE_MODEL_STORE", str(tmp_path / "store"))
    config = PromptCacheConfig(profile="tiny", profiles_dir=profiles, max_tokens=8, timeout=120.0, cold_check=True)

    result = run_prompt_cache(config, lambda line: None)

    phases = {phase.name: phase for phase in result.phases}
    assert list(phases) == ["cold", "memory", "disk", "cold-check"]
    assert phases["cold"].sample.cached_tokens == 0
    shared = phases["memory"].sample.cached_tokens
    assert shared > 0.9 * phases["memory"].sample.prompt_tokens
    assert phases["memory"].disk_tokens == 0
    assert phases["disk"].disk_tokens == phases["disk"].sample.cached_tokens == shared
    assert phases["cold-check"].sample.cached_tokens == 0
    assert result.equal_outputs() == {"memory = disk": True, "cold-check = memory": True, "cold-check = disk": True}
    assert result.ratio() is not None
    # The backend's own figures: the cold turn's save (copy and write timed), the restore.
    cold_disk, disk_disk = phases["cold"].disk or {}, phases["disk"].disk or {}
    assert cold_disk["saved"] == 1
    assert cold_disk["last_save_pause_seconds"] is not None
    assert disk_disk["restored_tokens"] == shared
    report = text_report(result)
    assert "disk / cold time to first token" in report
    assert f"restored {shared} tokens from disk" in report


def test_nothing_is_written_with_quantized_kv_or_for_an_entry_over_the_bound(
    launcher_factory: LauncherFactory, tiny_pair: TinyPair, tmp_path: Path
) -> None:
    chat = messages("Tell me a story about a robot")
    quantized = launcher_factory.ready(*launcher_args(tiny_pair, "plain", tmp_path / "quantized", "--kv-bits", "8"))
    ask(quantized, chat)
    assert "prompt caches stay in memory only" in quantized.stderr()
    assert "prompt_cache_disk" not in httpx.get(quantized.base_url + "/specgate/stats", timeout=5.0).json()
    assert not (tmp_path / "quantized").exists()

    bound = ("--prompt-cache-disk-bytes", "1000")
    small = launcher_factory.ready(*launcher_args(tiny_pair, "plain", tmp_path / "small", *bound))
    ask(small, chat)
    wait_for(lambda: "over the bound; not saved" in small.stderr(), 30.0, "the save to be refused")
    assert entries(tmp_path / "small") == []
    assert disk_stats(small)["stores"][0]["evicted"] == 0
