"""A fake `mlx_lm.server`: a real HTTP program that speaks its protocol, with failure modes as flags.

Run it the way the supervisor runs a backend (the launcher's command line; unknown `mlx_lm.server`
flags such as `--temp` or `--prompt-cache-size` are accepted and ignored):

    python -m app.testing.fake_backend --model M [--draft-model D] [--num-draft-tokens K] [--dtype X]
                                       --host 127.0.0.1 --port P [failure flags]

It is for fault tests and for measuring the gateway's own overhead; it never stands in for the real
backend where real behaviour (tokens, timing, caching) matters. Stdlib only, so it starts in well under
a second. `--port 0` binds a free port; the startup line on stderr names the port it got.

HTTP surface (mlx_lm.server 0.32.2, `mlx_lm/server.py`; see docs/architecture.md)
  - HTTP/1.0: one request per connection, a stream ends when the socket closes.
  - `GET /health` -> 200 `{"status": "ok"}`; `GET /v1/models[/...]` -> the `--model` value;
    `GET /specgate/stats` -> `{"requests_started", "requests_finished", "tokens_generated",
    "active_requests", "waiting_requests", "requests_disconnected", "peak_concurrent_requests"}` (the
    first four are the launcher's contract; the rest exist only here, for tests of queueing, disconnects
    and a gateway's concurrency limit). `peak_concurrent_requests` is the most requests generating at
    once, counted as each starts, leaving out those whose client had already closed its connection: a
    gateway releases a departed client's slot at once, while this program (like mlx) notices only at its
    next write, so `active_requests` can briefly count requests no gateway still holds.
    A request is *started* when it begins generating (after the `--serial` queue), *finished* when its
    handler ends for any reason; `active = started - finished`.
  - `POST /v1/chat/completions`, `/chat/completions`, `/v1/completions`, streaming or not, with
    mlx's ids (`chatcmpl-<uuid>` / `cmpl-<uuid>`), `object` values, `created`, `system_fingerprint`,
    `model` (the requested value, normally "default_model"), one chunk per token whose delta repeats
    `"role": "assistant"`, a final chunk with an empty delta and the finish reason, then, when
    `stream_options.include_usage` is true, the usage chunk (`"object": "chat.completion"`,
    `"choices": []`, also for text completions) and `data: [DONE]`. `stream_options` without
    `include_usage` breaks the stream after the final chunk (no usage, no `[DONE]`), as in mlx.
  - Errors are `{"error": "<string>"}`: 411 without Content-Length, 400 for invalid JSON, a body that is
    not an object, a parameter that fails mlx's validation, or no `messages` / `prompt`. Request fields
    that would make mlx load another model (`model` other than "default_model" or the `--model` value,
    `draft_model` other than "default_model" or the `--draft-model` value, `adapters` with a model
    other than "default_model") are answered 404, like a load that fails offline: this program loads
    nothing, so a gateway that leaks such a field sees it at once.
  - A non-streaming request runs to the end even if its client left (as in mlx); a streaming one stops
    within a token or two of the client going away (the failed write is caught and counted).

Content rule (`expected_text(body)` computes it; `answer_tokens(body)` gives the tokens)
  The source text is the last `"user"` message's content (a string, or the `"text"` parts of a list,
  joined by spaces) for chat, or the `prompt` (a list of strings is joined by spaces) for completions.
  Token 0 is `"echo"`, tokens 1..n are `" " + word` for the n whitespace-separated words of the source,
  and every later token i is `" t<i>"` (i counted from 0 over all tokens). Generation stops after
  `max_completion_tokens`, else `max_tokens`, else `--max-tokens` (512) tokens with finish_reason
  "length"; or at the first token whose text without its leading space equals one of `stop` (a string
  or list), with finish_reason "stop": like mlx, that token is counted in completion_tokens but its
  text is not sent. Example: `"Hi there"`, max_tokens 5 -> `"echo Hi there t3 t4"`.
  prompt_tokens: chat, the sum over messages of (words + 4) plus 3 (a chat template's overhead);
  text, the number of words (at least 1). cached_tokens is always 0.

Scripted replies (`--reply-text TEXT`, repeatable; for tests of what the gateway does with a model's text)
  A chat request is answered with the N-th `--reply-text`, where N-1 is the number of assistant messages
  in its `messages` (the last one answers every later turn): the first value answers a first turn, the
  second the turn after a tool call, and so on. The reply streams in tokens of 3 characters, then an
  end-of-sequence token (counted, no text) ends it with finish_reason "stop"; `max_tokens` and `stop`
  apply as above. Text completions keep the echo rule.

Speculative statistics (the `"specgate"` key of the usage chunk and of a non-streaming body)
  Without `--draft-model` the draft fields are 0 and the lists empty. With it, k is the request's
  `num_draft_tokens`, else `--num-draft-tokens` (3), and the rounds follow mlx's
  `speculative_generate_step`: round r drafts d = min(k, tokens left) tokens, the pretend target
  accepts a = min(k - r mod (k+1), d) of them (k, k-1, ..., 0, k, ...), and adds one token of its own
  when any are left. Example, k=3 and 10 tokens: rounds draft 3,3,3,1 and accept 3,2,1,0, so
  num_drafts 4, num_draft_tokens 10, num_accepted_tokens 6, drafted_per_position [4, 3, 3],
  accepted_per_position [3, 2, 1]. `speculative_rounds(tokens, k)` gives the (drafted, accepted) pairs.
  prompt_seconds and generation_seconds are measured (request start -> first token -> last token).

Failure modes (flags; they combine)
  --token-delay S          sleep S seconds before each token (a slow model; 0 is the instant mode).
  --first-token-delay S    sleep S seconds before a request's first token, after its response headers (a long
                           prompt being processed), sending nothing meanwhile.
  --start-delay S          sleep S seconds before listening (a slow load). SIGTERM rules apply meanwhile.
  --fail-start             after --start-delay, print a model-load traceback ending in
                           "FileNotFoundError: ... config.json" to stderr and exit 1 without listening.
  --crash-after-tokens N   a request about to generate token N+1 makes the process SIGKILL itself
                           (as the OOM killer would): the socket closes mid-stream, the process is gone.
  --hang-before-headers-on WORD
                           a completion request whose source text has the word WORD wedges the backend (a
                           generation thread stuck): it and every later completion request hang before they
                           send a byte (mlx sends a stream's headers once that thread takes the request);
                           /health and /specgate/stats still answer. The readiness probe ("hi") gets through.
  --hang-in-headers-on WORD
                           the same, but each hung request first sends its status line, not the end of the
                           headers (a head that never completes).
  --hang-after-tokens N    a request about to generate token N+1 stops writing forever; the connection
                           stays open and the process keeps serving other requests.
  --ignore-sigterm         log SIGTERM and keep running (the default, like mlx, dies at once).
  --print-load-event       print `SPECGATE_EVENT {"event": "loaded", "load_seconds": X}` to stdout
                           once listening (the launcher's load event).
  --serial                 one request generates at a time; the others wait, in arrival order, with no
                           bytes sent (mlx_lm.server with a draft model).
  --fail-requests-with S   answer every completion with HTTP status S and `{"error": "..."}`.
  --fail-chat-with S       answer every chat completion (text completions, so the readiness probe, pass) with
                           HTTP status S and an error that quotes the request's text, as backend errors can.
  --reply-text TEXT        answer chat requests with TEXT (see "Scripted replies"); repeat for later turns.
  --record-requests PATH   append each completion request's JSON body to PATH, one line per request (for
                           tests of what a real client sends through the gateway).

Logging: a startup line and one line per completion request (request id, tokens, outcome) on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from functools import cache, cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

DEFAULT_MAX_TOKENS = 512  # mlx_lm.server --max-tokens default
DEFAULT_NUM_DRAFT_TOKENS = 3  # mlx_lm.server --num-draft-tokens default
_JSON = "application/json"
_MARKER = "\x00token\x00"  # no other field of a chunk can contain it


@cache
def system_fingerprint() -> str:
    # mlx's is "<mlx-lm>-<mlx>-<platform>-<gpu arch>"; "fake" in place of the arch says who answered.
    return f"0.32.2-0.32.4-{platform.platform()}-fake"


# ---------------------------------------------------------------------------------------------------
# The content rule and the pretend speculative decoding: pure functions, shared with the tests.


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(str(p) for p in parts)
    return ""


def source_text(body: dict[str, Any]) -> str:
    """The text the answer echoes: the last user message for chat, the prompt for completions."""
    if "messages" in body:
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        return _content_text(users[-1].get("content")) if users else ""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return " ".join(p for p in prompt if isinstance(p, str))
    return prompt if isinstance(prompt, str) else ""


REPLY_TOKEN_CHARS = 3
END_OF_SEQUENCE = ""  # the token that ends a scripted reply: counted, never sent


def scripted_reply(body: dict[str, Any], replies: Sequence[str]) -> str:
    """The `--reply-text` answering `body`: chosen by how many assistant turns it already has."""
    turns = sum(1 for m in body.get("messages") or () if isinstance(m, dict) and m.get("role") == "assistant")
    return replies[min(turns, len(replies) - 1)]


def answer_tokens(body: dict[str, Any], replies: Sequence[str] = ()) -> Iterator[str]:
    """The token stream for `body` (endless unless scripted), before max_tokens and stop words apply."""
    if replies and "messages" in body:
        reply = scripted_reply(body, replies)
        yield from (reply[i : i + REPLY_TOKEN_CHARS] for i in range(0, len(reply), REPLY_TOKEN_CHARS))
        yield END_OF_SEQUENCE
        return
    yield "echo"
    words = source_text(body).split()
    yield from (" " + w for w in words)
    i = len(words) + 1
    while True:
        yield f" t{i}"
        i += 1


def max_tokens_of(body: dict[str, Any], default: int = DEFAULT_MAX_TOKENS) -> int:
    """mlx's precedence: max_completion_tokens, then max_tokens, then the --max-tokens default."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens", default)
    return int(value)


