"""Fields mlx_lm.server reads (issue 19, items 1, 2, 3, 5, 11, 12): each hostile value is a 400 naming the
field, and the backends it would have broken keep serving, unrestarted.

Real gateway, real launchers on the tiny pair: one backend on mlx_lm's batch generator (`max_concurrency`
4, where a bad value used to kill the generation thread and then the process) and one speculative backend.
Before these checks every payload class below crashed, disabled or restarted a backend, reached an internal
URL, or gave a 500.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from app.backends.connections import BackendEndpoint
from app.errors import InvalidRequest
from app.proxy.relay import map_backend_status
from tests.conftest import TinyPair
from tests.harness import GatewayProcess, chat, fake_profile, running_gateway
from tests.test_metrics import scrape

BATCH = "batch"  # mlx_lm's batch generator, context_length 256 from the profile
SPEC = "spec"  # with a draft model; its context is the model's max_position_embeddings, 4096
PROFILES = (BATCH, SPEC)
CONTEXT = {BATCH: 256, SPEC: 4096}
VOCAB = 512  # the tiny models' vocabulary (config.json vocab_size)
MAX_TOKENS = 8
JSON = {"content-type": "application/json"}
COMPLETIONS = "/v1/completions"


@dataclass(frozen=True)
class Case:
    """One hostile request: the body for a profile, the `param` the 400 must name, a fragment of its message."""

    id: str
    body: Callable[[str], bytes]
    param: str | None
    fragment: str
    profiles: tuple[str, ...] = PROFILES
    path: str = "/v1/chat/completions"


def good(profile: str, **extra: Any) -> dict[str, Any]:
    return {**chat("The quick brown fox", profile, max_tokens=MAX_TOKENS), **extra}


def fields(**extra: Any) -> Callable[[str], bytes]:
    return lambda profile: json.dumps(good(profile, **extra)).encode()


def text_fields(**extra: Any) -> Callable[[str], bytes]:
    """A text completion (`/v1/completions`) with `extra`."""
    return lambda profile: json.dumps({"model": profile, "prompt": "The quick", "max_tokens": 4, **extra}).encode()


def raw(text: bytes) -> Callable[[str], bytes]:
    """A body written out by hand (what json.dumps cannot write): MODEL stands for the profile."""
    return lambda profile: text.replace(b"MODEL", profile.encode())


def parts(*content: Any) -> Callable[[str], bytes]:
    return fields(messages=[{"role": "user", "content": [{"type": "text", "text": "look"}, *content]}])


def nested(depth: int) -> Callable[[str], bytes]:
    """A body whose field `x` holds `depth` arrays inside one another."""
    return raw(
        b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


TARGET = "http://TARGET/internal"  # replaced by the address of a listener that counts connections

CLASSES: dict[str, list[Case]] = {
    # Item 1: the backend fetches http(s) URLs from these shapes too; only text and data: image_url pass.
    "content-parts": [
        Case("input-image", parts({"type": "input_image", "image_url": TARGET}), "messages", "not supported"),
        Case(
            "input-image-object",
            parts({"type": "input_image", "image_url": {"url": TARGET}}),
            "messages",
            "not supported",
        ),
        Case("image", parts({"type": "image", "image": TARGET}), "messages", "not supported"),
        Case("image-object", parts({"type": "image", "image": {"url": TARGET}}), "messages", "not supported"),
        Case("image-url-under-image", parts({"type": "image_url", "image": TARGET}), "messages", "data:"),
        Case("image-url-object", parts({"type": "image_url", "image_url": {"url": TARGET}}), "messages", "data:"),
        Case(
            "image-url-https",
            parts({"type": "image_url", "image_url": TARGET.replace("http", "https")}),
            "messages",
            "data:",
        ),
        Case("input-text", parts({"type": "input_text", "text": "hi"}), "messages", "not supported"),
        Case("no-type", parts({"text": "hi"}), "messages", "type"),
        Case("type-not-string", parts({"type": ["image"], "image": TARGET}), "messages", "type"),
    ],
    # Item 2 (and 12): logit_bias keys against the vocabulary, values numbers in [-100, 100].
    "logit-bias": [
        Case("id-far-out", fields(logit_bias={"100000000": 5}), "logit_bias", "vocabulary"),
        Case("id-just-past", fields(logit_bias={str(VOCAB): 5}), "logit_bias", "vocabulary"),
        Case("id-negative", fields(logit_bias={"-1": 5}), "logit_bias", "token id"),
        Case("id-spaces", fields(logit_bias={" 7": 5}), "logit_bias", "token id"),
        Case("id-arabic-digit", fields(logit_bias={"\u0663": 5}), "logit_bias", "token id"),
        Case("id-word", fields(logit_bias={"hello": 5}), "logit_bias", "token id"),
        Case("too-many", fields(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
        Case("not-object", fields(logit_bias=[1, 2]), "logit_bias", "object"),
        Case("value-null", fields(logit_bias={"1": None}), "logit_bias", "null"),
        Case("value-list", fields(logit_bias={"1": [1]}), "logit_bias", "array"),
        Case("value-string", fields(logit_bias={"1": "5"}), "logit_bias", "string"),
        Case("value-bool", fields(logit_bias={"1": True}), "logit_bias", "boolean"),
        Case("value-over", fields(logit_bias={"1": 100.5}), "logit_bias", "-100 to 100"),
        Case("value-under", fields(logit_bias={"1": -101}), "logit_bias", "-100 to 100"),
        Case(
            "value-inf",
            raw(b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 1e400}}'),
            "logit_bias",
            "out of range",
        ),
    ],
    # Item 2: sizes that index the token history (2**40 overflowed an mlx slice), the sampler's ranges.
    "sampling": [
        Case(
            "repetition-context-huge",
            fields(repetition_context_size=2**40, repetition_penalty=1.1),
            "repetition_context_size",
            "context",
        ),
        Case(
            "presence-context-huge",
            fields(presence_context_size=2**40, presence_penalty=0.5),
            "presence_context_size",
            "context",
        ),
        Case(
            "frequency-context-over",
            fields(frequency_context_size=4097, frequency_penalty=0.5),
            "frequency_context_size",
            "context",
        ),
        Case(
            "repetition-context-over-profile",
            fields(repetition_context_size=257),
            "repetition_context_size",
            "256",
            (BATCH,),
        ),
        Case("context-negative", fields(presence_context_size=-1), "presence_context_size", "at least 0"),
        Case("context-float", fields(repetition_context_size=20.5), "repetition_context_size", "integer"),
        Case("context-string", fields(frequency_context_size="20"), "frequency_context_size", "integer"),
        Case(
            "xtc-kills-thread", fields(xtc_probability=1.0, xtc_threshold=1.0, temperature=1.0), "xtc_threshold", "0.5"
        ),
        Case("xtc-threshold-over", fields(xtc_threshold=0.51), "xtc_threshold", "between"),
        Case("xtc-probability-over", fields(xtc_probability=1.5), "xtc_probability", "between"),
        Case("xtc-probability-negative", fields(xtc_probability=-0.1), "xtc_probability", "between"),
        Case("xtc-probability-string", fields(xtc_probability="1"), "xtc_probability", "number"),
        Case("temperature-over", fields(temperature=2.5), "temperature", "between 0 and 2"),
        Case("temperature-negative", fields(temperature=-1), "temperature", "between"),
        Case("top-p-over", fields(top_p=1.5), "top_p", "between"),
        Case("min-p-negative", fields(min_p=-0.1), "min_p", "between"),
        Case("presence-penalty-over", fields(presence_penalty=3), "presence_penalty", "between"),
        Case("frequency-penalty-under", fields(frequency_penalty=-2.5), "frequency_penalty", "between"),
        Case("repetition-penalty-negative", fields(repetition_penalty=-1), "repetition_penalty", "between"),
        Case("top-k-negative", fields(top_k=-1), "top_k", "at least 0"),
        Case("top-k-float", fields(top_k=1.5), "top_k", "integer"),
        Case("seed-over-64-bits", fields(seed=2**64), "seed", "between"),
        Case("top-logprobs-over", fields(logprobs=True, top_logprobs=12), "top_logprobs", "between 0 and 11"),
        Case("logprobs-string", fields(logprobs="yes"), "logprobs", "boolean"),
        Case("role-mapping-list", fields(role_mapping=["user"]), "role_mapping", "object"),
        Case("role-mapping-number", fields(role_mapping={"user": 5}), "role_mapping", "strings"),
    ],
    # Item 3: template keyword arguments that kill the generation thread or grow the prompt, and unknowns.
    "chat-template-kwargs": [
        Case(
            "return-tensors",
            fields(chat_template_kwargs={"return_tensors": "np"}),
            "chat_template_kwargs",
            "enable_thinking",
        ),
        Case(
            "truncation",
            fields(chat_template_kwargs={"truncation": True, "max_length": 0}),
            "chat_template_kwargs",
            "only",
        ),
        Case(
            "padding",
            fields(chat_template_kwargs={"padding": "max_length", "max_length": 100000}),
            "chat_template_kwargs",
            "only",
        ),
        Case("tokenize", fields(chat_template_kwargs={"tokenize": False}), "chat_template_kwargs", "only"),
        Case(
            "own-template",
            fields(chat_template_kwargs={"chat_template": "{{ messages }}"}),
            "chat_template_kwargs",
            "only",
        ),
        Case(
            "generation-prompt",
            fields(chat_template_kwargs={"add_generation_prompt": False}),
            "chat_template_kwargs",
            "only",
        ),
        Case(
            "thinking-string",
            fields(chat_template_kwargs={"enable_thinking": "yes"}),
            "chat_template_kwargs",
            "boolean",
        ),
        Case("not-object", fields(chat_template_kwargs="enable_thinking"), "chat_template_kwargs", "object"),
    ],
    # Item 5: each distinct stop list is compiled and cached by the backend.
    "stop": [
        Case("seventeen", fields(stop=[f"s{i}" for i in range(17)]), "stop", "at most 16"),
        Case("huge-list", fields(stop=["ab"] * 300_000), "stop", "at most 16"),
        Case("long-string", fields(stop="x" * 257), "stop", "256 characters"),
        Case("long-in-list", fields(stop=["a", "x" * 257]), "stop", "256 characters"),
        Case("number-in-list", fields(stop=["a", 5]), "stop", "string"),
        Case("nested-list", fields(stop=[["a"]]), "stop", "string"),
    ],
    # The same fields on text completions (the backend reads them there too).
    "text-completions": [
        Case("logit-bias-id", text_fields(logit_bias={"9999": 1}), "logit_bias", "vocabulary", path=COMPLETIONS),
        Case("logit-bias-null", text_fields(logit_bias={"1": None}), "logit_bias", "null", path=COMPLETIONS),
        Case(
            "context-size",
            text_fields(repetition_context_size=2**40),
            "repetition_context_size",
            "context",
            path=COMPLETIONS,
        ),
        Case("xtc", text_fields(xtc_threshold=1.0, xtc_probability=1.0), "xtc_threshold", "0.5", path=COMPLETIONS),
        Case(
            "template-kwargs",
            text_fields(chat_template_kwargs={"return_tensors": "np"}),
            "chat_template_kwargs",
            "only",
            path=COMPLETIONS,
        ),
        Case("stop", text_fields(stop=["a"] * 17), "stop", "at most 16", path=COMPLETIONS),
        Case(
            "overflow",
            raw(b'{"model": "MODEL", "prompt": "hi", "top_p": 1e400}'),
            "top_p",
            "out of range",
            path=COMPLETIONS,
        ),
    ],
    # Item 11: values the parser or the encoders cannot carry were 500s.
    "json-values": [
        Case("5000-digits", raw(b'{"model": "MODEL", "x": ' + b"9" * 5000 + b"}"), None, "digits"),
        Case(
            "5000-digits-in-field",
            raw(b'{"model": "MODEL", "messages": [], "seed": ' + b"1" * 5000 + b"}"),
            None,
            "digits",
        ),
        Case("depth-65", nested(64), "x", "nested too deeply"),
        Case("depth-900", nested(900), "x", "nested too deeply"),
        Case("depth-parser-limit", nested(5000), None, "nested too deeply"),
        Case(
            "overflow-unknown-field",
            raw(b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "x": -1e400}'),
            "x",
            "out of range",
        ),
        Case(
            "overflow-temperature",
            raw(b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
            "temperature",
            "out of range",
        ),
    ],
}


class Listener:
    """A loopback TCP listener that counts connections: the address a forged image URL points at."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    target = Listener()
    yield target
    target.close()


