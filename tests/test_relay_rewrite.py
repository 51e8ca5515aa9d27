"""The relay's byte-level rewrite of token chunks must give what the parsing rewrite gives.

The end-to-end tests (test_gateway_core, test_openai_sdk) see the result through a real backend; here
the two rewrites meet chunks a real backend could send but seldom does: quotes and key names inside the
content, a role-only delta, empty content, text completions, unusual spacing, errors and usage.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.proxy.record import RequestRecord
from app.proxy.relay import StreamRewriter, _relay_batch
from app.proxy.rewrite import BackendRequest, Kind


def _rewriter(kind: Kind = "chat", client_model: str = 'speculative/tiny "fast"') -> StreamRewriter:
    request = BackendRequest(
        kind=kind,
        path="/v1/chat/completions" if kind == "chat" else "/v1/completions",
        body={},
        client_streams=True,
        client_wants_usage=True,
        upstream_streams=True,
        num_draft_tokens=None,
        max_tokens=16,
    )
    record = RequestRecord("r1", "p", "m", None, kind, True, None)
    return StreamRewriter(request, record, client_model)


def _chunk(choice: dict[str, Any], **extra: Any) -> bytes:
    """A chunk as mlx_lm.server writes it: `json.dumps` with its default separators."""
    body = {
        "id": "chatcmpl-1",
        "system_fingerprint": "fp",
        "object": "chat.completion.chunk",
        "model": "default_model",
        "created": 1,
        "choices": [choice],
        **extra,
    }
    return json.dumps(body).encode()


def _delta(content: Any, finish: str | None = None, role: bool = True) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if content is not ...:
        delta["content"] = content
    return {"index": 0, "finish_reason": finish, "delta": delta}


TRICKY = [
    "plain",
    "",
    'a "quoted" word',
    '"model": "default_model"',
    '"finish_reason": null, "usage": 1',
    '"delta": {"role": "assistant", ',
    "back\\slash and \u00e9 and \U0001f600",
    "\n\n data: [DONE]\n\n",
]


def _both(payloads: list[bytes], kind: Kind = "chat") -> tuple[list[Any], list[Any], int, int]:
    """Each payload through the byte path (where it applies) and through the parsing path only."""
    fast, slow = _rewriter(kind), _rewriter(kind)
    fast_out: list[bytes] = []
    _relay_batch(payloads, fast, 1.0, fast_out)
    slow_out = []
    for payload in payloads:
        chunk = json.loads(payload)
        rewritten = slow.rewrite(chunk, 1.0)
        if rewritten is not None:
            slow_out.append(rewritten)
    parsed = [json.loads(piece.removeprefix(b"data: ").strip()) for piece in fast_out]
    marks = (fast.record.first_token is not None) + len(fast.record.token_gaps)
    slow_marks = (slow.record.first_token is not None) + len(slow.record.token_gaps)
    return parsed, slow_out, marks, slow_marks


def test_token_chunks_rewritten_as_bytes_equal_the_parsed_rewrite() -> None:
    payloads = [_chunk(_delta(text)) for text in TRICKY]
    payloads.append(_chunk(_delta(None)))
    payloads.append(_chunk(_delta(...)))  # a role-only delta
    payloads.append(_chunk(_delta(..., finish="stop")))
    fast, slow, marks, slow_marks = _both(payloads)
    assert fast == slow
    assert marks == slow_marks == len(TRICKY) - 1  # every non-empty content is a token
    # The role once, first; the client's model name everywhere.
    assert [chunk["choices"][0]["delta"].get("role") for chunk in fast].count("assistant") == 1
    assert {chunk["model"] for chunk in fast} == {'speculative/tiny "fast"'}


def test_text_completion_chunks_rewritten_as_bytes_equal_the_parsed_rewrite() -> None:
    payloads = [_chunk({"index": 0, "finish_reason": None, "text": text}, object="text_completion") for text in TRICKY]
    fast, slow, marks, slow_marks = _both(payloads, "completion")
    assert fast == slow
    assert marks == slow_marks == len(TRICKY) - 1


@pytest.mark.parametrize(
    "payload",
    [
        _chunk(_delta("x", finish="length")),  # the final chunk: its finish reason is recorded
        _chunk(_delta("x"), usage={"prompt_tokens": 1}),  # usage: absorbed, maybe withheld
        _chunk({"index": 0, "finish_reason": None, "delta": {"tool_calls": [{"id": "1"}]}}),
        _chunk({"index": 0, "finish_reason": None, "delta": {"role": "tool", "content": "x"}}),
        json.dumps({"model": "default_model", "choices": [_delta("x")]}, separators=(",", ":")).encode(),
        _chunk(_delta("x")).replace(b'"default_model"', b'"other"'),
    ],
)
def test_chunks_that_need_parsing_are_left_to_the_parsing_rewrite(payload: bytes) -> None:
    assert _rewriter().rewrite_token_chunk(payload, 1.0) is None


def test_the_final_and_usage_chunks_still_reach_the_record() -> None:
    rewriter = _rewriter()
    payloads = [
        _chunk(_delta("hi")),
        _chunk(_delta(..., finish="length")),
        _chunk({}, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}).replace(
            b'"choices": [{}]', b'"choices": []'
        ),
        b"[DONE]",
    ]
    out: list[bytes] = []
    assert _relay_batch(payloads, rewriter, 1.0, out)
    assert rewriter.record.finish_reason == "length"
    assert rewriter.record.prompt_tokens == 3
    assert out[-1] == b"data: [DONE]\n\n"


def test_plain_token_chunks_take_the_byte_path() -> None:
    """Without this, the equality tests above would also pass with every chunk parsed."""
    rewriter = _rewriter()
    for text in TRICKY:
        assert rewriter.rewrite_token_chunk(_chunk(_delta(text)), 1.0) is not None, text
    assert rewriter.rewrite_token_chunk(_chunk(_delta(...)), 1.0) == _chunk(
        {"index": 0, "finish_reason": None, "delta": {}}
    ).replace(b'"default_model"', b'"speculative/tiny \\"fast\\""')
