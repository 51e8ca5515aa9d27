"""The tool-call parser (app/proxy/toolcalls.py), whole answers and streamed ones."""

from __future__ import annotations

import json

import pytest

from app.proxy.toolcalls import ToolCall, ToolCallStream, parse_tool_calls

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
