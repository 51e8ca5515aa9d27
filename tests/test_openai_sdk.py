"""The official `openai` package against a real gateway: sync and async, chat and text completions, streaming
and not, `models.list()`, `stream_options`, and errors raised as the SDK's own exception types.

The speculative and baseline profiles run specgate's launcher (mlx_lm.server + hooks) on a tiny generated
pair; the 429 case uses the fake backend with a per-token delay, which holds the only queue place long enough.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.testing.tiny_model import write_pair
from tests.conftest import TinyPair
from tests.harness import FAKE_BACKEND, GatewayProcess, fake_model_dir, running_gateway, toml_list

SPEC = "speculative/tiny"
BASE = "baseline/tiny"
NARROW = "narrow/slow"  # max_queue = 1 on a slow fake backend
PROMPT = "Write a function that adds two numbers."


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("sdk")
    main, draft = write_pair(workdir / "tiny", noise=0.02)
    fake_model = fake_model_dir(workdir)
    slow = toml_list([*FAKE_BACKEND, "--token-delay", "0.05"])
    profiles = f"""
[profiles."{SPEC}"]
display_name = "Tiny + draft"
model = "{main}"
draft_model = "{draft}"
num_draft_tokens = 3
sampling = {{ temperature = 0.0 }}

[profiles."{BASE}"]
model = "{main}"
sampling = {{ temperature = 0.0 }}

