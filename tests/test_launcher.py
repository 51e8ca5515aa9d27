"""The backend launcher (app/launcher), tested as real `python -m app.launcher` processes.

Ground truth is computed in this process with mlx_lm's own `stream_generate` on the same tiny models:
speculative figures from the target model's forward passes (one per verification round, carrying
`drafted + 1` tokens) and the `from_draft` flags; exactness against plain greedy decoding.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LauncherFactory, LauncherProcess, TinyPair

PREFILL_STEP_SIZE = 2048  # mlx_lm.server's default, which the launchers run with


# --------------------------------------------------------------------------------------------------
# Ground truth, in process
# --------------------------------------------------------------------------------------------------


class _RecordingModel:
    """The target model, logging the size of each forward pass into a shared event list."""

    def __init__(self, model: Any, events: list[tuple[str, Any]]) -> None:
        self._model = model
        self._events = events

    def __call__(self, inputs: Any, cache: Any = None) -> Any:
        self._events.append(("forward", int(inputs.shape[1])))
        return self._model(inputs, cache=cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass
class Run:
    """One in-process generation: tokens, text, and (with a draft) its verification rounds."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    from_draft: list[bool] = field(default_factory=list)
    # (tokens drafted, flags of the tokens the round yielded), one per verification pass.
    rounds: list[tuple[int, list[bool]]] = field(default_factory=list)

    def figures(self, k: int) -> dict[str, Any]:
        drafted = [d for d, _ in self.rounds]
        accepted = [_leading_true(flags) for _, flags in self.rounds]
        return {
            "num_drafts": sum(d > 0 for d in drafted),
            "num_draft_tokens": sum(drafted),
            "num_accepted_tokens": sum(self.from_draft),
            "drafted_per_position": [sum(d > i for d in drafted) for i in range(k)],
            "accepted_per_position": [sum(a > i for a in accepted) for i in range(k)],
        }


def _leading_true(flags: list[bool]) -> int:
    count = 0
    for flag in flags:
        if not flag:
            break
        count += 1
    return count


class Reference:
    """The tiny pair loaded in this process, used the way mlx_lm.server uses it."""

    def __init__(self, pair: TinyPair) -> None:
        from mlx_lm import load

        loaded: tuple[Any, ...] = load(str(pair.main))
        self.model, self.tokenizer = loaded[0], loaded[1]
        self.draft: Any = load(str(pair.draft))[0]

    def prompt_tokens(self, endpoint: str, prompt: Any) -> list[int]:
        if endpoint == "chat":
            tokens = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tools=None, tokenize=True)
            return list(tokens)
        return list(self.tokenizer.encode(prompt))

    def greedy(self, tokens: list[int], max_tokens: int) -> Run:
        return self._run(tokens, max_tokens, draft=False, k=0)

    def speculative(self, tokens: list[int], max_tokens: int, k: int, stop_token: int | None = None) -> Run:
        return self._run(tokens, max_tokens, draft=True, k=k, stop_token=stop_token)

    def _run(self, tokens: list[int], max_tokens: int, draft: bool, k: int, stop_token: int | None = None) -> Run:
        from mlx_lm import stream_generate

        events: list[tuple[str, Any]] = []
        extra: dict[str, Any] = {"draft_model": self.draft, "num_draft_tokens": k} if draft else {}
        run = Run()
        for response in stream_generate(
            _RecordingModel(self.model, events),
            self.tokenizer,
            tokens,
            max_tokens=max_tokens,
            prefill_step_size=PREFILL_STEP_SIZE,
            **extra,
        ):
            events.append(("token", response.from_draft))
            run.tokens.append(response.token)
            run.text += response.text
            run.from_draft.append(response.from_draft)
            if response.token == stop_token:  # as mlx_lm.server's stop-sequence matcher does
                break
        if draft:
            run.rounds = _rounds(events, prefill=len(tokens) - 1)
            assert sum(_leading_true(f) for _, f in run.rounds) == sum(run.from_draft)
        return run


