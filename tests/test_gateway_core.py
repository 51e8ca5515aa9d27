"""The gateway core against real backends (specgate's launcher over mlx_lm.server) on tiny models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.server import PortUnavailable, bind_with_fallback
from app.testing.tiny_model import write_pair
from tests.harness import (
    FAKE_BACKEND,
    PYTHON,
    ROOT,
    GatewayProcess,
    chat,
    pid_alive,
    read_sse,
    running_gateway,
    stream_text,
    toml_list,
    wait_for,
)

BACKEND_COMMAND = os.environ.get("SPECGATE_TEST_BACKEND_COMMAND")


def profile(name: str, model: Path | str, draft: Path | str | None = None, k: int | None = None, **fields: Any) -> str:
    lines = [f'[profiles."{name}"]', f'model = "{model}"']
    if draft is not None:
        lines.append(f'draft_model = "{draft}"')
    if k is not None:
        lines.append(f"num_draft_tokens = {k}")
    for key, value in fields.items():
        lines.append(
            f"{key} = {json.dumps(value) if not isinstance(value, str) or not value.startswith('{') else value}"
        )
    if BACKEND_COMMAND and "backend" not in fields:
        lines.append(f"backend = {{ command = {toml_list(BACKEND_COMMAND.split())} }}")
    return "\n".join(lines) + "\n\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("tiny"), noise=0.02)


@pytest.fixture(scope="module")
def spec_gateway(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three presets sharing one speculative backend, and the baseline twin."""
    main, draft = pair
    profiles = (
        profile("speculative/tiny-fast", main, draft, 3, sampling="{ temperature = 0.0 }")
        + profile("speculative/tiny-balanced", main, draft, 5, sampling="{ temperature = 0.0 }")
        + profile("speculative/tiny-max", main, draft, 7, sampling="{ temperature = 0.0 }")
        + profile("baseline/tiny", main, sampling="{ temperature = 0.0 }")
    )
    with running_gateway(tmp_path_factory.mktemp("gw"), profiles, {"SPECGATE_MAX_BACKENDS": "2"}) as gateway:
        yield gateway


PROMPTS = ["hello", "What is the capital of France?", "Write a function that adds two numbers.", "def fib(n):"]


def _chat_text(client: httpx.Client, model: str, content: str, max_tokens: int = 48) -> tuple[str, int]:
    reply = client.post("/v1/chat/completions", json=chat(content, model, max_tokens=max_tokens))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def test_speculative_greedy_equals_baseline(spec_gateway: GatewayProcess) -> None:
    with spec_gateway.client() as client:
        for content in PROMPTS:
            expected = _chat_text(client, "baseline/tiny", content)
            for preset in ("speculative/tiny-fast", "speculative/tiny-balanced", "speculative/tiny-max"):
                assert _chat_text(client, preset, content) == expected, (preset, content)
            # Repeated requests hit the prompt cache; the answer must not change.
            assert _chat_text(client, "speculative/tiny-balanced", content) == expected