def stop_words_of(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    return [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str)]


def planned_tokens(
    body: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS, replies: Sequence[str] = ()
) -> tuple[list[str], str]:
    """The tokens generated for `body` (a stop token included) and the finish reason."""
    limit = max_tokens_of(body, default_max_tokens)
    stops = set(stop_words_of(body))
    tokens: list[str] = []
    for token in answer_tokens(body, replies):
        if len(tokens) == limit:
            return tokens, "length"
        tokens.append(token)
        if token == END_OF_SEQUENCE or token.lstrip(" ") in stops:
            return tokens, "stop"
    raise AssertionError("answer_tokens ends only with END_OF_SEQUENCE")


def expected_text(
    body: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS, replies: Sequence[str] = ()
) -> str:
    """The text a client receives for `body` (chat content or completion text): see the module doc."""
    tokens, finish_reason = planned_tokens(body, default_max_tokens, replies)
    sent = tokens[:-1] if finish_reason == "stop" else tokens
    return "".join(sent)


def prompt_token_count(body: dict[str, Any]) -> int:
    if "messages" in body:
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        return sum(len(_content_text(m.get("content")).split()) + 4 for m in messages) + 3
    return max(1, len(source_text(body).split()))


@dataclass(frozen=True)
class TokenOrigin:
    """Where a generated token came from: verification round, tokens drafted in it, draft position."""

    round_index: int
    drafted: int
    draft_position: int | None  # None: the target's own token


