"""Prompt-lookup (n-gram) drafting: the proposer, the launcher (`--prompt-lookup`) and the gateway profile.

Ground truth is independent of the launcher's generator: the greedy token sequence comes from mlx-lm's
own plain decoding in this process, and the per-request figures from replaying the proposer over that
known sequence (what it would propose at each round, how much of it the greedy text confirms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.launcher.lookup import LookupSettings, propose
from app.profiles import PROMPT_LOOKUP, ProfileError, parse_profiles
from tests.conftest import LauncherFactory, LauncherProcess, TinyPair
from tests.harness import running_gateway
from tests.test_launcher import Reference, body_for, complete

MIN_NGRAM, MAX_NGRAM = 1, 3
SETTINGS = LookupSettings(MIN_NGRAM, MAX_NGRAM)


# --------------------------------------------------------------------------------------------------
# The proposer
# --------------------------------------------------------------------------------------------------


def test_propose_copies_what_followed_the_latest_longest_match() -> None:
    settings = LookupSettings(1, 3)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7]
    # Suffix (6, 7) occurs at 1..2 and 6..7; 3-gram (2, 6, 7) nowhere: the latest 2-gram wins.
    assert propose(tokens, 3, settings) == [1, 2, 6]
    assert propose(tokens, 1, settings) == [1]
    # Longest n first: the 3-gram (5, 6, 7) beats a later 1-gram match of 7.
    assert propose([5, 6, 7, 8, 9, 7, 3, 5, 6, 7], 2, settings) == [8, 9]


def test_propose_respects_sizes_and_k() -> None:
    assert propose([1, 2, 3, 4], 3, LookupSettings(1, 3)) == []  # no earlier occurrence
    assert propose([1, 2, 3, 1], 3, LookupSettings(1, 3)) == [2, 3, 1]  # continuation may run to the end
    assert propose([1, 2, 3, 1], 3, LookupSettings(2, 3)) == []  # a 1-gram is below min_ngram
    assert propose([1, 2, 3, 1, 2], 0, LookupSettings(1, 3)) == []
    assert propose([7, 7, 7, 7], 2, LookupSettings(1, 3)) == [7]  # latest 3-gram match at 0..2: one token left
    assert propose([], 2, LookupSettings(1, 3)) == []
    with pytest.raises(ValueError, match="min_ngram"):
        LookupSettings(3, 2)
    with pytest.raises(ValueError, match="min_ngram"):
        LookupSettings(0, 2)


def _naive_propose(tokens: list[int], k: int, settings: LookupSettings) -> list[int]:
    for n in range(settings.max_ngram, settings.min_ngram - 1, -1):
        if len(tokens) < n + 1:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_propose_equals_a_naive_search() -> None:
    import random

    rng = random.Random(7)
    for _ in range(400):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        settings = LookupSettings(rng.randint(1, 3), rng.randint(3, 5))
        k = rng.randint(0, 6)
        assert propose(tokens, k, settings) == _naive_propose(tokens, k, settings), (tokens, k, settings)


# --------------------------------------------------------------------------------------------------
# Ground truth: replay the proposer over the greedy sequence
# --------------------------------------------------------------------------------------------------


def simulate(prompt: list[int], output: list[int], k: int, max_tokens: int) -> dict[str, Any]:
    """The figures a lookup request must report, given its prompt and its (greedy) output tokens."""
    history = list(prompt)
    produced = 0
    rounds: list[tuple[int, int]] = []  # (drafted, accepted) per verification pass
    while produced < len(output):
        drafted = propose(history, min(k, max_tokens - produced), SETTINGS)
        accepted = 0
        while accepted < len(drafted) and produced + accepted < len(output):
            if drafted[accepted] != output[produced + accepted]:
                break
            accepted += 1
        taken = min(accepted + 1, len(output) - produced)
        rounds.append((len(drafted), accepted))
        history += output[produced : produced + taken]
        produced += taken
    return {
        "num_drafts": sum(d > 0 for d, _ in rounds),
        "num_draft_tokens": sum(d for d, _ in rounds),
        "num_accepted_tokens": sum(a for _, a in rounds),
        "drafted_per_position": [sum(d > i for d, _ in rounds) for i in range(k)],
        "accepted_per_position": [sum(a > i for _, a in rounds) for i in range(k)],
    }


FIGURES = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "drafted_per_position", "accepted_per_position")


def figures(specgate: dict[str, Any]) -> dict[str, Any]:
    return {name: specgate[name] for name in FIGURES}


@pytest.fixture(scope="module")
def reference(tiny_pair: TinyPair) -> Reference:
    return Reference(tiny_pair)


@pytest.fixture(scope="module")
def lookup_backend(launcher_factory: LauncherFactory, tiny_pair: TinyPair) -> LauncherProcess:
    return launcher_factory.ready(
        "--model",
        str(tiny_pair.main),
        "--prompt-lookup",
        "--lookup-min-ngram",
        str(MIN_NGRAM),
        "--lookup-max-ngram",
        str(MAX_NGRAM),
        "--num-draft-tokens",
        "4",
    )


# Repetitive prompts: lookup has something to copy (the tiny model's greedy text loops as well).
TEXT_PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "one two three four one two three four one two",
]
CHAT_PROMPT = [{"role": "user", "content": "repeat: alpha beta gamma delta alpha beta gamma delta"}]


def _expected(
    reference: Reference, endpoint: str, prompt: Any, max_tokens: int, k: int
) -> tuple[list[int], dict[str, Any]]:
    tokens = reference.prompt_tokens(endpoint, prompt)
    greedy = reference.greedy(tokens, max_tokens)
    return greedy.tokens, simulate(tokens, greedy.tokens, k, max_tokens) | {"text": greedy.text}


@pytest.mark.parametrize("endpoint", ["text", "chat"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("k", [2, 5])
def test_greedy_output_and_figures_equal_ground_truth(
    lookup_backend: LauncherProcess, reference: Reference, endpoint: str, stream: bool, k: int
) -> None:
    prompts: list[Any] = TEXT_PROMPTS if endpoint == "text" else [CHAT_PROMPT]
    for prompt in prompts:
        tokens, expected = _expected(reference, endpoint, prompt, 24, k)
        # Twice: the second is served from the prompt cache.
        for _ in range(2):
            result = complete(lookup_backend, endpoint, body_for(endpoint, prompt, 24, k), stream=stream)
            assert result.text == expected["text"]
            if result.token_ids is not None:
                assert result.token_ids == tokens
            assert figures(result.specgate) == {name: expected[name] for name in FIGURES}
            assert result.specgate["generation_tokens"] == len(tokens)


def test_k0_decodes_plainly(lookup_backend: LauncherProcess, reference: Reference) -> None:
    prompt = TEXT_PROMPTS[0]
    tokens, _ = _expected(reference, "text", prompt, 16, 0)
    result = complete(lookup_backend, "text", body_for("text", prompt, 16, 0))
    assert result.token_ids == tokens
    assert figures(result.specgate) == {
        "num_drafts": 0,
        "num_draft_tokens": 0,
        "num_accepted_tokens": 0,
        "drafted_per_position": [],
        "accepted_per_position": [],
    }


def test_growing_conversation_and_continue_requests(lookup_backend: LauncherProcess, reference: Reference) -> None:
    """Multi-turn chat on a growing history, then text `continue` requests (prompt + its completion)."""
    messages: list[dict[str, str]] = []
    for turn in ["alpha beta alpha beta", "gamma alpha beta gamma", "alpha beta gamma alpha"]:
        messages.append({"role": "user", "content": turn})
        tokens, expected = _expected(reference, "chat", messages, 12, 3)
        result = complete(lookup_backend, "chat", body_for("chat", messages, 12, 3))
        assert result.token_ids == tokens
        assert figures(result.specgate) == {name: expected[name] for name in FIGURES}
        messages.append({"role": "assistant", "content": result.text})
    prompt = TEXT_PROMPTS[1]
    for _ in range(3):
        tokens, expected = _expected(reference, "text", prompt, 10, 4)
        result = complete(lookup_backend, "text", body_for("text", prompt, 10, 4))
        assert result.token_ids == tokens
        assert figures(result.specgate) == {name: expected[name] for name in FIGURES}
        assert result.cached_tokens > 0
        prompt += result.text


def test_bad_launcher_settings_fail_clearly(launcher_factory: LauncherFactory, tiny_pair: TinyPair) -> None:
    launcher = launcher_factory.start(
        "--model", str(tiny_pair.main), "--prompt-lookup", "--lookup-min-ngram", "4", "--lookup-max-ngram", "2"
    )
    assert launcher.process is not None
    assert launcher.process.wait(timeout=60) != 0
    assert "min_ngram" in launcher.stderr()


# --------------------------------------------------------------------------------------------------
# Profiles and the gateway
# --------------------------------------------------------------------------------------------------


def test_profile_settings_and_errors() -> None:
    text = """