def _rounds(events: list[tuple[str, Any]], prefill: int) -> list[tuple[int, list[bool]]]:
    """Split the event log into verification rounds: the prompt's forward passes come first."""
    rounds: list[tuple[int, list[bool]]] = []
    for kind, value in events:
        if kind == "forward" and prefill > 0:
            prefill -= value
        elif kind == "forward":
            rounds.append((value - 1, []))
        else:
            rounds[-1][1].append(value)
    return rounds


@pytest.fixture(scope="module")
def reference(tiny_pair: TinyPair) -> Reference:
    return Reference(tiny_pair)


# --------------------------------------------------------------------------------------------------
# Launchers and HTTP
# --------------------------------------------------------------------------------------------------


@dataclass
class Backends:
    spec: LauncherProcess  # main + draft, k=3 by default
    plain: LauncherProcess  # main only: the batch generator path
    bf16: LauncherProcess  # main + draft, --dtype bfloat16
    unfixed_spec: LauncherProcess  # --no-cache-fixes: the bugs, for the canary tests
    unfixed_plain: LauncherProcess


@pytest.fixture(scope="module")
def backends(launcher_factory: LauncherFactory, tiny_pair: TinyPair) -> Backends:
    main, draft = str(tiny_pair.main), str(tiny_pair.draft)
    with_draft = ("--model", main, "--draft-model", draft, "--num-draft-tokens", "3")
    # Start all, then wait: their start-ups overlap.
    started = Backends(
        spec=launcher_factory.start(*with_draft),
        plain=launcher_factory.start("--model", main),
        bf16=launcher_factory.start(*with_draft, "--dtype", "bfloat16"),
        unfixed_spec=launcher_factory.start(*with_draft, "--no-cache-fixes"),
        unfixed_plain=launcher_factory.start("--model", main, "--no-cache-fixes"),
    )
    for launcher in vars(started).values():
        launcher.wait_ready()
    return started


@dataclass
class Completion:
    text: str
    token_ids: list[int] | None  # only non-streaming responses carry them (through logprobs)
    usage: dict[str, Any]
    specgate: dict[str, Any]
    seconds: float

    @property
    def cached_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))


def body_for(endpoint: str, prompt: Any, max_tokens: int, k: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "default_model", "max_tokens": max_tokens, "temperature": 0.0}
    body["messages" if endpoint == "chat" else "prompt"] = prompt
    if k is not None:
        body["num_draft_tokens"] = k
    return body


def complete(
    backend: LauncherProcess,
    endpoint: str,
    body: dict[str, Any],
    stream: bool = False,
    request_id: str | None = None,
) -> Completion:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {**body, "stream": stream}
    started = time.perf_counter()
    if stream:
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", backend.base_url + path, json=body, headers=headers, timeout=30.0) as response:
            assert response.status_code == 200, response.read()
            return _from_stream(endpoint, list(_sse(response.iter_lines())), started)
    response = httpx.post(backend.base_url + path, json={**body, "logprobs": True}, headers=headers, timeout=30.0)
    assert response.status_code == 200, response.text
    payload = response.json()
    choice = payload["choices"][0]
    text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    ids = [entry["id"] for entry in choice["logprobs"]["content"]]
    return Completion(text or "", ids, payload["usage"], payload["specgate"], time.perf_counter() - started)


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def _from_stream(endpoint: str, events: list[dict[str, Any] | str], started: float) -> Completion:
    assert events[-1] == "[DONE]"
    chunks = [event for event in events[:-1] if isinstance(event, dict)]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert "usage" in usage_chunk
    assert all("specgate" not in chunk for chunk in chunks[:-1]), "only the usage chunk carries the figures"
    text = ""
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        text += (choice["delta"].get("content") or "") if endpoint == "chat" else choice["text"]
    return Completion(text, None, usage_chunk["usage"], usage_chunk["specgate"], time.perf_counter() - started)


def stats(backend: LauncherProcess) -> dict[str, Any]:
    response = httpx.get(backend.base_url + "/specgate/stats", timeout=5.0)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def assert_healthy(backend: LauncherProcess) -> None:
    assert httpx.get(backend.base_url + "/health", timeout=5.0).status_code == 200
    assert backend.process is not None
    assert backend.process.poll() is None


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------------------------------
# Per-request speculative figures
# --------------------------------------------------------------------------------------------------