def accepted_in_round(round_index: int, k: int) -> int:
    # A fixed saw-tooth (k, k-1, ..., 0) so every position sees both accepts and rejects.
    return k - round_index % (k + 1)


def token_origins(max_tokens: int, k: int) -> Iterator[TokenOrigin]:
    """mlx's speculative_generate_step loop, with the pretend acceptance pattern; k=0: no draft."""
    produced, round_index = 0, 0
    while produced < max_tokens:
        drafted = min(k, max_tokens - produced)
        accepted = min(accepted_in_round(round_index, k), drafted)
        for position in range(accepted):
            yield TokenOrigin(round_index, drafted, position)
        produced += accepted
        if produced < max_tokens:
            yield TokenOrigin(round_index, drafted, None)
            produced += 1
        round_index += 1


def speculative_rounds(num_tokens: int, k: int) -> list[tuple[int, int]]:
    """(drafted, accepted) per round for a request that generates `num_tokens` of a max_tokens limit."""
    rounds: dict[int, list[int]] = {}
    for origin in token_origins(num_tokens, k):
        entry = rounds.setdefault(origin.round_index, [origin.drafted, 0])
        entry[1] += origin.draft_position is not None
    return [(d, a) for d, a in rounds.values()]


@dataclass
class SpecTracker:
    """Accumulates the `"specgate"` statistics of one request, token by token."""

    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    _round: int = -1

    def __post_init__(self) -> None:
        self.drafted_per_position = [0] * self.k
        self.accepted_per_position = [0] * self.k

    def record(self, origin: TokenOrigin) -> None:
        if origin.round_index != self._round:
            # Drafting happens at the start of a round, whether or not its tokens are used.
            self._round = origin.round_index
            self.num_drafts += origin.drafted > 0
            self.num_draft_tokens += origin.drafted
            for position in range(origin.drafted):
                self.drafted_per_position[position] += 1
        if origin.draft_position is not None:
            self.num_accepted_tokens += 1
            self.accepted_per_position[origin.draft_position] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "drafted_per_position": list(self.drafted_per_position),
            "accepted_per_position": list(self.accepted_per_position),
        }