[profiles."lookup"]
model = "/models/main"
draft_model = "prompt-lookup"
num_draft_tokens = 6
prompt_lookup = { min_ngram = 1, max_ngram = 5 }

[profiles."lookup-defaults"]
model = "/models/main"
draft_model = "prompt-lookup"
"""
    lookup, defaults = parse_profiles(text, "p.toml")
    assert lookup.is_speculative
    assert not lookup.uses_draft_weights
    assert lookup.draft_model == PROMPT_LOOKUP
    assert lookup.backend_spec.prompt_lookup is not None
    assert (lookup.backend_spec.prompt_lookup.min_ngram, lookup.backend_spec.prompt_lookup.max_ngram) == (1, 5)
    assert defaults.backend_spec.prompt_lookup is not None
    assert lookup.backend_spec != defaults.backend_spec  # different settings: different processes
    bad = {
        "prompt_lookup = { min_ngram = 4, max_ngram = 2 }": "min_ngram",
        "prompt_lookup = { min_ngram = 0 }": "min_ngram",
        "prompt_lookup = { max_ngram = 99 }": "max_ngram",
        "prompt_lookup = { window = 3 }": "window",
    }
    for line, field in bad.items():
        with pytest.raises(ProfileError) as caught:
            parse_profiles(f'[profiles."x"]\nmodel = "/m"\ndraft_model = "prompt-lookup"\n{line}\n', "bad.toml")
        message = str(caught.value)
        assert all(part in message for part in ("bad.toml", "'x'", field)), message
    with pytest.raises(ProfileError) as caught:
        parse_profiles('[profiles."y"]\nmodel = "/m"\nprompt_lookup = { min_ngram = 1 }\n', "bad.toml")
    assert "prompt_lookup" in str(caught.value)
    assert "'y'" in str(caught.value)


def test_default_profiles_have_the_lookup_variant() -> None:
    from app.profiles import load_profiles

    profiles = load_profiles(Path(__file__).resolve().parent.parent / "profiles")
    profile = profiles.get("speculative/qwen2.5-coder-1.5b-lookup")
    assert profile is not None
    assert profile.draft_model == PROMPT_LOOKUP
    assert profile.model == "catalog:qwen2.5-coder-1.5b-instruct"


def test_gateway_lookup_profile(tmp_path: Path, tiny_pair: TinyPair, reference: Reference) -> None:
    """A real gateway: no draft directory needed, greedy output equal, figures in responses and /metrics."""
    profiles = f"""