FIGURE_CASES = [
    # endpoint, stream, k, prompt, max_tokens
    ("text", False, 1, "The quick brown fox jumps", 40),
    ("text", True, 3, "def fibonacci(n):", 33),
    ("chat", False, 5, chat("Tell me a story about a robot"), 41),
    ("chat", True, 1, chat("What is the capital of France?"), 25),
    ("text", True, 5, "import os\nimport sys", 7),  # 7 = 5 + 2: the last round drafts 1 or 2
    ("chat", False, 3, chat("Hello! How can I help"), 2),
    ("text", False, 5, "Numbers 0 1 2 3 4", 1),  # one round, one drafted token
    ("text", True, 0, "Hello! How", 10),  # k=0: rounds without drafted tokens do not count
]


@pytest.mark.parametrize(("endpoint", "stream", "k", "prompt", "max_tokens"), FIGURE_CASES)
def test_speculative_figures_equal_ground_truth(
    backends: Backends, reference: Reference, endpoint: str, stream: bool, k: int, prompt: Any, max_tokens: int
) -> None:
    request_id = f"figures-{endpoint}-{stream}-{k}-{max_tokens}"
    got = complete(backends.spec, endpoint, body_for(endpoint, prompt, max_tokens, k), stream, request_id)
    tokens = reference.prompt_tokens(endpoint, prompt)
    truth = reference.speculative(tokens, max_tokens, k)

    assert got.text == truth.text
    if got.token_ids is not None:
        assert got.token_ids == truth.tokens
    figures = got.specgate
    assert {key: figures[key] for key in truth.figures(k)} == truth.figures(k)
    assert figures["request_id"] == request_id
    assert figures["prompt_tokens"] == len(tokens) == got.usage["prompt_tokens"]
    assert figures["generation_tokens"] == len(truth.tokens) == got.usage["completion_tokens"]
    assert figures["cached_tokens"] == got.cached_tokens
    assert figures["prompt_seconds"] > 0
    assert figures["generation_seconds"] >= 0
    assert figures["prompt_seconds"] + figures["generation_seconds"] <= got.seconds
    if max_tokens >= 20:
        # The tiny pair must exercise both verdicts, or this test would not show much.
        assert 0 < figures["num_accepted_tokens"] < figures["num_draft_tokens"]


def test_stop_word_cuts_a_round_short(backends: Backends, reference: Reference) -> None:
    prompt, k = "Tell me a story about a robot", 4
    tokens = reference.prompt_tokens("text", prompt)
    full = reference.speculative(tokens, 40, k)
    # A stop token that the draft proposed and the target accepted, not the last of its round, and
    # a single token on its own: the server stops right there, in the middle of a round.
    position = next(
        i
        for i, token in enumerate(full.tokens)
        if i >= 3
        and full.from_draft[i]
        and full.from_draft[i + 1]
        and token not in full.tokens[:i]
        and reference.tokenizer.encode(reference.tokenizer.decode([token]), add_special_tokens=False) == [token]
    )
    stop_token = full.tokens[position]
    truth = reference.speculative(tokens, 40, k, stop_token=stop_token)
    assert len(truth.tokens) == position + 1
    last_drafted, last_flags = truth.rounds[-1]
    assert last_drafted > len(last_flags), "the last round should be cut short"
    body = {**body_for("text", prompt, 40, k), "stop": [reference.tokenizer.decode([stop_token])]}
    got = complete(backends.spec, "text", body)
    assert got.token_ids == truth.tokens
    assert {key: got.specgate[key] for key in truth.figures(k)} == truth.figures(k)


def test_concurrent_requests_get_their_own_figures(backends: Backends, reference: Reference) -> None:
    cases = [(f"concurrent-{i}", prompt, k, 10 + 7 * i) for i, (prompt, k) in enumerate(CONCURRENT)]

    def one(case: tuple[str, str, int, int]) -> Completion:
        request_id, prompt, k, max_tokens = case
        return complete(backends.spec, "text", body_for("text", prompt, max_tokens, k), True, request_id)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(one, cases, timeout=60))
    for (request_id, prompt, k, max_tokens), got in zip(cases, results, strict=True):
        truth = reference.speculative(reference.prompt_tokens("text", prompt), max_tokens, k)
        assert got.specgate["request_id"] == request_id
        assert got.text == truth.text
        assert {key: got.specgate[key] for key in truth.figures(k)} == truth.figures(k)


