"""Tool calls end to end: a real gateway, the `openai` SDK, and fake backends that answer scripted text.

Each profile's backend is `app.testing.fake_backend --reply-text ...`: a real program that streams the
given text the way mlx_lm.server streams a model's answer (3-character tokens), so what is tested is the
gateway's parse of the text, not a stand-in for it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.harness import FAKE_BACKEND, GatewayProcess, fake_model_dir, read_sse, running_gateway

FENCED = "tools/fenced"
TAGS = "tools/tags"
TEXT = "tools/text"
UNKNOWN = "tools/unknown"

READ_ARGUMENTS = {"filePath": "/x/hello.py"}
FENCED_REPLY = 'I will read it.\n```json\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```'
SECOND_REPLY = "The file prints hello."
TAGS_REPLY = (
    '<tool_call>\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "list", "parameters": "{\\"path\\": \\"/x\\"}"}\n</tool_call>'
)
TEXT_REPLY = "Hello! A plain answer, with {braces} and a `tick`, but no call at all."
UNKNOWN_REPLY = '{"name": "delete_everything", "arguments": {"path": "/"}}'

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} a path",
            "parameters": {"type": "object", "properties": {key: {"type": "string"}}, "required": [key]},
        },
    }
    for name, key in (("read", "filePath"), ("list", "path"), ("write", "filePath"))
]


def toml_command(items: list[str]) -> str:
    # JSON string escapes are TOML basic-string escapes: newlines and quotes in replies survive.
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("toolcalls")
    model = fake_model_dir(workdir)
    replies = {
        FENCED: ["--reply-text", FENCED_REPLY, "--reply-text", SECOND_REPLY],
        TAGS: ["--reply-text", TAGS_REPLY],
        TEXT: ["--reply-text", TEXT_REPLY, "--token-delay", "0.03"],
        UNKNOWN: ["--reply-text", UNKNOWN_REPLY],
    }
    profiles = "".join(
        f'\n[profiles."{name}"]\nmodel = "{model}"\nbackend = {{ command = {toml_command([*FAKE_BACKEND, *flags])} }}\n'
        for name, flags in replies.items()
    )
    with running_gateway(workdir, profiles, {"SPECGATE_MAX_BACKENDS": "4"}) as running:
        yield running


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def ask(content: str = "Read /x/hello.py") -> list[Any]:
    return [{"role": "user", "content": content}]


def streamed(client: openai.OpenAI, model: str, **extra: Any) -> tuple[str, dict[int, dict[str, Any]], str | None, Any]:
    """Content, calls joined by index (OpenAI's incremental shape), finish reason, usage chunk."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish, usage_chunk = None, None
    stream = client.chat.completions.create(
        model=model, messages=ask(), stream=True, stream_options={"include_usage": True}, **extra
    )
    for chunk in stream:
        if not chunk.choices:
            usage_chunk = chunk
            continue
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for piece in choice.delta.tool_calls or ():
            if piece.index not in calls:
                # A call's first piece names it (OpenAI); later pieces only add argument text.
                assert piece.id
                assert piece.type == "function"
                assert piece.function
                assert piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            assert piece.function is not None
            calls[piece.index]["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content), calls, finish, usage_chunk


def test_fenced_call_is_a_tool_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=FENCED, messages=ask(), tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will read it.\n"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "read"
    assert json.loads(call.function.arguments) == READ_ARGUMENTS
    # The gateway's extras are still there.
    assert reply.model_extra is not None
    assert "timings" in reply.model_extra


def test_fenced_call_streamed(client: openai.OpenAI) -> None:
    content, calls, finish, usage_chunk = streamed(client, FENCED, tools=TOOLS)
    assert finish == "tool_calls"
    assert content == "I will read it.\n"
    assert "filePath" not in content
    assert list(calls) == [0]
    assert calls[0]["name"] == "read"
    assert calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == READ_ARGUMENTS
    assert usage_chunk is not None
    assert usage_chunk.usage.completion_tokens > 0
    assert "timings" in (usage_chunk.model_extra or {})


def test_two_tagged_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TAGS, messages=ask(), tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("read", READ_ARGUMENTS),
        ("list", {"path": "/x"}),
    ]
    assert len({c.id for c in calls}) == 2
    content, streamed_calls, finish, _ = streamed(client, TAGS, tools=TOOLS)
    assert content == ""
    assert finish == "tool_calls"
    assert [c["name"] for _, c in sorted(streamed_calls.items())] == ["read", "list"]


def test_raw_stream_keeps_its_shape(gateway: GatewayProcess) -> None:
    """Chunk order as before: role first, calls, the finish chunk, the usage chunk, [DONE]; one request id."""
    body = {
        "model": FENCED,
        "messages": ask(),
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with gateway.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        events = [event for _, event in read_sse(response)]
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["object"] == "chat.completion.chunk"
    assert "timings" in usage
    assert "specgate" not in usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert len({c["id"] for c in chunks}) == 1
    call_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(call_chunks) == 1
    (piece,) = call_chunks[0]["choices"][0]["delta"]["tool_calls"]
    assert set(piece) == {"index", "id", "type", "function"}
    assert piece["index"] == 0
    assert request_id in gateway.log()


def test_text_answer_still_streams_token_by_token(gateway: GatewayProcess) -> None:
    body = {"model": TEXT, "messages": ask(), "tools": TOOLS, "stream": True}
    with gateway.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = list(read_sse(response))
    pieces = [
        (at, e["choices"][0]["delta"]["content"])
        for at, e in events
        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")
    ]
    assert "".join(text for _, text in pieces) == TEXT_REPLY
    # 3-character tokens every 30 ms: nearly one chunk per token, spread over the answer's time, not one
    # burst at the end (only "{" and "`" starts are held, for a token or two).
    assert len(pieces) >= len(TEXT_REPLY) // 3 - 4
    assert pieces[-1][0] - pieces[0][0] > 0.5
    finish = [e["choices"][0]["finish_reason"] for _, e in events if isinstance(e, dict) and e["choices"]]
    assert finish[-1] == "stop"


def test_text_answer_with_tools_is_plain_content(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TEXT, messages=ask(), tools=TOOLS)
    assert reply.choices[0].message.content == TEXT_REPLY
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_tool_stays_content(client: openai.OpenAI, stream: bool) -> None:
    if stream:
        content, calls, finish, _ = streamed(client, UNKNOWN, tools=TOOLS)
        assert (content, calls, finish) == (UNKNOWN_REPLY, {}, "stop")
    else:
        reply = client.chat.completions.create(model=UNKNOWN, messages=ask(), tools=TOOLS)
        assert reply.choices[0].message.content == UNKNOWN_REPLY
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS, "tool_choice": "none"}])
def test_without_tools_or_with_tool_choice_none_text_stays_text(client: openai.OpenAI, extra: dict[str, Any]) -> None:
    reply = client.chat.completions.create(model=FENCED, messages=ask(), **extra)
    assert reply.choices[0].message.content == FENCED_REPLY
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    content, calls, finish, _ = streamed(client, FENCED, **extra)
    assert (content, calls, finish) == (FENCED_REPLY, {}, "stop")


