"""What clients send wrong: one table, each case a precise 4xx in the OpenAI error shape, none of them
disturbing a good request running at the same time. Real gateway, real launcher on the tiny model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TinyPair
from tests.harness import GatewayProcess, chat, running_gateway

MODEL = "base"
LIMIT = 64 * 1024  # SPECGATE_MAX_BODY_BYTES for this gateway
CONTEXT = 256  # the profile's context_length


@pytest.fixture(scope="module")
def gateway(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    profiles = (
        f'[profiles."{MODEL}"]\nmodel = "{tiny_pair.main}"\ncontext_length = {CONTEXT}\n'
        "max_output_tokens = 12\nmax_queue = 64\nsampling = { temperature = 0.0 }\n"
    )
    env = {"SPECGATE_MAX_BODY_BYTES": str(LIMIT)}
    with running_gateway(tmp_path_factory.mktemp("bad-input"), profiles, env) as running:
        yield running


def good(**extra: Any) -> dict[str, Any]:
    return {**chat("The quick brown fox", MODEL, max_tokens=12), **extra}


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def with_messages(messages: Any) -> bytes:
    return raw({"model": MODEL, "messages": messages})


def image(url: str) -> bytes:
    part = {"type": "image_url", "image_url": {"url": url}}
    return with_messages([{"role": "user", "content": [{"type": "text", "text": "what is this"}, part]}])


def chunked(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


LONG_PROMPT = "alpha beta gamma delta " * 200  # ~800 tokens, over the 256-token context, under the body limit

# (id, path, body, expected status, expected param or None, a fragment of the message, error code or None)
CASES: list[tuple[str, str, Any, int, str | None, str, str | None]] = [
    ("invalid-json", "chat", b'{"model": "base", "messages": [', 400, None, "invalid JSON", None),
    ("empty-body", "chat", b"", 400, None, "empty", None),
    ("not-an-object", "chat", b"[1, 2, 3]", 400, None, "JSON object", None),
    ("not-utf8", "chat", b'{"model": "base", "x": "\xff\xfe"}', 400, None, "UTF-8", None),
    ("nan-literal", "chat", b'{"model": "base", "messages": [], "temperature": NaN}', 400, None, "NaN", None),
    ("too-deep", "chat", b"[" * 100_000 + b"]" * 100_000, 413, None, "over the limit", "request_too_large"),
    ("model-missing", "chat", raw({"messages": [{"role": "user", "content": "hi"}]}), 400, "model", "required", None),
    ("model-wrong-type", "chat", raw(good(model=5)), 400, "model", "string", None),
    ("model-unknown", "chat", raw(good(model="no/such")), 404, "model", "does not exist", "model_not_found"),
    ("messages-missing", "chat", raw({"model": MODEL}), 400, "messages", "required", None),
    ("messages-empty", "chat", with_messages([]), 400, "messages", "at least one", None),
    ("messages-not-list", "chat", with_messages("hi"), 400, "messages", "list", None),
    ("message-not-object", "chat", with_messages(["hi"]), 400, "messages", "object", None),
    ("unknown-role", "chat", with_messages([{"role": "wizard", "content": "hi"}]), 400, "messages", "role", None),
    ("content-wrong-type", "chat", with_messages([{"role": "user", "content": 5}]), 400, "messages", "content", None),
    ("content-missing", "chat", with_messages([{"role": "user"}]), 400, "messages", "content", None),
    ("stream-not-bool", "chat", raw(good(stream="yes")), 400, "stream", "boolean", None),
    ("stream-options-type", "chat", raw(good(stream=True, stream_options=1)), 400, "stream_options", "object", None),
    ("max-tokens-negative", "chat", raw(good(max_tokens=-1)), 400, "max_tokens", "at least 1", None),
    ("max-tokens-zero", "chat", raw(good(max_tokens=0)), 400, "max_tokens", "at least 1", None),
    ("max-tokens-string", "chat", raw(good(max_tokens="10")), 400, "max_tokens", "integer", None),
    ("max-tokens-float", "chat", raw(good(max_tokens=1.5)), 400, "max_tokens", "integer", None),
    ("temperature-string", "chat", raw(good(temperature="hot")), 400, "temperature", "number", None),
    ("top-p-range", "chat", raw(good(top_p=3)), 400, "top_p", "between", None),
    ("n-two", "chat", raw(good(n=2)), 400, "n", "1", None),
    ("stop-wrong", "chat", raw(good(stop=[1, 2])), 400, "stop", "string", None),
    ("draft-k-range", "chat", raw(good(num_draft_tokens=1000)), 400, "num_draft_tokens", "between", None),
    (
        "lone-surrogate",
        "chat",
        b'{"model": "base", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        400,
        None,
        "surrogate",
        None,
    ),
    (
        "lone-surrogate-key",
        "chat",
        b'{"model": "base", "\\udc00": 1, "messages": [{"role": "user", "content": "a"}]}',
        400,
        None,
        "surrogate",
        None,
    ),
    ("image-http", "chat", image("http://169.254.169.254/latest/meta-data/"), 400, "messages", "data:", None),
    ("image-https", "chat", image("https://example.com/cat.png"), 400, "messages", "data:", None),
    ("image-file", "chat", image("file:///etc/passwd"), 400, "messages", "data:", None),
    (
        "audio-part",
        "chat",
        with_messages([{"role": "user", "content": [{"type": "input_audio"}]}]),
        400,
        "messages",
        "not supported",
        None,
    ),
    ("body-over-limit", "chat", raw(good(padding="x" * (LIMIT + 10))), 413, None, "limit", "request_too_large"),
    (
        "chunked-over-limit",
        "chat",
        ("chunked", raw(good(padding="x" * (LIMIT + 10)))),
        413,
        None,
        "limit",
        "request_too_large",
    ),
    (
        "prompt-over-context",
        "chat",
        raw(chat(LONG_PROMPT, MODEL)),
        400,
        "messages",
        "context",
        "context_length_exceeded",
    ),
    (
        "text-prompt-over-context",
        "completion",
        raw({"model": MODEL, "prompt": LONG_PROMPT}),
        400,
        "prompt",
        "context",
        "context_length_exceeded",
    ),
    # A negative seed used to crash mlx_lm.server's request (mx.random.seed wants uint64; found by the fuzz test).
    ("seed-negative", "chat", raw(good(seed=-1)), 400, "seed", "between", None),
    ("unhashable-role", "chat", with_messages([{"role": {}, "content": "hi"}]), 400, "messages", "role", None),
    # An empty prompt used to reach mlx_lm.server and kill its generation thread (found by the fuzz test).
    ("text-prompt-empty", "completion", raw({"model": MODEL, "prompt": ""}), 400, "prompt", "empty", None),
    ("text-prompt-missing", "completion", raw({"model": MODEL}), 400, "prompt", "required", None),
    ("text-prompt-tokens", "completion", raw({"model": MODEL, "prompt": [1, 2, 3]}), 400, "prompt", "string", None),
]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def send(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if isinstance(body, tuple):  # a chunked upload: no Content-Length, the limit is enforced while reading
        return client.post(PATHS[path], content=chunked(body[1]), headers=headers)
    return client.post(PATHS[path], content=body, headers=headers)


def test_bad_input_table_with_a_concurrent_good_request(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        reference = client.post("/v1/chat/completions", json=good())
        assert reference.status_code == 200, reference.text
        expected = reference.json()["choices"][0]["message"]["content"]

        stop = threading.Event()
        seen: list[str] = []
        failures: list[str] = []

        def keep_asking() -> None:
            # At least one request, whenever the thread gets to run: on a loaded machine the table can be
            # done before this thread starts, and a `while not stop` loop then sent nothing at all.
            with gateway.client() as other:
                while True:
                    reply = other.post("/v1/chat/completions", json=good())
                    if reply.status_code != 200:
                        failures.append(reply.text)
                    else:
                        seen.append(reply.json()["choices"][0]["message"]["content"])
                    if stop.is_set():
                        break

        worker = threading.Thread(target=keep_asking)
        worker.start()
        problems: list[str] = []
        try:
            for case_id, path, body, status, param, fragment, code in CASES:
                reply = send(client, path, body)
                try:
                    error = reply.json()["error"]
                except (ValueError, KeyError, TypeError):
                    problems.append(f"{case_id}: {reply.status_code} not OpenAI-shaped: {reply.text[:200]}")
                    continue
                if reply.status_code != status:
                    problems.append(f"{case_id}: status {reply.status_code}, expected {status}: {error}")
                elif set(error) != {"message", "type", "param", "code"}:
                    problems.append(f"{case_id}: error keys {sorted(error)}")
                elif param is not None and error["param"] != param:
                    problems.append(f"{case_id}: param {error['param']!r}, expected {param!r}")
                elif fragment.lower() not in error["message"].lower():
                    problems.append(f"{case_id}: message {error['message']!r} lacks {fragment!r}")
                elif code is not None and error["code"] != code:
                    problems.append(f"{case_id}: code {error['code']!r}, expected {code!r}")
                elif error["type"] not in ("invalid_request_error",):
                    problems.append(f"{case_id}: type {error['type']!r}")
        finally:
            stop.set()
            worker.join(60)
        assert not problems, "\n".join(problems)
        assert not failures, failures[:3]
        assert seen, "the concurrent good request never completed"
        assert all(text == expected for text in seen), "a bad request disturbed a concurrent good one"


def test_huge_max_tokens_is_clamped_to_the_profile_limit(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        for huge in (10**6, 2**62, 10**30):
            reply = client.post("/v1/chat/completions", json=good(max_tokens=huge))
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] <= 12


def test_accepted_edge_cases(gateway: GatewayProcess) -> None:
    """Valid but unusual: unicode of every kind, unknown fields, chunked uploads, data: images pass validation."""
    with gateway.client() as client:
        for text in ("emoji 😀👩‍👩‍👧 and flags 🇫🇷", "RTL مرحبا עברית", "nul \u0000 byte", "zero\u200bwidth", "e\u0301"):
            reply = client.post("/v1/chat/completions", json=chat(text, MODEL, max_tokens=4))
            assert reply.status_code == 200, (text, reply.text)
        # top_k over the vocabulary means "no top-k"; sent as such it used to kill the backend's generation thread.
        pid = gateway.backend_pid(MODEL)
        for top_k in (10**6, 512):
            reply = client.post("/v1/chat/completions", json=good(top_k=top_k, temperature=1.0, seed=3))
            assert reply.status_code == 200, reply.text
        assert gateway.backend_pid(MODEL) == pid
        unknown = client.post("/v1/chat/completions", json=good(some_future_field={"nested": [1, 2]}, user="u-1"))
        assert unknown.status_code == 200, unknown.text
        body = raw(good())
        reply = client.post("/v1/chat/completions", content=chunked(body), headers={"content-type": "application/json"})
        assert reply.status_code == 200, reply.text
        # A data: URL is never fetched, so the gateway does not refuse it as a forgery risk: it reaches the
        # backend, whose text-only model refuses it while generating (mlx_lm.server 0.32.2 answers 404 then,
        # with its reason, which quotes no fetched address): a 400 carrying the backend's reason.
        data = send(client, "chat", image("data:image/png;base64,iVBORw0KGgo="))
        assert data.status_code == 400, data.text
        assert "Only 'text' content type is supported" in data.json()["error"]["message"], data.text
        assert gateway.backend_pid(MODEL) == pid


def test_load_fields_in_the_body_change_nothing(gateway: GatewayProcess, tmp_path: Path) -> None:
    with gateway.client() as client:
        plain = client.post("/v1/chat/completions", json=good())
        pid = gateway.backend_pid(MODEL)
        smuggled = client.post(
            "/v1/chat/completions",
            json=good(draft_model=str(tmp_path), adapters=str(tmp_path / "adapter"), model=MODEL),
        )
        assert smuggled.status_code == 200, smuggled.text
        assert smuggled.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
        assert gateway.backend_pid(MODEL) == pid
        assert gateway.models()[MODEL]["draft_model"] is None
