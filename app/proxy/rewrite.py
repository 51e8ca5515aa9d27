"""Validate a client's request body and rewrite it for the backend.

Only the fields the gateway must understand are read; everything else passes through as sent
(unknown fields included). Fields that are load instructions to mlx_lm.server (`model`,
`draft_model`, `adapters`) never reach it. The other fields mlx_lm.server reads are checked in
app/proxy/backend_fields.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from app.errors import InvalidRequest
from app.launcher.prefill import BODY_FIELD as PREFILL_FIELD
from app.profiles import Profile
from app.proxy.backend_fields import check_backend_fields, check_content_part, for_backend
from app.proxy.tools import ToolPlan, forced_opening, messages_for_backend, tool_plan

Kind = Literal["chat", "completion"]

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# mlx_lm.server treats these as "which model to load": never forward what a client sent.
LOAD_FIELDS = ("model", "draft_model", "adapters")
MAX_DRAFT_TOKENS = 64
MAX_TOP_LOGPROBS = 11


@dataclass
class BackendRequest:
    """What the gateway sends upstream, and what it owes the client."""

    kind: Kind
    path: str
    body: dict[str, Any]
    client_streams: bool
    client_wants_usage: bool
    # Non-streaming clients are served from an upstream stream, except where the stream lacks data.
    upstream_streams: bool
    num_draft_tokens: int | None
    max_tokens: int
    # Set when the answer may hold tool calls to parse (a chat request with tools, not tool_choice "none").
    tools: ToolPlan | None = None


def _fail(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _check_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _fail(f"'{name}' must be a boolean, got {type(value).__name__}", name)
    return value


def _check_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(f"'{name}' must be {bound}, got {value}", name)
    return value


def _check_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _fail("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise _fail("'messages' must be a list of message objects", "messages")
    if not messages:
        raise _fail("'messages' must contain at least one message", "messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _fail(f"{where} must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _fail(f"{where}: unknown role {role!r}; expected one of {sorted(CHAT_ROLES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                check_content_part(part, f"{where}.content[{part_index}]")
        elif content is None:
            if role != "assistant" or not message.get("tool_calls"):
                raise _fail(f"{where}: 'content' is required", "messages")
        elif not isinstance(content, str):
            raise _fail(f"{where}: 'content' must be a string or a list of parts", "messages")
    return messages


def _with_system_prompt(messages: list[dict[str, Any]], prompt: str | None) -> list[dict[str, Any]]:
    if prompt is None or any(m.get("role") in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": prompt}, *messages]


def _max_tokens(body: dict[str, Any], profile: Profile) -> int:
    requested = _check_int(body, "max_completion_tokens", 1)
    legacy = _check_int(body, "max_tokens", 1)
    value = requested if requested is not None else legacy
    if value is None:
        value = profile.sampling.max_tokens or profile.max_output_tokens or 512
    # Documented: a request for more than the profile allows is clamped, not refused.
    if profile.max_output_tokens is not None:
        value = min(value, profile.max_output_tokens)
    return value


def build_backend_request(kind: Kind, body: Any, profile: Profile) -> BackendRequest:
    """Validate `body` (already parsed JSON) and produce the backend request for `profile`."""
    if not isinstance(body, dict):
        raise _fail("the request body must be a JSON object")
    check_backend_fields(body)
    client_streams = bool(_check_bool(body, "stream"))
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _fail("'stream_options' must be an object", "stream_options")
    wants_usage = bool(stream_options and stream_options.get("include_usage") is True)
    if _check_int(body, "n", 1, 1) is None and "n" in body and body["n"] is not None:
        raise _fail("'n' must be 1", "n")
    for name in ("logprobs", "echo"):
        _check_bool(body, name)
    # OpenAI allows 20; mlx_lm.server refuses more than 11.
    top_logprobs = _check_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    requested_k = _check_int(body, "num_draft_tokens", 0, MAX_DRAFT_TOKENS)

    # The prefill is the gateway's own instruction to its launcher, never a client's.
    forward = {key: value for key, value in body.items() if key not in LOAD_FIELDS and key != PREFILL_FIELD}
    for_backend(forward)
    tools: ToolPlan | None = None
    if kind == "chat":
        messages = messages_for_backend(_check_messages(body))
        forward["messages"] = _with_system_prompt(messages, profile.system_prompt)
        tools = tool_plan(body)
        # Only specgate's launcher starts an answer with given text; another backend command would
        # ignore the field and the gateway would parse an opening the model never saw.
        if tools is not None and forced_opening(tools) and profile.backend.command is None:
            tools = replace(tools, prefill=forced_opening(tools))
            forward[PREFILL_FIELD] = tools.prefill
        path = "/v1/chat/completions"
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _fail("'prompt' is required and must be a string", "prompt")
        if not prompt:
            # mlx_lm.server's generation thread dies on an empty prompt, failing every request it holds.
            raise _fail("'prompt' must not be empty", "prompt")
        path = "/v1/completions"
    for name, value in profile.sampling.as_request_fields().items():
        forward.setdefault(name, value)
    max_tokens = _max_tokens(body, profile)
    forward.pop("max_completion_tokens", None)
    forward["max_tokens"] = max_tokens
    forward["model"] = "default_model"

    num_draft_tokens: int | None = None
    if profile.is_speculative:
        num_draft_tokens = requested_k if requested_k is not None else profile.default_draft_tokens
        forward["num_draft_tokens"] = num_draft_tokens
    else:
        forward.pop("num_draft_tokens", None)

    # Streaming upstream lets a departed client stop the backend; logprobs only exist unstreamed.
    wants_logprobs = bool(body.get("logprobs")) or bool(top_logprobs)
    upstream_streams = client_streams or not wants_logprobs
    forward["stream"] = upstream_streams
    if upstream_streams:
        # The backend raises on stream_options without include_usage; always ask for usage.
        forward["stream_options"] = {"include_usage": True}
    else:
        forward.pop("stream_options", None)
    return BackendRequest(
        kind=kind,
        path=path,
        body=forward,
        client_streams=client_streams,
        client_wants_usage=wants_usage,
        upstream_streams=upstream_streams,
        num_draft_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        tools=tools,
    )