def test_named_tool_choice(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "read"}}
    reply = client.chat.completions.create(model=FENCED, messages=ask(), tools=TOOLS, tool_choice=choice)
    assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == ["read"]
    # A call to another tool than the named one is not the call that was asked for: it stays text.
    other = {"type": "function", "function": {"name": "write"}}
    reply = client.chat.completions.create(model=FENCED, messages=ask(), tools=TOOLS, tool_choice=other)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content == FENCED_REPLY


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}}, "tool_choice", "'rm'"),
        ({"tool_choice": "required"}, "tool_choice", "no function tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools", "name"),
        ({"tools": "read"}, "tools", "list"),
    ],
)
def test_bad_tools_or_tool_choice_is_a_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=FENCED, messages=ask(), **extra)
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert words in caught.value.message


def second_turn(arguments: str) -> list[Any]:
    return [
        *ask(),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "read", "arguments": arguments}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "print('hello')"},
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_second_turn_after_a_tool_result(client: openai.OpenAI, stream: bool) -> None:
    first = client.chat.completions.create(model=FENCED, messages=ask(), tools=TOOLS)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = second_turn(call.function.arguments)
    messages[1]["tool_calls"][0]["id"] = messages[2]["tool_call_id"] = call.id
    if stream:
        chunks = client.chat.completions.create(model=FENCED, messages=messages, tools=TOOLS, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == SECOND_REPLY
    else:
        reply = client.chat.completions.create(model=FENCED, messages=messages, tools=TOOLS)
        # The backend counted the assistant turn: the second scripted reply answers.
        assert reply.choices[0].message.content == SECOND_REPLY
        assert reply.choices[0].finish_reason == "stop"


def test_earlier_call_with_broken_arguments_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=FENCED, messages=second_turn('{"filePath": '), tools=TOOLS)
    assert caught.value.param == "messages"
    assert "messages[1].tool_calls[0].function.arguments" in caught.value.message


def test_logprobs_answer_is_parsed_too(gateway: GatewayProcess) -> None:
    """With logprobs the gateway reads the backend's unstreamed answer: its calls are parsed the same way."""
    body = {"model": FENCED, "messages": ask(), "tools": TOOLS, "logprobs": True}
    started = time.monotonic()
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=30).json()
    assert time.monotonic() - started < 30
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I will read it.\n"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["read"]
    assert "index" not in choice["message"]["tool_calls"][0]


def test_metrics_count_tool_call_answers(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    client.chat.completions.create(model=TAGS, messages=ask(), tools=TOOLS)
    scrape = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    lines = [line for line in scrape.splitlines() if line.startswith("specgate_request_success_total{")]
    counted = [line for line in lines if f'profile="{TAGS}"' in line and 'finished_reason="tool_calls"' in line]
    assert counted, lines
    assert float(counted[0].rsplit(" ", 1)[1]) >= 1


def test_gateway_log_is_clean(gateway: GatewayProcess) -> None:
    assert "Traceback" not in gateway.log()