# ---------------------------------------------------------------------------------------------------
# Configuration and shared state.


@dataclass(frozen=True)
class Config:
    model: str
    draft_model: str | None
    num_draft_tokens: int
    dtype: str | None
    host: str
    port: int
    max_tokens: int
    token_delay: float
    first_token_delay: float
    start_delay: float
    fail_start: bool
    crash_after_tokens: int | None
    hang_after_tokens: int | None
    hang_before_headers_on: str | None
    hang_in_headers_on: str | None
    ignore_sigterm: bool
    print_load_event: bool
    serial: bool
    fail_requests_with: int | None
    fail_chat_with: int | None
    reply_text: list[str] | None
    record_requests: str | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app.testing.fake_backend", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model")
    parser.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS)
    parser.add_argument("--dtype")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--token-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--first-token-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--start-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--crash-after-tokens", type=int, metavar="N")
    parser.add_argument("--hang-after-tokens", type=int, metavar="N")
    parser.add_argument("--hang-before-headers-on", metavar="WORD")
    parser.add_argument("--hang-in-headers-on", metavar="WORD")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--print-load-event", action="store_true")
    parser.add_argument("--serial", action="store_true")
    parser.add_argument("--fail-requests-with", type=int, metavar="STATUS")
    parser.add_argument("--fail-chat-with", type=int, metavar="STATUS")
    parser.add_argument("--reply-text", action="append", metavar="TEXT")
    parser.add_argument("--record-requests", metavar="PATH")
    return parser


def parse_config(argv: Sequence[str] | None) -> Config:
    # parse_known_args: profiles pass real mlx_lm.server flags (--temp, --prompt-cache-size, ...) through.
    ns, _unknown = build_parser().parse_known_args(argv)
    return Config(**vars(ns))


class Counters:
    """The backend's own request and token counts (`/specgate/stats`), safe across handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(
            ("requests_started", "requests_finished", "tokens_generated", "waiting_requests", "requests_disconnected"),
            0,
        )
        self._peak_concurrent = 0
        self._connections: set[socket.socket] = set()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    @contextmanager
    def generating(self, connection: socket.socket) -> Iterator[None]:
        """Count a request as started (and finished, after), and its place in the concurrency peak."""
        with self._lock:
            self._values["requests_started"] += 1
            self._connections.add(connection)
            # This request too: its client may have left before a handler thread got to it.
            connected = sum(1 for each in self._connections if not _peer_closed(each))
            self._peak_concurrent = max(self._peak_concurrent, connected)
        try:
            yield
        finally:
            with self._lock:
                self._connections.discard(connection)
                self._values["requests_finished"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            values = {**self._values, "peak_concurrent_requests": self._peak_concurrent}
        active = values["requests_started"] - values["requests_finished"]
        # The launcher's four keys first, then this program's extras.
        return {
            "requests_started": values.pop("requests_started"),
            "requests_finished": values.pop("requests_finished"),
            "tokens_generated": values.pop("tokens_generated"),
            "active_requests": active,
            **values,
        }


def _peer_closed(connection: socket.socket) -> bool:
    """Whether the client has closed (or reset) this connection; it sends nothing after its request."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class FifoGate:
    """One holder at a time, granted in arrival order (threading.Lock makes no fairness promise)."""

    def __init__(self, counters: Counters) -> None:
        self._cond = threading.Condition()
        self._counters = counters
        self._next_ticket = 0
        self._serving = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._cond:
            # Counted under the same lock as the ticket: a test that saw waiting_requests rise knows
            # this request's place in the queue is fixed.
            ticket = self._next_ticket
            self._next_ticket += 1
            self._counters.add("waiting_requests")
            self._cond.wait_for(lambda: self._serving == ticket)
            self._counters.add("waiting_requests", -1)
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


