"""The tool-call parser (app/proxy/toolcalls.py), whole answers and streamed ones."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.profiles import parse_profiles
from app.proxy.rewrite import build_backend_request
from app.proxy.toolcalls import ToolCall, ToolCallStream, parse_tool_calls
from app.proxy.toolrelay import ToolCallRelay
from app.proxy.tools import ToolPlan, messages_for_backend, tool_plan

TOOLS = frozenset({"read", "write", "list"})
READ = ToolCall("read", json.dumps({"filePath": "/x/hello.py"}))


def streamed(
    pieces: list[str], tools: frozenset[str] = TOOLS
) -> tuple[list[list[str | ToolCall]], list[str | ToolCall]]:
    """Feed `pieces` one by one: what each feed returned, and what finish returned."""
    stream = ToolCallStream(tools)
    return [stream.feed(piece) for piece in pieces], stream.finish()


def flatten(per_feed: list[list[str | ToolCall]], final: list[str | ToolCall]) -> tuple[str, list[ToolCall]]:
    events = [event for batch in per_feed for event in batch] + final
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)]


@pytest.mark.parametrize(
    "answer",
    [
        '```json\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```',
        '```\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```',
        '```JSON\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```\n',
        '{"name": "read", "arguments": {"filePath": "/x/hello.py"}}',
        '  {"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n',
        '<tool_call>\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n</tool_call>',
        '<tool_call>{"name": "read", "arguments": {"filePath": "/x/hello.py"}}</tool_call>',
        '<tool_call>\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}',  # never closed
        '```json\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}',  # fence never closed
        '{"name": "read", "parameters": {"filePath": "/x/hello.py"}}',
        '{"name": "read", "arguments": "{\\"filePath\\": \\"/x/hello.py\\"}"}',
        '[{"name": "read", "arguments": {"filePath": "/x/hello.py"}}]',
        '```json\n[{"name": "read", "arguments": {"filePath": "/x/hello.py"}}]\n```',
        '{"arguments": {"filePath": "/x/hello.py"}, "name": "read"}',
    ],
)
def test_one_call_in_each_format(answer: str) -> None:
    assert parse_tool_calls(answer, TOOLS) == ("", [READ])


def test_text_before_a_call_stays_content() -> None:
    answer = 'I will read the file.\n```json\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```'
    assert parse_tool_calls(answer, TOOLS) == ("I will read the file.\n", [READ])


def test_text_after_a_call_stays_content() -> None:
    answer = '<tool_call>{"name": "list"}</tool_call>\n\nThat lists the files.'
    assert parse_tool_calls(answer, TOOLS) == ("That lists the files.", [ToolCall("list", "{}")])


def test_several_calls_in_one_answer() -> None:
    answer = (
        "First the file, then the listing.\n"
        '<tool_call>\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "list", "arguments": {"path": "/x"}}\n</tool_call>\n'
        '```json\n{"name": "write", "arguments": {"filePath": "/y", "content": "hi"}}\n```\n'
        '[{"name": "list", "arguments": {}}, {"name": "read", "parameters": {"filePath": "/z"}}]'
    )
    content, calls = parse_tool_calls(answer, TOOLS)
    assert content == "First the file, then the listing.\n"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("read", {"filePath": "/x/hello.py"}),
        ("list", {"path": "/x"}),
        ("write", {"filePath": "/y", "content": "hi"}),
        ("list", {}),
        ("read", {"filePath": "/z"}),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        '{"name": "rm", "arguments": {"path": "/"}}',  # not one of the request's tools
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
        '{"name": "read", "arguments": {"filePath": "/x"}',  # unbalanced
        '{"name": "read", "arguments": {"filePath": /x}}',  # balanced but not JSON
        '```json\n{"name": "read", "arguments": {"filePath": "/x"}\n```',
        '<tool_call>{"name": "read", "arguments": {"filePath": "/x"}</tool_call>',
        '{"name": "read", "arguments": "not json"}',
        '{"name": "read", "arguments": [1, 2]}',
        '{"name": "read", "arguments": "[1, 2]"}',
        '{"name": "read", "description": "Reads a file"}',  # describes the tool, does not call it
        '[{"name": "read", "arguments": {}}, {"name": "rm", "arguments": {}}]',  # one bad call spoils the block
        "[]",
        "{}",
        '```python\nconfig = {"name": "read", "arguments": {}}\n```',
        'The call would be {"name": "read", "arguments": {}} here.',  # not at the start of a line
        '{"type": "object", "properties": {}}',
    ],
)
def test_what_is_not_a_call_stays_content_byte_for_byte(answer: str) -> None:
    assert parse_tool_calls(answer, TOOLS) == (answer, [])
    per_feed, final = streamed(list(answer))
    assert flatten(per_feed, final) == (answer, [])


def test_braces_inside_strings_and_nested_objects() -> None:
    arguments = {"content": 'def f():\n    return {"a": [1, {"b": "}]"}]}\n', "nested": {"deep": {"x": "{"}}}
    answer = json.dumps({"name": "write", "arguments": arguments})
    content, calls = parse_tool_calls(answer, TOOLS)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("write", arguments)]


def test_escaped_quotes_inside_strings() -> None:
    answer = '{"name": "write", "arguments": {"content": "say \\"}\\" and \\\\"}}'
    content, calls = parse_tool_calls(answer, TOOLS)
    assert content == ""
    assert json.loads(calls[0].arguments) == {"content": 'say "}" and \\'}


def test_plain_text_streams_at_once() -> None:
    pieces = ["Hello", " there,", " world.", "\nNew line", " with a < sign and a ` tick."]
    per_feed, final = streamed(pieces)
    assert per_feed[:4] == [["Hello"], [" there,"], [" world."], ["\nNew line"]]
    assert flatten(per_feed, final) == ("".join(pieces), [])


def test_code_fence_with_a_language_streams_at_once() -> None:
    per_feed, final = streamed(["Here:\n", "```", "py", "thon\n", "print(1)\n", "```"])
    assert per_feed[1] == []  # "```" could open a call
    assert "".join(str(e) for e in per_feed[2]) == "```py"  # "py" cannot be "json": flushed
    assert per_feed[3] == ["thon\n"]
    assert per_feed[4] == ["print(1)\n"]
    assert flatten(per_feed, final) == ("Here:\n```python\nprint(1)\n```", [])


@pytest.mark.parametrize(
    "pieces",
    [
        ["<tool_", "call>", '{"name": "read", ', '"arguments": {"filePath": "/x/hello.py"}}', "</tool_", "call>"],
        ["``", "`json", "\n", '{"name": "read", "arguments": {"filePath": "/x/hello.py"}}', "\n`", "``"],
        ["`", "`", "`", "\n{", '"na', 'me": "read", "arguments": {"filePath": "/x/hello.py"}', "}\n```"],
        ["{", '"name"', ': "read", "arguments": {"filePath": "/x/hello.py"}}'],
    ],
)
def test_a_call_split_across_pieces_is_held_then_emitted(pieces: list[str]) -> None:
    per_feed, final = streamed(pieces)
    assert all(batch == [] for batch in per_feed[:-1]), per_feed
    assert flatten(per_feed, final) == ("", [READ])


def test_a_call_is_emitted_as_soon_as_it_is_complete() -> None:
    per_feed, final = streamed(
        ["Reading.\n", "<tool_call>", '{"name": "read", "arguments": {"filePath": "/x/hello.py"}}', "</tool_call>"]
    )
    assert per_feed == [["Reading.\n"], [], [], [READ]]
    assert final == []


def test_text_before_a_held_call_start_is_not_held() -> None:
    per_feed, _ = streamed(["Sure.\n<tool", "_call>"])
    assert per_feed[0] == ["Sure.\n"]


def test_held_text_that_cannot_be_a_call_is_released_before_the_end() -> None:
    per_feed, _ = streamed(["<tool", "box> is a tag", " and more"])
    assert per_feed == [[], ["<toolbox> is a tag"], [" and more"]]
    per_feed, _ = streamed(["{", '"type": "object"', "}", " done"])
    assert "".join(str(e) for e in per_feed[1]) == '{"type": "object"'
    per_feed, _ = streamed(["[", "1, 2]"])
    assert per_feed == [[], ["[1, 2]"]]


def test_an_unfinished_call_is_flushed_as_content_at_the_end() -> None:
    per_feed, final = streamed(['<tool_call>{"name": "read", "arguments": {"filePath": "/x'])
    assert per_feed == [[]]
    assert final == ['<tool_call>{"name": "read", "arguments": {"filePath": "/x']


def test_a_prefix_is_parsed_with_the_generated_text() -> None:
    stream = ToolCallStream(TOOLS, prefix='{"name": "read", "arguments": ')
    events = stream.feed('{"filePath": "/x/hello.py"}') + stream.feed("}") + stream.finish()
    assert events == [READ]


def test_no_tools_means_no_calls() -> None:
    answer = '{"name": "read", "arguments": {}}'
    assert parse_tool_calls(answer, frozenset()) == (answer, [])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_streaming_in_any_piece_size_equals_the_whole_parse(size: int) -> None:
    answer = (
        "Plan:\n1. read\n2. list\n"
        '```json\n{"name": "read", "arguments": {"filePath": "/x/hello.py"}}\n```\n'
        "then `inline` code, <b>html</b> and {braces} mid-line\n"
        "{not json}\n"
        '<tool_call>\n{"name": "list", "arguments": "{}"}\n</tool_call>\n'
        "```python\nprint('x')\n```\n"
        '[{"name": "write", "parameters": {"filePath": "/y"}}]'
    )
    pieces = [answer[i : i + size] for i in range(0, len(answer), size)]
    assert flatten(*streamed(pieces)) == parse_tool_calls(answer, TOOLS)
    content, calls = parse_tool_calls(answer, TOOLS)
    assert [c.name for c in calls] == ["read", "list", "write"]
    assert "read" not in content.split("```python")[0].split("2. list")[1]


# ----- the chunk relay (app/proxy/toolrelay.py) on mlx_lm.server-shaped chunks ---------------------------


def mlx_chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"role": "assistant", **delta}
    if content:
        body["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "finish_reason": finish, "delta": body}],
    }


PLAN = ToolPlan(TOOLS, "auto")


def test_relay_holds_a_call_and_sends_it_as_tool_calls() -> None:
    relay = ToolCallRelay(PLAN)
    first = mlx_chunk("Reading.\n")
    assert relay.rewrite(first)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Reading.\n"}
    held = mlx_chunk('{"name": "read", "arguments": ')
    assert not relay.rewrite(held)  # nothing for the client yet: the chunk is dropped
    last = mlx_chunk('{"filePath": "/x/hello.py"}}', finish="stop")
    assert relay.rewrite(last)
    choice = last["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert "content" not in choice["delta"]
    (call,) = choice["delta"]["tool_calls"]
    assert call["index"] == 0
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "read", "arguments": READ.arguments}


def test_relay_passes_the_backends_own_calls_on_in_openai_shape() -> None:
    """mlx_lm.server parses `<tool_call>` itself for templates it knows: uuid ids, its own index, json.dumps'd
    arguments (a string of a string when the model wrote the arguments as a string)."""
    relay = ToolCallRelay(PLAN)
    backend_call = {
        "function": {"name": "list", "arguments": json.dumps('{"path": "/x"}')},
        "type": "function",
        "id": "0d5e0b9c-5f9e-4a51-9d0e-7b1c3b2a1f00",
        "index": 0,
    }
    text_call = mlx_chunk('{"name": "read", "arguments": {"filePath": "/x/hello.py"}}')
    assert relay.rewrite(text_call)
    chunk = mlx_chunk("", finish="tool_calls", tool_calls=[backend_call])
    assert relay.rewrite(chunk)
    calls = text_call["choices"][0]["delta"]["tool_calls"] + chunk["choices"][0]["delta"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1]  # one index sequence over both sources
    assert [c["function"]["name"] for c in calls] == ["read", "list"]
    assert all(c["id"].startswith("call_") for c in calls)
    assert json.loads(calls[1]["function"]["arguments"]) == {"path": "/x"}
    assert set(calls[1]) == {"index", "id", "type", "function"}
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"


def test_relay_leaves_length_and_plain_answers_alone() -> None:
    relay = ToolCallRelay(PLAN)
    chunk = mlx_chunk('{"name": "read", "arguments": {"filePath": "/x', finish="length")
    assert relay.rewrite(chunk)
    assert chunk["choices"][0]["finish_reason"] == "length"
    assert chunk["choices"][0]["delta"]["content"] == '{"name": "read", "arguments": {"filePath": "/x'
    relay = ToolCallRelay(PLAN)
    final = mlx_chunk(finish="stop")
    assert relay.rewrite(final)
    assert final["choices"][0] == {"index": 0, "finish_reason": "stop", "delta": {"role": "assistant"}}


def test_relay_prefix_from_a_forced_call() -> None:
    relay = ToolCallRelay(
        ToolPlan(frozenset({"read"}), "function", forced="read", prefill='{"name": "read", "arguments": ')
    )
    chunk = mlx_chunk('{"filePath": "/x/hello.py"}}', finish="stop")
    relay.rewrite(chunk)
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "read"
    assert chunk["choices"][0]["finish_reason"] == "tool_calls"


# ----- the request side (app/proxy/tools.py) ----------------------------------------------------------------

FUNCTION_TOOLS = [{"type": "function", "function": {"name": name}} for name in ("read", "list")]


def test_tool_plan_by_tool_choice() -> None:
    assert tool_plan({}) is None
    assert tool_plan({"tools": []}) is None
    assert tool_plan({"tools": FUNCTION_TOOLS, "tool_choice": "none"}) is None
    assert tool_plan({"tools": FUNCTION_TOOLS}) == ToolPlan(frozenset({"read", "list"}), "auto")
    assert tool_plan({"tools": FUNCTION_TOOLS, "tool_choice": "required"}) == ToolPlan(
        frozenset({"read", "list"}), "required"
    )
    named = {"type": "function", "function": {"name": "list"}}
    assert tool_plan({"tools": FUNCTION_TOOLS, "tool_choice": named}) == ToolPlan(
        frozenset({"list"}), "function", forced="list"
    )


def test_earlier_calls_reach_the_backend_with_object_arguments() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": '{"filePath": "/x"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x"},
    ]
    converted = messages_for_backend(messages)
    assert converted[1]["tool_calls"][0]["function"]["arguments"] == {"filePath": "/x"}
    assert converted[1]["tool_calls"][0]["id"] == "call_1"
    assert converted[2] == messages[2]
    assert call["function"]["arguments"] == '{"filePath": "/x"}'  # the client's body is not changed


def test_forced_calls_are_prefilled_only_on_the_launcher() -> None:
    launcher, other = parse_profiles(
        '[profiles."a"]\nmodel = "/m"\n[profiles."b"]\nmodel = "/m"\nbackend = { command = ["x"] }\n'
    )
    named = {"type": "function", "function": {"name": "read"}}
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "tools": FUNCTION_TOOLS}
    request = build_backend_request("chat", {**body, "tool_choice": named}, launcher)
    assert request.body["specgate_prefill"] == '<tool_call>\n{"name": "read", "arguments": '
    assert request.tools is not None
    assert request.tools.prefill == request.body["specgate_prefill"]
    required = build_backend_request("chat", {**body, "tool_choice": "required"}, launcher)
    assert required.body["specgate_prefill"] == '<tool_call>\n{"name": "'
    assert "specgate_prefill" not in build_backend_request("chat", body, launcher).body
    sneaked = build_backend_request("chat", {**body, "specgate_prefill": "Sure! "}, launcher)
    assert "specgate_prefill" not in sneaked.body
    elsewhere = build_backend_request("chat", {**body, "tool_choice": named}, other)
    assert "specgate_prefill" not in elsewhere.body
    assert elsewhere.tools is not None
    assert elsewhere.tools.prefill == ""


def test_required_prefill_is_parsed_with_the_generated_name() -> None:
    plan = ToolPlan(TOOLS, "required", prefill='<tool_call>\n{"name": "')
    relay = ToolCallRelay(plan)
    chunk = mlx_chunk('read", "arguments": {"filePath": "/x/hello.py"}}\n</tool_call>', finish="stop")
    relay.rewrite(chunk)
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["function"] == {"name": "read", "arguments": READ.arguments}
    # A continuation that is no call gives the text back, opening included: nothing is lost.
    relay = ToolCallRelay(plan)
    chunk = mlx_chunk("oops", finish="stop")
    relay.rewrite(chunk)
    assert chunk["choices"][0]["delta"]["content"] == '<tool_call>\n{"name": "oops'
    assert chunk["choices"][0]["finish_reason"] == "stop"


FRAGMENTS = [
    "text ",
    "\n",
    "  ",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    "`",
    "```",
    "```json\n",
    "<",
    "<tool_call>",
    "</tool_call>",
    '"name"',
    ": ",
    '"read"',
    '"rm"',
    ", ",
    '"arguments"',
    '{"filePath": "/x"}',
    '{"name": "read", "arguments": {"filePath": "/x/hello.py"}}',
]


@pytest.mark.parametrize("seed", range(40))
def test_random_answers_lose_nothing_and_stream_like_the_whole_parse(seed: int) -> None:
    import random

    rng = random.Random(seed)
    answer = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40)))
    content, calls = parse_tool_calls(answer, TOOLS)
    cuts = (
        sorted(rng.sample(range(1, len(answer)), min(len(answer) - 1, rng.randint(0, 12)))) if len(answer) > 1 else []
    )
    pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
    assert flatten(*streamed(pieces)) == (content, calls)
    if not calls:
        assert content == answer  # text that holds no call comes back byte for byte
    else:
        assert len(content) < len(answer)