[profiles."{NARROW}"]
model = "{fake_model}"
max_queue = 1
backend = {{ command = {slow} }}
"""
    env = {"SPECGATE_MAX_BACKENDS": "3", "SPECGATE_PRELOAD": f'["{SPEC}", "{BASE}"]'}
    with running_gateway(workdir, profiles, env) as running:
        yield running


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    # max_retries=0: the SDK retries 429 and 5xx by itself, which would hide the errors under test.
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def async_client(gateway: GatewayProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def spec_metrics(extra: dict[str, Any] | None) -> dict[str, Any]:
    assert extra is not None
    figures: dict[str, Any] = extra["metrics"]["speculative_decoding"]
    assert figures["num_draft_tokens"] > 0
    assert 0 <= figures["num_accepted_draft_tokens"] <= figures["num_draft_tokens"]
    assert figures["draft_acceptance_rate"] == pytest.approx(
        figures["num_accepted_draft_tokens"] / figures["num_draft_tokens"]
    )
    return figures


# ----- sync ------------------------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {SPEC, BASE, NARROW}
    assert models[SPEC].object == "model"
    assert models[SPEC].owned_by == "specgate"
    # specgate's additions come through as extra fields on the SDK's own type.
    assert models[SPEC].model_extra is not None
    assert models[SPEC].model_extra["name"] == "Tiny + draft"
    assert models[SPEC].model_extra["draft_model"] is not None
    assert client.models.retrieve(BASE).id == BASE


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=SPEC,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        extra_headers={"X-Request-Id": "sdk-1"},
    )
    assert raw.headers["x-request-id"] == "sdk-1"
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.model == SPEC
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    spec_metrics(reply.model_extra)
    assert reply.model_extra is not None
    assert reply.model_extra["timings"]["predicted_n"] == reply.usage.completion_tokens


def test_chat_streaming_with_usage_equals_non_streaming(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=SPEC, messages=messages, max_tokens=24)
    stream = client.chat.completions.create(
        model=SPEC, messages=messages, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    # Temperature 0 (the profile's default): the same text either way.
    assert text == whole.choices[0].message.content
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks if chunk.choices)
    assert all(chunk.model == SPEC for chunk in chunks)
    roles = [chunk.choices[0].delta.role for chunk in chunks if chunk.choices and chunk.choices[0].delta.role]
    assert roles == ["assistant"]  # once, first, as OpenAI sends it
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1
    last = usage_chunks[0]
    assert last is chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    figures = spec_metrics(last.model_extra)
    # Same request, same speculation: the per-request figures do not depend on streaming.
    assert figures == spec_metrics(whole.model_extra)


def test_usage_chunk_object_is_openai_s(client: openai.OpenAI) -> None:
    chat = list(
        client.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = list(
        client.completions.create(
            model=BASE, prompt="hi", max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chat[-1].usage is not None
    assert text[-1].usage is not None
    assert (chat[-1].object, text[-1].object) == ("chat.completion.chunk", "text_completion")


def test_chat_streaming_without_stream_options_has_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
        )
    )
    assert chunks
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_text_completions(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=SPEC, prompt="def add(a, b):", max_tokens=16)
    assert whole.object == "text_completion"
    assert whole.model == SPEC
    assert whole.choices[0].text
    spec_metrics(whole.model_extra)
    stream = client.completions.create(
        model=SPEC, prompt="def add(a, b):", max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None
    assert whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    spec_metrics(chunks[-1].model_extra)


def test_baseline_has_timings_and_no_speculation(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.model_extra is not None
    assert "metrics" not in reply.model_extra
    assert reply.usage is not None
    assert reply.model_extra["timings"]["predicted_n"] == reply.usage.completion_tokens


def test_unknown_model_is_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no/such-model", messages=[{"role": "user", "content": "hi"}])
    error = caught.value
    assert error.status_code == 404
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert SPEC in error.message  # the names that do exist
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no/such-model")


def test_invalid_request_is_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SPEC, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SPEC, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SPEC, prompt="hi", extra_body={"num_draft_tokens": 65})


def test_full_queue_is_rate_limit_error(client: openai.OpenAI) -> None:
    """max_queue = 1: while one request streams, the next is refused at once with 429 and Retry-After."""
    holding = threading.Event()
    finished = threading.Event()
    failures: list[BaseException] = []

    def hold_the_slot() -> None:
        try:
            stream = client.chat.completions.create(
                model=NARROW, messages=[{"role": "user", "content": "hold"}], max_tokens=60, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    holding.set()
        except BaseException as error:  # reported by the main thread
            failures.append(error)
        finally:
            holding.set()
            finished.set()

    thread = threading.Thread(target=hold_the_slot, daemon=True)
    thread.start()
    assert holding.wait(30), "the first request never started streaming"
    assert not failures, failures
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=NARROW, messages=[{"role": "user", "content": "second"}], max_tokens=4)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "queue_full"
    assert int(error.response.headers["retry-after"]) >= 1
    assert not finished.is_set(), "the first request ended before the second was refused: the test proves nothing"
    thread.join(timeout=30)
    assert finished.is_set()
    assert not failures, failures
    # The place is free again.
    reply = client.chat.completions.create(model=NARROW, messages=[{"role": "user", "content": "third"}], max_tokens=2)
    assert reply.choices[0].message.content


def test_authentication_error_when_keys_are_on(tiny_pair: TinyPair, tmp_path: Path) -> None:
    """SPECGATE_API_KEYS on: a wrong key is the SDK's AuthenticationError, the right one is served."""
    profiles = f'[profiles."{BASE}"]\nmodel = "{tiny_pair.main}"\nsampling = {{ temperature = 0.0 }}\n'
    with running_gateway(tmp_path, profiles, {"SPECGATE_API_KEYS": "sk-right"}) as keyed:
        base_url = f"{keyed.url}/v1"
        with openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0, timeout=60) as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert caught.value.status_code == 401
            assert caught.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with openai.OpenAI(base_url=base_url, api_key="sk-right", max_retries=0, timeout=60) as right:
            reply = right.chat.completions.create(
                model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.choices[0].message.content is not None
            assert [model.id for model in right.models.list()] == [BASE]


# ----- async -----------------------------------------------------------------------------------------------


async def test_async_models_and_chat(gateway: GatewayProcess) -> None:
    async with async_client(gateway) as sdk:
        ids = [model.id async for model in sdk.models.list()]
        assert SPEC in ids
        reply = await sdk.chat.completions.create(
            model=SPEC, messages=[{"role": "user", "content": PROMPT}], max_tokens=24
        )
        assert reply.choices[0].message.content
        figures = spec_metrics(reply.model_extra)
        stream = await sdk.chat.completions.create(
            model=SPEC,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == reply.choices[0].message.content
        assert chunks[-1].usage is not None
        assert spec_metrics(chunks[-1].model_extra) == figures


async def test_async_text_completion_stream_and_errors(gateway: GatewayProcess) -> None:
    async with async_client(gateway) as sdk:
        stream = await sdk.completions.create(
            model=BASE, prompt="hello", max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(choice.text for chunk in chunks for choice in chunk.choices)
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0
        with pytest.raises(openai.NotFoundError):
            await sdk.completions.create(model="no/such-model", prompt="hi")
        with pytest.raises(openai.BadRequestError):
            await sdk.completions.create(model=BASE, prompt="hi", max_tokens=-5)


async def test_async_concurrent_requests_keep_their_own_answers(gateway: GatewayProcess) -> None:
    """Several requests at once through one async client (they queue FIFO per backend) each get their own text."""
    import asyncio

    prompts = ["hello", "def f(x):", "The capital of France is"]
    async with async_client(gateway) as sdk:
        sequential = [
            (await sdk.completions.create(model=BASE, prompt=p, max_tokens=10)).choices[0].text for p in prompts
        ]
        together = await asyncio.gather(*(sdk.completions.create(model=BASE, prompt=p, max_tokens=10) for p in prompts))
    assert [reply.choices[0].text for reply in together] == sequential