_log_lock = threading.Lock()
_record_lock = threading.Lock()


def record_request(path: str, body: Any) -> None:
    """Append `body` to the `--record-requests` file as one JSON line."""
    with _record_lock, open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(body) + "\n")


def log(message: str) -> None:
    # One write per line under a lock: handler threads must not interleave inside a line.
    with _log_lock:
        sys.stderr.write(f"fake_backend: {message}\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------
# Requests.


class UsageOption(Enum):
    NONE = "none"
    INCLUDE = "include"
    BROKEN = "broken"  # stream_options without include_usage: mlx raises KeyError mid-stream


class RequestError(Exception):
    """An error answered before generation, in mlx's `{"error": "<string>"}` shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# mlx's validate_model_parameters: (name in the message, body key, cli default, types, min, max).
_NUMBER = (float, int)
_CHECKS: tuple[tuple[str, str, Any, Any, float | None, float | None], ...] = (
    ("stream", "stream", False, bool, None, None),
    ("temperature", "temperature", 0.0, _NUMBER, 0, None),
    ("top_p", "top_p", 1.0, _NUMBER, 0, 1),
    ("top_k", "top_k", 0, int, 0, None),
    ("min_p", "min_p", 0.0, _NUMBER, 0, 1),
    ("num_draft_tokens", "num_draft_tokens", 0, int, 0, None),
    ("repetition_penalty", "repetition_penalty", 0.0, _NUMBER, 0, None),
    ("repetition_context_size", "repetition_context_size", 20, int, 0, None),
    ("presence_penalty", "presence_penalty", 0.0, _NUMBER, None, None),
    ("presence_context_size", "presence_context_size", 20, int, 0, None),
    ("frequency_penalty", "frequency_penalty", 0.0, _NUMBER, None, None),
    ("frequency_context_size", "frequency_context_size", 20, int, 0, None),
    ("logprobs", "logprobs", False, bool, None, None),
    ("xtc_probability", "xtc_probability", 0.0, float, 0, 1),
    ("xtc_threshold", "xtc_threshold", 0.1, float, 0, 1),
    ("requested_model", "model", "default_model", str, None, None),
)


def _type_names(expected: Any) -> str:
    if isinstance(expected, tuple):
        return str(tuple(t.__name__ for t in expected))
    return str(expected.__name__)


def _check(name: str, value: Any, expected: Any, low: float | None, high: float | None) -> None:
    if not isinstance(value, expected):
        raise RequestError(400, f"{name} must be of type {_type_names(expected)}")
    if low is not None and value < low:
        raise RequestError(400, f"{name} must be at least {low}")
    if high is not None and value > high:
        raise RequestError(400, f"{name} must be at most {high}")


def validate(body: dict[str, Any], max_tokens: Any) -> None:
    """The subset of mlx's checks a gateway can trip over; same messages, same 400."""
    _check("max_tokens", max_tokens, int, 1, None)
    for name, key, default, expected, low, high in _CHECKS:
        _check(name, body.get(key, default), expected, low, high)
    top_logprobs = body.get("top_logprobs", -1)
    if top_logprobs != -1:
        _check("top_logprobs", top_logprobs, int, 0, 11)
    for name, key, expected in (
        ("adapter", "adapters", str),
        ("seed", "seed", int),
        ("logit_bias", "logit_bias", dict),
    ):
        if body.get(key) is not None:
            _check(name, body[key], expected, None, None)


def usage_option(body: dict[str, Any]) -> UsageOption:
    options = body.get("stream_options")
    if options is None:
        return UsageOption.NONE
    if not isinstance(options, dict) or "include_usage" not in options:
        return UsageOption.BROKEN
    return UsageOption.INCLUDE if options["include_usage"] else UsageOption.NONE


@dataclass(frozen=True)
class Completion:
    """One parsed completion request and the fixed parts of every response to it."""

    chat: bool
    body: dict[str, Any]
    stream: bool
    usage: UsageOption
    model: str
    max_tokens: int
    num_draft_tokens: int
    request_id: str | None  # the X-Request-Id header
    response_id: str
    created: int

    @property
    def object_type(self) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if self.stream else "chat.completion"

    def envelope(self, object_type: str | None = None) -> dict[str, Any]:
        # mlx's key order: id, system_fingerprint, object, model, created, choices.
        return {
            "id": self.response_id,
            "system_fingerprint": system_fingerprint(),
            "object": object_type or self.object_type,
            "model": self.model,
            "created": self.created,
        }

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if not self.chat:
            choice["text"] = text
        elif self.stream:
            choice["delta"] = {"role": "assistant", "content": text} if text else {"role": "assistant"}
        else:
            choice["message"] = {"role": "assistant", "content": text or None}
        return choice

    def response(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {**self.envelope(), "choices": [self.choice(text, finish_reason)]}

    def token_event(self, text: str) -> bytes:
        """The SSE event of one streamed token: bytes equal to json.dumps(self.response(text, None))."""
        prefix, suffix = self._token_template
        return b"data: " + prefix + json.dumps(text).encode() + suffix

    @cached_property
    def _token_template(self) -> tuple[bytes, bytes]:
        # Encoding the whole chunk for every token dominated the instant mode's cost: encode it once
        # around a marker and splice each token's text in.
        marker = json.dumps(_MARKER)
        prefix, suffix = json.dumps(self.response(_MARKER, None)).split(marker)
        return prefix.encode(), (suffix + "\n\n").encode()


def parse_completion(path: str, body: Any, request_id: str | None, config: Config) -> Completion:
    if not isinstance(body, dict):
        raise RequestError(400, "Request should be a JSON dictionary")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens", config.max_tokens)
    validate(body, max_tokens)
    chat = path != "/v1/completions"
    if chat and "messages" not in body:
        raise RequestError(400, "Request did not contain messages")
    if not chat and "prompt" not in body:
        raise RequestError(400, "Request did not contain a prompt")
    return Completion(
        chat=chat,
        body=body,
        stream=body.get("stream", False),
        usage=usage_option(body),
        model=body.get("model", "default_model"),
        max_tokens=max_tokens,
        num_draft_tokens=body.get("num_draft_tokens", config.num_draft_tokens),
        request_id=request_id,
        response_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}",
        created=int(time.time()),
    )


def check_load_instructions(request: Completion, config: Config) -> None:
    """404 where mlx would unload its model and load another (ModelProvider.load's key comparison)."""
    model = config.model if request.model == "default_model" else request.model
    # mlx ignores `adapters` for "default_model": the cli adapter mapping wins.
    adapter = None if request.model == "default_model" else request.body.get("adapters")
    draft = request.body.get("draft_model", "default_model")
    draft = config.draft_model if draft == "default_model" else draft
    if (model, adapter, draft) != (config.model, None, config.draft_model):
        raise RequestError(
            404,
            f"fake_backend cannot load models: request asks for model={model!r} adapter={adapter!r} "
            f"draft={draft!r} but serves model={config.model!r} draft={config.draft_model!r}",
        )


# ---------------------------------------------------------------------------------------------------
# Generation.


class Timer:
    """prompt_seconds (start -> first token) and generation_seconds (first -> last token)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start

    def token(self) -> None:
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def as_dict(self) -> dict[str, float]:
        first = self.first if self.first is not None else self.last
        return {"prompt_seconds": round(first - self.start, 6), "generation_seconds": round(self.last - first, 6)}


@dataclass
class Outcome:
    tokens: int = 0
    finish_reason: str | None = None
    result: str = "ok"


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    # A hung handler must not block shutdown; the listen backlog must absorb benchmark bursts
    # (the default of 5 drops SYNs at concurrency 16, which costs a 1 s retransmit).
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.gate: FifoGate | None = FifoGate(self.counters) if config.serial else None
        # Set once a request with the --hang-*-headers-on word came: from then on no completion gets a byte.
        self.wedged = threading.Event()
        super().__init__((config.host, config.port), Handler)

    def serial_slot(self) -> AbstractContextManager[None]:
        return self.gate.hold() if self.gate is not None else nullcontext()


class Handler(BaseHTTPRequestHandler):
    """mlx_lm.server's APIHandler surface, answered from the content rule."""

    protocol_version = "HTTP/1.0"
    server: FakeServer

    # -- plumbing ---------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # Health polls would drown the per-request lines the supervisor's log buffer is meant to show.
        pass

    def _headers(self, status: int, content_type: str = _JSON) -> None:
        self.send_response(status)
        self.send_header("Content-type", content_type)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")

    def _send_json(self, status: int, payload: Any) -> None:
        # Like mlx: no Content-Length, the body ends when the HTTP/1.0 connection closes.
        self._headers(status)
        self.end_headers()
        self.wfile.write(json.dumps(payload).encode())

    def _write_event(self, payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())

    # -- GET / OPTIONS ------------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        self._headers(204)
        self.end_headers()

    def do_GET(self) -> None:
        if self.path.startswith("/v1/models"):
            model = {"id": self.server.config.model, "object": "model", "created": int(time.time())}
            self._send_json(200, {"object": "list", "data": [model]})
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif self.path == "/specgate/stats":
            self._send_json(200, self.server.counters.snapshot())
        else:
            self._not_found()

    def _not_found(self) -> None:
        self._headers(404)
        self.end_headers()
        self.wfile.write(b"Not Found")

    # -- POST ---------------------------------------------------------------------------------------

    def do_POST(self) -> None:
        if self.path not in ("/v1/completions", "/v1/chat/completions", "/chat/completions"):
            self._not_found()
            return
        request_id = self.headers.get("X-Request-Id")
        try:
            request = self._read_request(request_id)
        except RequestError as e:
            log(f"request id={request_id} path={self.path} status={e.status} error={e.message!r}")
            self._send_json(e.status, {"error": e.message})
            return
        self._hang_if_wedged(request)
        self._serve(request)

    def _hang_if_wedged(self, request: Completion) -> None:
        config = self.server.config
        word = config.hang_before_headers_on or config.hang_in_headers_on
        if word is None:
            return
        if word in source_text(request.body).split():
            self.server.wedged.set()
        if self.server.wedged.is_set():
            log(f"request id={request.request_id}: hanging before the end of the headers (wedged)")
            if config.hang_in_headers_on is not None:
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                self.wfile.flush()
            threading.Event().wait()

    def _read_request(self, request_id: str | None) -> Completion:
        config = self.server.config
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length header is required")
        try:
            raw = self.rfile.read(int(length))
        except ValueError:
            raise RequestError(400, "Invalid Content-Length header") from None
        try:
            body = json.loads(raw.decode())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"Invalid JSON in request body: {e}") from None
        if config.record_requests is not None:
            record_request(config.record_requests, body)
        request = parse_completion(self.path, body, request_id, config)
        if config.fail_requests_with is not None:
            raise RequestError(
                config.fail_requests_with, f"fake failure (--fail-requests-with {config.fail_requests_with})"
            )
        if config.fail_chat_with is not None and self.path != "/v1/completions":
            raise RequestError(config.fail_chat_with, f"fake failure on the text {source_text(body)!r}")
        check_load_instructions(request, config)
        return request

    def _serve(self, request: Completion) -> None:
        counters = self.server.counters
        with self.server.serial_slot(), counters.generating(self.connection):
            outcome = Outcome()
            try:
                self._generate(request, outcome)
            except ConnectionError:
                # The client went away (BrokenPipe / ConnectionReset): stop, as mlx does for streams.
                outcome.result = "disconnected"
                counters.add("requests_disconnected")
        log(
            f"request id={request.request_id} path={self.path} stream={request.stream} "
            f"tokens={outcome.tokens} finish={outcome.finish_reason} outcome={outcome.result}"
        )

    def _generate(self, request: Completion, outcome: Outcome) -> None:
        config = self.server.config
        tokens, outcome.finish_reason = planned_tokens(request.body, config.max_tokens, config.reply_text or ())
        if request.stream:
            # Headers only now, after the --serial queue: a queued mlx stream gets no bytes at all.
            self._headers(200, "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
        text, stats = self._produce(request, tokens, outcome)
        if request.stream:
            self._finish_stream(request, outcome, stats)
        else:
            self._send_body(request, text, outcome, stats)

    def _produce(self, request: Completion, tokens: list[str], outcome: Outcome) -> tuple[str, dict[str, Any]]:
        """Generate `tokens` one at a time, streaming each; return the text not yet sent and the stats."""
        k = request.num_draft_tokens if self.server.config.draft_model is not None else 0
        tracker, timer = SpecTracker(k), Timer()
        pieces: list[str] = []
        origins = token_origins(request.max_tokens, k)
        for index, (text, origin) in enumerate(zip(tokens, origins, strict=False)):
            self._before_token(index, request)
            tracker.record(origin)
            timer.token()
            outcome.tokens += 1
            self.server.counters.add("tokens_generated")
            if outcome.finish_reason == "stop" and index == len(tokens) - 1:
                break  # mlx counts the stop token but drops its text
            if request.stream:
                self.wfile.write(request.token_event(text))
            else:
                pieces.append(text)
        stats = {
            "request_id": request.request_id,
            **tracker.as_dict(),
            **self._token_counts(request, outcome),
            **timer.as_dict(),
        }
        return "".join(pieces), stats

    def _before_token(self, index: int, request: Completion) -> None:
        config = self.server.config
        if config.crash_after_tokens is not None and index == config.crash_after_tokens:
            log(f"request id={request.request_id}: crashing after {index} tokens (--crash-after-tokens)")
            os.kill(os.getpid(), signal.SIGKILL)
        if config.hang_after_tokens is not None and index == config.hang_after_tokens:
            log(f"request id={request.request_id}: hanging after {index} tokens (--hang-after-tokens)")
            threading.Event().wait()
        if index == 0 and config.first_token_delay > 0:
            time.sleep(config.first_token_delay)
        if config.token_delay > 0:
            time.sleep(config.token_delay)

    @staticmethod
    def _token_counts(request: Completion, outcome: Outcome) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_token_count(request.body),
            "cached_tokens": 0,
            "generation_tokens": outcome.tokens,
        }

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    def _finish_stream(self, request: Completion, outcome: Outcome, stats: dict[str, Any]) -> None:
        self._write_event(request.response("", outcome.finish_reason))
        if request.usage is UsageOption.BROKEN:
            # mlx evaluates stream_options["include_usage"] here and the handler dies with KeyError.
            outcome.result = "KeyError: 'include_usage'"
            return
        if request.usage is UsageOption.INCLUDE:
            usage = self._usage(stats["prompt_tokens"], outcome.tokens)
            chunk = {**request.envelope("chat.completion"), "choices": [], "usage": usage, "specgate": stats}
            self._write_event(chunk)
        self._write_event("[DONE]")

    def _send_body(self, request: Completion, text: str, outcome: Outcome, stats: dict[str, Any]) -> None:
        body = request.response(text, outcome.finish_reason)
        body["usage"] = self._usage(stats["prompt_tokens"], outcome.tokens)
        body["specgate"] = stats
        data = json.dumps(body).encode()
        self._headers(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------------------------------------------
# Lifecycle.


def install_signal_handlers(config: Config) -> None:
    if not config.ignore_sigterm:
        return  # SIG_DFL: like mlx_lm.server, SIGTERM ends the process at once

    def ignore(signum: int, frame: FrameType | None) -> None:
        log("received SIGTERM, ignoring it (--ignore-sigterm)")

    signal.signal(signal.SIGTERM, ignore)


def fail_start(config: Config) -> int:
    """A model load that fails the way mlx_lm's does for a directory without config.json."""
    path = os.path.join(config.model, "config.json")
    log("--fail-start: pretending the model failed to load")
    sys.stderr.write(
        "Traceback (most recent call last):\n"
        '  File "mlx_lm/utils.py", line 181, in load_config\n'
        '    with open(model_path / "config.json", "r") as f:\n'
        f"FileNotFoundError: [Errno 2] No such file or directory: {path!r}\n"
    )
    sys.stderr.flush()
    return 1


def announce(server: FakeServer, started: float) -> None:
    config = server.config
    host, port = server.server_address[:2]
    log(
        f"listening on http://{host!s}:{port} model={config.model} draft={config.draft_model} "
        f"num_draft_tokens={config.num_draft_tokens} pid={os.getpid()}"
    )
    if config.print_load_event:
        event = {"event": "loaded", "load_seconds": round(time.monotonic() - started, 3)}
        print(f"SPECGATE_EVENT {json.dumps(event)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    config = parse_config(argv)
    install_signal_handlers(config)
    if config.start_delay > 0:
        time.sleep(config.start_delay)
    if config.fail_start:
        return fail_start(config)
    system_fingerprint()  # warmed before listening: the first request should not pay for it
    server = FakeServer(config)
    announce(server, started)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