CONCURRENT = [("What is the capital", 2), ("def main():", 4), ("Hello! How can", 1), ("class Robot:", 3)]


def test_concurrent_batched_requests_get_their_own_figures(backends: Backends) -> None:
    # Without a draft the batch generator serves these together, interleaving their tokens.
    def one(max_tokens: int) -> Completion:
        body = body_for("text", f"batched request {max_tokens}", max_tokens)
        return complete(backends.plain, "text", body, True, f"batched-{max_tokens}")

    sizes = [5, 40, 80, 20]
    with ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(one, sizes, timeout=60))
    for max_tokens, got in zip(sizes, results, strict=True):
        assert got.specgate["request_id"] == f"batched-{max_tokens}"
        assert got.specgate["generation_tokens"] == max_tokens == got.usage["completion_tokens"]
        assert got.specgate["prompt_seconds"] + got.specgate["generation_seconds"] <= got.seconds


def test_server_default_k_is_used_when_the_request_has_none(backends: Backends, reference: Reference) -> None:
    prompt = "for i in range(10):"
    got = complete(backends.spec, "text", body_for("text", prompt, 30))
    truth = reference.speculative(reference.prompt_tokens("text", prompt), 30, k=3)  # --num-draft-tokens 3
    assert got.token_ids == truth.tokens
    assert {key: got.specgate[key] for key in truth.figures(3)} == truth.figures(3)


def test_backend_without_draft_reports_timings_and_zero_figures(backends: Backends) -> None:
    for stream in (False, True):
        got = complete(backends.plain, "chat", body_for("chat", chat("hello"), 12), stream, "plain-1")
        figures = got.specgate
        assert figures["request_id"] == "plain-1"
        assert (figures["num_drafts"], figures["num_draft_tokens"], figures["num_accepted_tokens"]) == (0, 0, 0)
        assert figures["drafted_per_position"] == figures["accepted_per_position"] == []
        assert figures["generation_tokens"] == 12
        assert figures["prompt_seconds"] > 0
        assert figures["generation_seconds"] > 0
        assert figures["prompt_seconds"] + figures["generation_seconds"] <= got.seconds


def test_request_without_id_reports_null(backends: Backends) -> None:
    got = complete(backends.spec, "text", body_for("text", "Paris.", 3), stream=True)
    assert got.specgate["request_id"] is None


# --------------------------------------------------------------------------------------------------
# Exactness with the prompt cache on (bugs B1 and B2)
# --------------------------------------------------------------------------------------------------


def _assert_greedy(reference: Reference, got: Completion, tokens: list[int], max_tokens: int) -> None:
    assert got.token_ids == reference.greedy(tokens, max_tokens).tokens


def test_repeated_prompts_are_exact(backends: Backends, reference: Reference) -> None:
    for endpoint, prompt in [
        ("text", "Speculative decoding drafts tokens"),
        ("text", "class Example:\n    def __init__(self"),
        ("chat", chat("Tell me a story about a robot who learns to paint.")),
    ]:
        tokens = reference.prompt_tokens(endpoint, prompt)
        for k in (3, 1, 5, 3):
            got = complete(backends.spec, endpoint, body_for(endpoint, prompt, 24, k))
            _assert_greedy(reference, got, tokens, 24)
    assert_healthy(backends.spec)


def test_exact_prompt_cache_hit_with_draft(backends: Backends, reference: Reference) -> None:
    prompt = "An exact hit: this prompt is stored as it is"
    tokens = reference.prompt_tokens("text", prompt)
    # One token with a draft leaves target and draft caches at the prompt's length: the (trimmed)
    # entry is stored under exactly the prompt, so the next identical prompt is an exact hit.
    complete(backends.spec, "text", body_for("text", prompt, 1))
    got = complete(backends.spec, "text", body_for("text", prompt, 20))
    assert got.cached_tokens == len(tokens) - 1  # the hit, less the one token fed again
    _assert_greedy(reference, got, tokens, 20)
    assert_healthy(backends.spec)