@pytest.fixture(scope="module")
def gateway(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    common = f"max_output_tokens = {MAX_TOKENS}\nmax_queue = 64\nsampling = {{ temperature = 0.0 }}\n"
    profiles = (
        f'[profiles."{BATCH}"]\nmodel = "{tiny_pair.main}"\ncontext_length = {CONTEXT[BATCH]}\n{common}'
        "backend = { max_concurrency = 4 }\n"
        f'[profiles."{SPEC}"]\nmodel = "{tiny_pair.main}"\ndraft_model = "{tiny_pair.draft}"\n{common}'
    )
    env = {"SPECGATE_MAX_BACKENDS": "2", "SPECGATE_PRELOAD": json.dumps(list(PROFILES))}
    with running_gateway(tmp_path_factory.mktemp("backend-fields"), profiles, env) as running:
        yield running


@pytest.fixture(scope="module")
def references(gateway: GatewayProcess) -> dict[str, str]:
    """Each profile's greedy answer to the good request, before any hostile one."""
    answers = {}
    with gateway.client() as client:
        for profile in PROFILES:
            reply = client.post("/v1/chat/completions", json=good(profile))
            assert reply.status_code == 200, reply.text
            answers[profile] = reply.json()["choices"][0]["message"]["content"]
    return answers


def backend_identity(gateway: GatewayProcess) -> dict[str, tuple[Any, Any]]:
    """(pid, restarts) of each profile's backend: a crash or a restart changes one of them."""
    models = gateway.models()
    return {
        profile: (models[profile]["backend"]["pid"], models[profile]["backend"]["restarts"]) for profile in PROFILES
    }


def problems_with(reply: httpx.Response, case: Case) -> str | None:
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{reply.status_code}, not OpenAI-shaped: {reply.text[:200]}"
    if reply.status_code != 400:
        return f"status {reply.status_code}: {error}"
    if set(error) != {"message", "type", "param", "code"} or error["type"] != "invalid_request_error":
        return f"error shape {error}"
    if error["param"] != case.param:
        return f"param {error['param']!r}, expected {case.param!r}: {error['message']}"
    if case.fragment.lower() not in error["message"].lower():
        return f"message {error['message']!r} lacks {case.fragment!r}"
    return None


def send(client: httpx.Client, case: Case, profile: str, listener: Listener) -> httpx.Response:
    content = case.body(profile).replace(b"TARGET", listener.address.encode())
    return client.post(case.path, content=content, headers=JSON)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_payload_is_a_400_naming_the_field_and_the_backends_keep_serving(
    gateway: GatewayProcess, references: dict[str, str], listener: Listener, name: str
) -> None:
    before = backend_identity(gateway)
    problems = []
    with gateway.client() as client:
        for case in CLASSES[name]:
            for profile in case.profiles:
                reply = send(client, case, profile, listener)
                problem = problems_with(reply, case)
                if problem is not None:
                    problems.append(f"{case.id} on {profile}: {problem}")
                elif listener.address in reply.text:
                    problems.append(f"{case.id} on {profile}: the answer names the target: {reply.text[:200]}")
        for profile in PROFILES:
            reply = client.post("/v1/chat/completions", json=good(profile))
            if reply.status_code != 200:
                problems.append(f"next request on {profile}: {reply.status_code} {reply.text[:200]}")
            elif reply.json()["choices"][0]["message"]["content"] != references[profile]:
                problems.append(f"next request on {profile}: a different answer")
    assert not problems, "\n".join(problems)
    assert backend_identity(gateway) == before, "a backend crashed or was restarted"
    assert listener.connections == 0, "a backend fetched the forged URL"


def test_any_nesting_depth_is_a_400(gateway: GatewayProcess) -> None:
    """Around the limit, and around where the parser's recursion gives up (which depends on the stack in use
    when it runs): there, depths 975-977 parsed and then failed to encode, a 500."""
    problems = []
    with gateway.client() as client:
        for depth in [*range(60, 70), *range(940, 1010)]:
            reply = client.post("/v1/chat/completions", content=nested(depth)(BATCH), headers=JSON)
            if depth < 64:
                if reply.status_code != 200:
                    problems.append(f"{depth}: {reply.status_code} {reply.text[:200]}")
            elif reply.status_code != 400 or "nested too deeply" not in reply.json()["error"]["message"]:
                problems.append(f"{depth}: {reply.status_code} {reply.text[:200]}")
    assert not problems, "\n".join(problems)


def test_bad_logit_bias_values_count_as_client_errors(gateway: GatewayProcess) -> None:
    """Item 12: these were 502 backend_died and counted as backend errors."""
    bad = [case for case in CLASSES["logit-bias"] if case.id.startswith("value-")]
    start = scrape(gateway)
    with gateway.client() as client:
        for case in bad:
            reply = client.post("/v1/chat/completions", content=case.body(BATCH), headers=JSON)
            assert reply.status_code == 400, reply.text
    end = scrape(gateway)

    def delta(outcome: str) -> float:
        return end.value("specgate_requests_total", outcome=outcome) - start.value(
            "specgate_requests_total", outcome=outcome
        )

    assert delta("client_error") == len(bad)
    assert delta("backend_error") == 0


def answer(client: httpx.Client, profile: str, **extra: Any) -> dict[str, Any]:
    reply = client.post("/v1/chat/completions", json=good(profile, **extra))
    assert reply.status_code == 200, (extra, reply.text)
    result: dict[str, Any] = reply.json()["choices"][0]
    return result


def token_ids(choice: dict[str, Any]) -> list[int]:
    return [entry["id"] for entry in choice["logprobs"]["content"]]


@pytest.mark.parametrize("profile", PROFILES)
def test_valid_edge_values_are_served_and_take_effect(
    gateway: GatewayProcess, references: dict[str, str], profile: str
) -> None:
    before = backend_identity(gateway)
    edges = {
        "temperature": 2,
        "top_p": 1,
        "min_p": 0,
        "top_k": 0,
        "presence_penalty": -2,
        "presence_context_size": CONTEXT[profile],
        "frequency_penalty": 2,
        "frequency_context_size": 0,
        "repetition_penalty": 100,
        "repetition_context_size": CONTEXT[profile],
        "xtc_probability": 1,  # integers: mlx_lm.server refuses them, the gateway sends 1.0 and 0.5
        "xtc_threshold": 0.5,
        "seed": 2**63 - 1,
        "stop": ["x" * 256] * 16,
        "chat_template_kwargs": {"enable_thinking": True},
        "role_mapping": {"user": "U: "},
    }
    with gateway.client() as client:
        assert answer(client, profile, **edges)["finish_reason"] in ("stop", "length")
        # null is "not sent": the profile's defaults apply, so the greedy answer is the reference.
        nulls = dict.fromkeys([*edges, "logit_bias", "logprobs", "top_logprobs", "top_k", "min_p"])
        assert answer(client, profile, **nulls)["message"]["content"] == references[profile]
        # logit_bias at the vocabulary's edges, the most entries accepted, the extreme values: the
        # greedy answer becomes the last token of the vocabulary, every time.
        bias = {str(token): -100 for token in range(299)}
        bias[str(VOCAB - 1)] = 100
        forced = answer(client, profile, logit_bias=bias, logprobs=True)
        assert token_ids(forced) == [VOCAB - 1] * MAX_TOKENS
        # (With top_logprobs, mlx_lm's entries name its unsorted top-k's first token, not the one generated.)
        top = answer(client, profile, logprobs=True, top_logprobs=11)["logprobs"]["content"]
        assert [len(entry["top_logprobs"]) for entry in top] == [11] * MAX_TOKENS
        # And -100 on the reference's first token makes the greedy answer start elsewhere.
        plain = answer(client, profile, logprobs=True)
        first = token_ids(plain)[0]
        banned = answer(client, profile, logit_bias={str(first): -100.0}, logprobs=True)
        assert token_ids(banned)[0] != first
    assert backend_identity(gateway) == before


def test_valid_values_reach_the_backend_unchanged(tmp_path: Path) -> None:
    """The body the backend receives, recorded by the fake backend: validated fields pass through as sent,
    except null (dropped: the default applies) and xtc integers (sent as the same floats, which mlx_lm wants)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000, "max_position_embeddings": 2048}))
    record = tmp_path / "requests.jsonl"
    profiles = fake_profile("fake", model, "--record-requests", str(record))
    sent = {
        "temperature": 2,
        "top_p": 0.5,
        "min_p": 1,
        "top_k": 40,
        "presence_penalty": -2,
        "presence_context_size": 2048,
        "frequency_penalty": 2.0,
        "frequency_context_size": 0,
        "repetition_penalty": 1.3,
        "repetition_context_size": 64,
        "seed": 2**63 - 1,
        "logit_bias": {"0": -100, "999": 100, "07": 0.5},
        "stop": ["x" * 256] * 16,
        "chat_template_kwargs": {"enable_thinking": False},
        "role_mapping": {"user": "U: "},
        "some_future_field": {"kept": [1, 2.5, None]},
    }
    with running_gateway(tmp_path / "gateway", profiles) as gateway, gateway.client() as client:
        reply = client.post(
            "/v1/chat/completions",
            json=good("fake", **sent, xtc_probability=1, xtc_threshold=0, top_logprobs=None, logprobs=None),
        )
        assert reply.status_code == 200, reply.text
    received = json.loads(record.read_text().splitlines()[-1])
    assert {name: received.get(name) for name in sent} == sent
    assert all(type(received[name]) is type(value) for name, value in sent.items())
    xtc = (received["xtc_probability"], received["xtc_threshold"])
    assert xtc == (1.0, 0.0)
    assert [type(value) for value in xtc] == [float, float]
    assert not {"top_logprobs", "logprobs"} & set(received)


class NamedBackend:
    """What the error mapping reads of a backend: its name (a 400 never marks it broken)."""

    name = "b1-main"


def test_a_backend_400_stays_out_of_the_answer(caplog: pytest.LogCaptureFixture) -> None:
    """mlx_lm.server's 400s come from its reading of a request, image fetches included: what an internal
    address answered (here, before the allow-list: the listener resetting the connection) goes to the
    gateway's log, never to the client. Its 404s (template and generation failures) keep their text."""
    fetch_error = b'{"error": "[Errno 104] Connection reset by peer"}'
    with caplog.at_level(logging.WARNING, logger="specgate.requests"):
        refused = map_backend_status(400, fetch_error, cast(BackendEndpoint, NamedBackend()))
    assert isinstance(refused, InvalidRequest)
    assert "Errno" not in refused.message
    assert "Connection reset by peer" in caplog.text
    roles = b'{"error": "Conversation roles must alternate"}'
    template = map_backend_status(404, roles, cast(BackendEndpoint, NamedBackend()))
    assert isinstance(template, InvalidRequest)
    assert "roles must alternate" in template.message