[profiles."lookup"]
model = "{tiny_pair.main}"
draft_model = "prompt-lookup"
num_draft_tokens = 4
prompt_lookup = {{ min_ngram = {MIN_NGRAM}, max_ngram = {MAX_NGRAM} }}

[profiles."lookup-auto"]
model = "{tiny_pair.main}"
draft_model = "prompt-lookup"
num_draft_tokens = "auto"
prompt_lookup = {{ min_ngram = {MIN_NGRAM}, max_ngram = {MAX_NGRAM} }}
"""
    prompt = TEXT_PROMPTS[0]
    _, expected = _expected(reference, "text", prompt, 20, 4)
    with running_gateway(tmp_path, profiles) as gateway, gateway.client() as client:
        totals = 0
        for stream in (False, True, False):
            body = {"model": "lookup", "prompt": prompt, "max_tokens": 20, "temperature": 0.0, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
                text, usage = _stream(client, body)
            else:
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                payload = response.json()
                text, usage = payload["choices"][0]["text"], payload
            assert text == expected["text"]
            spec = usage["metrics"]["speculative_decoding"]
            assert spec["num_spec_steps"] == expected["num_drafts"]
            assert spec["num_draft_tokens"] == expected["num_draft_tokens"]
            assert spec["num_accepted_draft_tokens"] == expected["num_accepted_tokens"]
            assert spec["acceptance_histogram"] == expected["accepted_per_position"]
            totals += spec["num_accepted_draft_tokens"]
        metrics = client.get("/metrics").text
        accepted = [
            line for line in metrics.splitlines() if line.startswith("specgate_spec_decode_num_accepted_tokens_total{")
        ]
        assert any('profile="lookup"' in line and line.endswith(f" {float(totals)}") for line in accepted), accepted
        # k = 0 per request: plain decoding through the same backend.
        response = client.post(
            "/v1/completions",
            json={"model": "lookup", "prompt": prompt, "max_tokens": 20, "temperature": 0.0, "num_draft_tokens": 0},
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected["text"]
        assert response.json()["metrics"]["speculative_decoding"]["num_draft_tokens"] == 0
        # `auto` on the same backend process: whatever k the planner picks, the output stays greedy and
        # the figures stay those of a lookup run with that k.
        models = gateway.models()
        assert models["lookup"]["backend"]["name"] == models["lookup-auto"]["backend"]["name"]
        # The estimator belongs to the backend, so the `lookup` requests above (k = 4, and k = 0) already
        # fed it: which k it picks next depends on measured timings (a noisy cost can restart its model,
        # sending it back to warm-up). What must hold whatever the timings: every choice carries its reason,
        # a warm-up measures plain decoding or the warm-up length, and the estimator learns from each request.
        from app.adaptive.estimator import WARMUP_K

        before = _adaptive(client, "lookup-auto")["observations"]
        for _ in range(4):
            body = {"model": "lookup-auto", "prompt": prompt, "max_tokens": 20, "temperature": 0.0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            payload = response.json()
            assert payload["choices"][0]["text"] == expected["text"]
            spec = payload["metrics"]["speculative_decoding"]
            k = spec["num_speculative_tokens"]
            reason = spec["num_speculative_tokens_reason"]
            assert reason in ("warmup", "model", "probe"), spec
            if reason == "warmup":
                assert k in (0, WARMUP_K), spec
            truth = _expected(reference, "text", prompt, 20, k)[1]
            assert spec["num_draft_tokens"] == truth["num_draft_tokens"]
            assert spec["num_accepted_draft_tokens"] == truth["num_accepted_tokens"]
        assert _adaptive(client, "lookup-auto")["observations"] == before + 4


def _adaptive(client: httpx.Client, profile: str) -> dict[str, Any]:
    """The planner's estimates for an `auto` profile, as the status page shows them."""
    profiles = client.get("/status.json").json()["profiles"]
    return next(p["adaptive"] for p in profiles if p["name"] == profile)


def _stream(client: httpx.Client, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    import json

    text, usage = "", None
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("choices"):
                text += chunk["choices"][0].get("text") or ""
            if chunk.get("usage") is not None:
                usage = chunk
    assert usage is not None
    return text, usage


def test_editing_prompt_set() -> None:
    from app.bench.prompts import load_prompt_set

    prompts = load_prompt_set("editing").prompts
    assert len(prompts) >= 3
    for prompt in prompts:
        assert prompt.id.startswith("editing/")
        content = prompt.messages[-1]["content"]
        code = content.split("```", 1)[1]
        assert 30 <= code.count("\n") <= 80, prompt.id
        assert "whole file" in content