def test_growing_multi_turn_chat_is_exact(backends: Backends, reference: Reference) -> None:
    messages = chat("Hello! How can I help you today?")
    for turn, follow_up in enumerate(["Tell me more.", "What is the capital of France?", "Continue."]):
        tokens = reference.prompt_tokens("chat", messages)
        got = complete(backends.spec, "chat", body_for("chat", messages, 20, k=1 + turn))
        _assert_greedy(reference, got, tokens, 20)
        if turn > 0:
            assert got.cached_tokens > 0, "the earlier turns should come from the prompt cache"
        messages = [*messages, {"role": "assistant", "content": got.text}, {"role": "user", "content": follow_up}]
    assert_healthy(backends.spec)


# Prompts whose greedy continuations re-tokenize to themselves: "prompt + completion" then gives
# exactly the tokens under which the backend without a draft stored its cache (an exact hit, B2).
CONTINUE_PROMPTS = ["The quick brown fox", "Hello! How can I help you today?", "import os", "Numbers 0 1 2 3"]


@pytest.mark.parametrize("which", ["spec", "plain"])
def test_continue_requests_are_exact(backends: Backends, reference: Reference, which: str) -> None:
    backend: LauncherProcess = getattr(backends, which)
    exact_hits = 0
    for prompt in CONTINUE_PROMPTS:
        text = prompt
        for _ in range(3):
            tokens = reference.prompt_tokens("text", text)
            got = complete(backend, "text", body_for("text", text, 8, k=3))
            _assert_greedy(reference, got, tokens, 8)
            exact_hits += got.cached_tokens == len(tokens) - 1
            text += got.text
    if which == "plain":
        assert exact_hits > 0, "no continue request was an exact prompt-cache hit: B2 went untested"
    complete(backend, "text", body_for("text", "still serving", 4))
    assert_healthy(backend)


# --------------------------------------------------------------------------------------------------
# Canaries: mlx-lm 0.32.2 without the fixes. If these fail after an mlx-lm upgrade, the bugs may be
# fixed upstream: re-check the reference notes and whether the fixes are still needed.
# --------------------------------------------------------------------------------------------------


def test_without_fixes_b1_changes_answers(backends: Backends, reference: Reference) -> None:
    differing = 0
    for prompt in ["An exact hit: this prompt is stored as it is", *CONTINUE_PROMPTS]:
        tokens = reference.prompt_tokens("text", prompt)
        complete(backends.unfixed_spec, "text", body_for("text", prompt, 1))
        got = complete(backends.unfixed_spec, "text", body_for("text", prompt, 20))
        differing += got.token_ids != reference.greedy(tokens, 20).tokens
    assert differing > 0


def test_without_fixes_b2_kills_the_backend_without_draft(backends: Backends, reference: Reference) -> None:
    backend = backends.unfixed_plain
    prompt = CONTINUE_PROMPTS[0]
    first = complete(backend, "text", body_for("text", prompt, 8))
    with pytest.raises((AssertionError, httpx.HTTPError, ValueError)):
        complete(backend, "text", body_for("text", prompt + first.text, 8))
    wait_until(lambda: httpx.get(backend.base_url + "/health", timeout=5.0).status_code == 503, 10.0, "503")


# --------------------------------------------------------------------------------------------------
# Load event, dtype, counters, logging
# --------------------------------------------------------------------------------------------------


def _events(backend: LauncherProcess) -> list[dict[str, Any]]:
    prefix = "SPECGATE_EVENT "
    return [json.loads(line[len(prefix) :]) for line in backend.stdout().splitlines() if line.startswith(prefix)]


def test_load_event_is_printed_once(backends: Backends) -> None:
    for backend in (backends.spec, backends.plain):
        (event,) = [event for event in _events(backend) if event["event"] == "loaded"]
        assert isinstance(event["load_seconds"], float)
        assert 0 <= event["load_seconds"] < 60