def test_speculative_equals_baseline_for_text_completions_streamed(spec_gateway: GatewayProcess) -> None:
    with spec_gateway.client() as client:
        texts = {}
        for model in ("baseline/tiny", "speculative/tiny-max"):
            body = {"model": model, "prompt": "def add(a, b):", "max_tokens": 40, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as reply:
                assert reply.status_code == 200
                texts[model] = stream_text(list(read_sse(reply)))
        assert texts["baseline/tiny"] == texts["speculative/tiny-max"]
        assert texts["baseline/tiny"]


def test_presets_share_one_backend_process(spec_gateway: GatewayProcess) -> None:
    with spec_gateway.client() as client:
        for preset in ("speculative/tiny-fast", "speculative/tiny-balanced", "speculative/tiny-max"):
            assert client.post("/v1/chat/completions", json=chat("hi", preset, max_tokens=2)).status_code == 200
    models = spec_gateway.models()
    pids = {models[name]["backend"]["pid"] for name in models if name.startswith("speculative/")}
    assert len(pids) == 1
    assert None not in pids
    assert models["baseline/tiny"]["backend"]["pid"] not in pids
    assert set(models["speculative/tiny-fast"]["backend"]["shared_with"]) == {
        "speculative/tiny-balanced",
        "speculative/tiny-max",
    }


def test_models_list_is_openai_shaped_with_state(spec_gateway: GatewayProcess) -> None:
    listing = httpx.get(f"{spec_gateway.url}/v1/models").json()
    assert listing["object"] == "list"
    entry = next(item for item in listing["data"] if item["id"] == "speculative/tiny-max")
    assert entry["object"] == "model"
    assert entry["num_draft_tokens"] == 7
    assert entry["state"] in {"stopped", "ready"}
    single = httpx.get(f"{spec_gateway.url}/v1/models/speculative/tiny-max").json()
    assert single["id"] == "speculative/tiny-max"


def test_streaming_usage_only_when_asked_and_model_name_echoed(spec_gateway: GatewayProcess) -> None:
    with spec_gateway.client() as client:
        for include in (False, True):
            body = chat("hello", "speculative/tiny-fast", max_tokens=8, stream=True)
            if include:
                body["stream_options"] = {"include_usage": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                events = list(read_sse(reply))
            assert events[-1][1] == "[DONE]"
            chunks = [e for _, e in events if isinstance(e, dict)]
            usage = [c for c in chunks if c.get("usage")]
            assert len(usage) == (1 if include else 0)
            assert all(c["model"] == "speculative/tiny-fast" for c in chunks)
            assert all("specgate" not in c for c in chunks)
            # The role comes once, in the first delta, as OpenAI sends it.
            roles = [c["choices"][0]["delta"].get("role") for c in chunks if c.get("choices")]
            assert roles[0] == "assistant"
            assert all(role is None for role in roles[1:])


def test_load_fields_in_the_body_never_reach_the_backend(spec_gateway: GatewayProcess, tmp_path: Path) -> None:
    bogus = str(tmp_path / "not-a-model")
    with spec_gateway.client() as client:
        expected = _chat_text(client, "baseline/tiny", "hello", 16)
        body = chat("hello", "speculative/tiny-balanced", max_tokens=16, draft_model=bogus, adapters=bogus)
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected[0]


def test_system_prompt_injected_only_when_client_sent_none(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    prompts = tmp_path / "profiles" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "terse.txt").write_text("Answer in one short sentence.")
    profiles = (
        profile("plain", main)
        + profile("inline", main, system_prompt="Be brief.")
        + profile("from-file", main, system_prompt_file="terse.txt")
    )
    with running_gateway(tmp_path, profiles) as gateway, gateway.client() as client:

        def prompt_tokens(model: str, messages: list[dict[str, str]]) -> int:
            body = {"model": model, "messages": messages, "max_tokens": 1}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            return int(reply.json()["usage"]["prompt_tokens"])

        user = [{"role": "user", "content": "hello"}]
        plain = prompt_tokens("plain", user)
        assert prompt_tokens("inline", user) > plain
        assert prompt_tokens("from-file", user) > prompt_tokens("inline", user)
        with_system = [{"role": "system", "content": "x"}, *user]
        assert prompt_tokens("inline", with_system) == prompt_tokens("plain", with_system)


def test_errors_are_openai_shaped(spec_gateway: GatewayProcess) -> None:
    with spec_gateway.client() as client:
        unknown = client.post("/v1/chat/completions", json=chat("hi", "no/such-model"))
        assert unknown.status_code == 404
        error = unknown.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "baseline/tiny" in error["message"]
        assert error["code"] == "model_not_found"

        bad_json = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 400
        assert "invalid JSON" in bad_json.json()["error"]["message"]

        missing = client.post("/v1/chat/completions", json={"model": "baseline/tiny"})
        assert missing.status_code == 400
        assert missing.json()["error"]["param"] == "messages"

        route = client.get("/v1/nothing-here")
        assert route.status_code == 404
        assert route.json()["error"]["type"] == "not_found_error"


def test_backend_failing_to_start_gives_503_with_reason(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen2"}')  # present, but no weights
    profiles = profile("broken", broken) + profile("good", main)
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        reply = client.post("/v1/chat/completions", json=chat("hi", "broken", max_tokens=2))
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "backend_start_failed"
        assert "broken" in error["message"]
        # It carries the backend's own reason (mlx_lm's error for a directory without weights), not just "failed".
        assert "No safetensors found" in error["message"], error["message"]
        # The gateway stays up and serves other profiles.
        assert client.post("/v1/chat/completions", json=chat("hi", "good", max_tokens=2)).status_code == 200
        assert gateway.models()["broken"]["state"] == "failed"


def test_missing_model_is_listed_and_refused_clearly(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    profiles = profile("absent", tmp_path / "nowhere") + profile("good", main)
    with running_gateway(tmp_path / "gw", profiles) as gateway, gateway.client() as client:
        entry = gateway.models()["absent"]
        assert entry["state"] == "not_present"
        assert "does not exist" in entry["detail"]
        reply = client.post("/v1/chat/completions", json=chat("hi", "absent"))
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "model_not_present"


def test_killed_backend_restarts_on_next_request(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, draft = pair
    with running_gateway(tmp_path, profile("spec", main, draft, 4)) as gateway, gateway.client() as client:
        first = client.post("/v1/chat/completions", json=chat("hello", "spec", max_tokens=16))
        assert first.status_code == 200
        pid = gateway.backend_pid("spec")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gateway.models()["spec"]["state"] == "failed", 10, "the gateway to notice the crash")
        again = client.post("/v1/chat/completions", json=chat("hello", "spec", max_tokens=16))
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
        entry = gateway.models()["spec"]
        assert entry["backend"]["pid"] not in (None, pid)
        assert entry["backend"]["restarts"] == 1


def test_idle_backend_unloads_after_ttl(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    # 3 s idle: at 1 s a loaded machine sometimes unloaded it before the test read its pid.
    with running_gateway(tmp_path, profile("short", main, ttl=3)) as gateway, gateway.client() as client:
        assert client.post("/v1/chat/completions", json=chat("hi", "short", max_tokens=2)).status_code == 200
        pid = gateway.backend_pid("short")
        assert pid is not None
        wait_for(lambda: gateway.models()["short"]["state"] == "stopped", 20, "idle unload")
        wait_for(lambda: not pid_alive(pid), 5, "the backend process to exit")
        # And it comes back on demand.
        assert client.post("/v1/chat/completions", json=chat("hi", "short", max_tokens=2)).status_code == 200


def test_lru_eviction_at_the_backend_cap(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, draft = pair
    profiles = profile("a", main) + profile("b", draft) + profile("c", main, draft, 3)
    env = {"SPECGATE_MAX_BACKENDS": "2"}
    with running_gateway(tmp_path, profiles, env) as gateway, gateway.client() as client:
        for name in ("a", "b"):
            assert client.post("/v1/chat/completions", json=chat("hi", name, max_tokens=2)).status_code == 200
        # Touch "a" again, so "b" is the least recently used.
        assert client.post("/v1/chat/completions", json=chat("hi", "a", max_tokens=2)).status_code == 200
        pid_b = gateway.backend_pid("b")
        assert client.post("/v1/chat/completions", json=chat("hi", "c", max_tokens=2)).status_code == 200
        states = {name: entry["state"] for name, entry in gateway.models().items()}
        assert states == {"a": "ready", "b": "stopped", "c": "ready"}
        assert pid_b is not None
        assert not pid_alive(pid_b)


def test_serving_backend_is_never_evicted(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    slow = {"backend": "{ command = " + toml_list([*FAKE_BACKEND, "--token-delay", "0.05"]) + " }"}
    profiles = profile("slow", "fake-a", **slow) + profile("other", main)
    (tmp_path / "fake-a").mkdir()
    (tmp_path / "fake-a" / "config.json").write_text("{}")
    profiles = profiles.replace('model = "fake-a"', f'model = "{tmp_path / "fake-a"}"')
    env = {"SPECGATE_MAX_BACKENDS": "1"}
    with running_gateway(tmp_path / "gw", profiles, env) as gateway, gateway.client() as client:
        body = chat("one two three", "slow", max_tokens=40, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = read_sse(reply)
            next(events)  # generation is under way
            started = time.monotonic()
            with httpx.Client(base_url=gateway.url, timeout=60) as second:
                other = second.post("/v1/chat/completions", json=chat("hi", "other", max_tokens=2))
            waited = time.monotonic() - started
            rest = list(events)
        assert other.status_code == 200
        assert rest[-1][1] == "[DONE]"  # the slow stream completed: it was not evicted
        assert waited > 0.5  # "other" waited for the serving backend to finish


def test_no_backend_survives_a_sigkilled_gateway(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, draft = pair
    profiles = profile("spec", main, draft, 3) + profile("base", main)
    gateway = GatewayProcess(tmp_path, profiles).start()
    try:
        with gateway.client() as client:
            for name in ("spec", "base"):
                assert client.post("/v1/chat/completions", json=chat("hi", name, max_tokens=2)).status_code == 200
        pids = [gateway.backend_pid(name) for name in ("spec", "base")]
        assert all(pid is not None and pid_alive(pid) for pid in pids)
        gateway.signal(signal.SIGKILL)
        for pid in pids:
            assert pid is not None
            wait_for(lambda pid=pid: not pid_alive(pid), 10, f"backend {pid} to die with the gateway")
    finally:
        gateway.stop()


def test_no_backend_survives_sigterm(pair: tuple[Path, Path], tmp_path: Path) -> None:
    main, _ = pair
    gateway = GatewayProcess(tmp_path, profile("base", main)).start()
    with gateway.client() as client:
        assert client.post("/v1/chat/completions", json=chat("hi", "base", max_tokens=2)).status_code == 200
    pid = gateway.backend_pid("base")
    assert pid is not None
    gateway.signal(signal.SIGTERM)
    assert gateway.process is not None
    # uvicorn re-raises the signal after a clean shutdown, as servers conventionally exit.
    assert gateway.process.wait(timeout=20) in (0, -signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 5, "the backend to stop with the gateway")


def test_port_fallback_and_clear_error_when_both_taken() -> None:
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        first.listen()
        second.bind(("127.0.0.1", 0))
        second.listen()
        taken_a, taken_b = first.getsockname()[1], second.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        sock = bind_with_fallback("127.0.0.1", taken_a, free)
        assert sock.getsockname()[1] == free
        sock.close()
        with pytest.raises(PortUnavailable, match="both in use"):
            bind_with_fallback("127.0.0.1", taken_a, taken_b)
        with pytest.raises(PortUnavailable, match="already in use"):
            bind_with_fallback("127.0.0.1", taken_a, None)


def test_serve_with_an_explicit_taken_port_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[profiles.x]\nmodel = "/nowhere"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PYTHON, "-m", "app.cli", "serve", "--port", str(port), "--profiles-dir", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_profile_file_fails_at_start_naming_file_profile_field(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[profiles."spec/x"]\nmodel = "/m"\nnum_draft_tokens = "five"\n')
    result = subprocess.run(
        [PYTHON, "-m", "app.cli", "serve", "--port", "0", "--profiles-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "bad.toml" in result.stderr
    assert "spec/x" in result.stderr
    assert "num_draft_tokens" in result.stderr
    assert "Traceback" not in result.stderr