def test_dtype_default_is_float32_and_flag_casts(backends: Backends) -> None:
    assert stats(backends.spec)["model_dtype"] == stats(backends.spec)["draft_dtype"] == "float32"
    assert stats(backends.plain)["draft_dtype"] is None
    casted = stats(backends.bf16)
    assert casted["model_dtype"] == casted["draft_dtype"] == "bfloat16"
    assert "model dtype bfloat16, draft dtype bfloat16" in backends.bf16.stderr()
    got = complete(backends.bf16, "text", body_for("text", "The quick brown fox", 10))
    assert got.specgate["generation_tokens"] == 10
    assert got.specgate["num_drafts"] > 0


def test_exactness_tests_run_on_the_blas_users_get(backends: Backends) -> None:
    """The equality tests in this file compare outputs of these backends: they must run on the fast BLAS."""
    from app.blas import find_mkl, plan

    if plan("auto").library is None:
        pytest.skip("no fast BLAS on this machine (README: pip install mkl, or apt-get install libopenblas0-pthread)")
    expected = plan("auto").library
    for backend in (backends.spec, backends.plain):
        (event,) = [event for event in _events(backend) if event["event"] == "blas"]
        if find_mkl() is not None:
            assert event["summary"].startswith("mkl "), event
        # Which library serves cblas_sgemm, not how fast it ran: the timed probe reads a loaded machine's
        # speed (under a load of 10 on 2 cores MKL's 512^3 matmul fell below the "fast" line once).
        assert Path(event["library"]).resolve() == Path(expected).resolve(), event
        assert event["warning"] is None or "slow BLAS" in event["warning"], event


def test_load_failure_exits(launcher_factory: LauncherFactory, tmp_path: Any) -> None:
    launcher = launcher_factory.start("--model", str(tmp_path / "no-such-model"))
    assert launcher.process is not None
    assert launcher.process.wait(timeout=60) != 0
    # The BLAS is checked before loading; nothing may claim the model loaded.
    assert [event["event"] for event in _events(launcher)] == ["blas"]


def test_stats_count_requests_and_tokens(backends: Backends) -> None:
    for backend in (backends.spec, backends.plain):
        before = stats(backend)
        complete(backend, "text", body_for("text", "count these tokens", 17))
        after = stats(backend)
        assert after["requests_started"] == before["requests_started"] + 1
        assert after["requests_finished"] == before["requests_finished"] + 1
        assert after["tokens_generated"] == before["tokens_generated"] + 17
        assert after["active_requests"] == 0


@pytest.mark.parametrize("which", ["spec", "plain"])
def test_client_disconnect_stops_generation(backends: Backends, which: str) -> None:
    backend: LauncherProcess = getattr(backends, which)
    before = stats(backend)
    max_tokens = 4000
    body = {**body_for("text", "A long story begins", max_tokens), "stream": True}
    with httpx.stream("POST", backend.base_url + "/v1/completions", json=body, timeout=30.0) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["choices"]
    # Stopped: the handler is gone and no token is generated over a quiet interval.
    wait_until(lambda: stats(backend)["active_requests"] == 0, 10.0, "the handler to finish")
    settled = wait_until(_settled(backend), 10.0, "generation to stop")
    generated = settled["tokens_generated"] - before["tokens_generated"]
    assert 0 < generated < max_tokens // 4
    assert settled["requests_finished"] == before["requests_finished"] + 1


def _settled(backend: LauncherProcess) -> Any:
    def check() -> dict[str, Any] | None:
        first = stats(backend)
        time.sleep(0.3)
        second = stats(backend)
        return second if second["tokens_generated"] == first["tokens_generated"] else None

    return check


def test_request_id_is_logged_once_without_prompt_text(backends: Backends) -> None:
    complete(backends.spec, "text", body_for("text", "zebra quartz marker", 5), request_id="log-id-7f3a")

    def logged() -> list[str]:
        return [line for line in backends.spec.stderr().splitlines() if "log-id-7f3a" in line]

    (line,) = wait_until(logged, 5.0, "the request log line")
    assert "specgate request log-id-7f3a /v1/completions done: 5 tokens" in line
    assert "zebra" not in backends.spec.stderr()
