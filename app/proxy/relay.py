"""Talk to a backend: open the upstream request, relay its SSE stream, or assemble one answer.

A broken connection or a silence that lasts too long becomes a gateway error through the one table of
foreign exceptions (`from_foreign`, app/errors.py); the backend's own error answers are mapped here
(`map_backend_status`), where their shapes are known.

The stream is relayed per socket read, not per event: events that arrived together are rewritten and
sent to the client in one write. On a real model that is one token per read, as before; when a backend
(or a loaded machine) delivers a burst, the gateway pays its per-write cost (ASGI middleware, a syscall)
once instead of once per token. Silence is bounded per read with one timer, not a task per line.

Before the first token the silence is also cut into `keepalive` steps: each step that ends without a byte
adds a `: waiting` SSE comment to the stream (clients ignore comments; OpenCode and the like then know the
request is alive during minutes of prompt processing on a CPU). The first-token timeout bounds silence,
so a backend that reports prompt progress is not timed out while it makes progress. After the first
token nothing changes: one timer per read.

Prompt progress: mlx_lm.server (0.32.2; the launcher also with a draft model) writes `: keepalive n/m` on a
stream after its headers, once per prefill chunk (`--prefill-step-size`, 2048 tokens) and at the end of the
prompt. The relay passes comment lines on, and names that one for the client: `: prompt n/m`. Only
comment lines take that branch, so the per-token path is unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.backends.connections import BackendEndpoint
from app.errors import (
    BackendDied,
    BackendError,
    BackendTimeout,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    from_foreign,
    outcome_of,
)
from app.proxy import upstream as upstream_http
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest
from app.proxy.toolrelay import ToolCallRelay, parse_message
from app.proxy.upstream import HeadTimeout, UpstreamResponse

logger = logging.getLogger("specgate.requests")

DONE = b"data: [DONE]\n\n"
WAITING = b": waiting"
_MLX_PROGRESS = b": keepalive "  # mlx_lm.server's prompt progress comment, `: keepalive n/m`


@dataclass(frozen=True)
class RelayTimeouts:
    first_token: float
    inactivity: float
    # Seconds between SSE comments while a streaming request waits (queue, backend start, first token).
    keepalive: float = 10.0
    # Seconds a backend may stay silent on every connection while a streamed request waits for its status
    # line (see `open_upstream`).
    head: float = 300.0


def _backend_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace").strip()[:500] or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:500]
    return str(error if error is not None else data)[:500]


def map_backend_status(status: int, raw: bytes, backend: BackendEndpoint) -> GatewayError:
    """mlx_lm.server answers failures with `{"error": "<string>"}` and, before generation, 404."""
    message = _backend_message(raw)
    # Summaries without the backend's text: it can quote the request (GatewayError.summary).
    if "generation thread died" in message:
        backend.note_broken(message)
        died = f"backend {backend.name} lost its generation thread and is restarting"
        return BackendDied(f"{died}: {message}", summary=died)
    if status == 400:
        # mlx_lm.server answers 400 while it reads a request: its own field checks (made by the gateway
        # first: app/proxy/backend_fields.py) and fetching image URLs, whose errors say what an internal
        # address answered (issue 19). So its words stay in the gateway's log, out of the answer.
        logger.warning("backend %s refused a request (HTTP 400): %s", backend.name, message)
        return InvalidRequest("the backend refused the request (HTTP 400); the gateway's log has its reason")
    if status in (404, 411, 413, 422):
        rejected = f"the backend rejected the request (HTTP {status})"
        return InvalidRequest(f"the backend rejected the request: {message}", summary=rejected)
    answered = f"backend {backend.name} answered HTTP {status}"
    return BackendError(f"{answered}: {message}", summary=answered)


def dumps(value: Any) -> bytes:
    """JSON as UTF-8 bytes; orjson for speed, the stdlib for what orjson refuses (integers over 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()


async def open_upstream(
    backend: BackendEndpoint,
    request: BackendRequest,
    request_id: str,
    timeouts: RelayTimeouts,
) -> UpstreamResponse:
    """Send the request; return the open response once the backend has sent a 200 status line.

    The wait for the status line is bounded. mlx_lm.server (0.32.2, `handle_completion`) sends a stream's
    headers as soon as its generation thread takes the request, before the prompt is processed; the
    gateway streams from the backend, so that wait is only the backend's own queue, which admission keeps
    empty unless the backend is still busy with work the gateway gave up on (a prompt whose client left)
    or is hung. A backend that sends nothing on any connection for `timeouts.head` seconds is taken for
    hung: the request fails with 504 and the backend is restarted, so later requests do not hang on it too.
    One busy answering other requests (a batch mlx drains before a request it cannot batch) is not hung:
    the request waits on, up to the first-token bound. A non-streamed upstream request (logprobs) gets its
    headers only with the whole answer, so its bound is the first-token timeout.
    """
    host, port = backend.address
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    heartbeat = backend.heartbeat
    limit = timeouts.head if request.upstream_streams else timeouts.first_token
    cap = max(limit, timeouts.first_token)
    asked = time.monotonic()

    def head_patience() -> float:
        return min(max(asked, heartbeat.last) + limit, asked + cap) - time.monotonic()

    try:
        # Reads after the head are bounded per chunk by the relay (first token vs. between tokens).
        response = await upstream_http.post(
            host,
            port,
            request.path,
            dumps(request.body),
            headers,
            connect=backend.connect,
            head_patience=head_patience,
            heartbeat=heartbeat,
        )
    except HeadTimeout:
        if max(asked, heartbeat.last) + limit <= time.monotonic():
            backend.note_broken(f"no response head for {limit:.0f}s and silent on every connection")
            raise BackendTimeout(
                f"backend {backend.name} sent no response head within {limit:.0f}s and nothing on any other "
                "request; it is being restarted"
            ) from None
        raise BackendTimeout(
            f"backend {backend.name} did not start this request within {cap:.0f}s (busy with other requests)"
        ) from None
    except UpstreamError as error:
        raise from_foreign(error, f"backend {backend.name} is unreachable: {error}") from error
    if response.status_code != 200:
        try:
            raw = await asyncio.wait_for(response.aread(), timeouts.inactivity)
        except (UpstreamError, TimeoutError):
            raw = b""
        finally:
            await response.aclose()
        raise map_backend_status(response.status_code, raw, backend)
    return response


def _payloads(lines: bytes) -> list[bytes]:
    """SSE data payloads (and comment lines, which start with ':') in complete lines."""
    found = []
    for line in lines.split(b"\n"):
        if line.startswith(b"data:"):
            found.append(line[5:].strip())
        elif line.startswith(b":"):
            found.append(line.rstrip(b"\r"))
    return found


async def _sse_batches(
    response: UpstreamResponse, record: RequestRecord, timeouts: RelayTimeouts
) -> AsyncIterator[list[bytes]]:
    """Yield, per socket read, the SSE payloads it completed, bounding the silence between reads."""
    pending = b""
    silent = 0.0  # seconds without a byte before the first token, in whole keep-alive steps
    while True:
        waiting = record.first_token is None
        limit = timeouts.first_token if waiting else timeouts.inactivity
        step = min(timeouts.keepalive, limit - silent) if waiting else limit
        try:
            async with asyncio.timeout(step):
                data = await response.read_some()
        except TimeoutError as error:
            silent += step
            if waiting and silent < limit:
                yield [WAITING]  # cancelling a read loses nothing: the bytes stay in the reader
                continue
            what = "first token" if waiting else "next token"
            silence = f"the backend sent nothing for {limit:.0f}s while waiting for the {what}"
            raise from_foreign(error, silence) from None
        except UpstreamError as error:
            raise from_foreign(error, f"the backend connection broke mid-response: {error}") from error
        silent = 0.0
        if not data:
            if pending.strip():
                yield _payloads(pending)
            return
        pending += data
        cut = pending.rfind(b"\n")
        if cut < 0:
            continue
        complete, pending = pending[: cut + 1], pending[cut + 1 :]
        payloads = _payloads(complete)
        if payloads:
            yield payloads


def _is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return "usage" in chunk and not chunk.get("choices")


def _chunk_has_output(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning") or delta.get("tool_calls")):
            return True
        if choice.get("text"):
            return True
    return False


@dataclass
class StreamRewriter:
    """Turns backend chunks into what the client is owed, recording as it goes."""

    request: BackendRequest
    record: RequestRecord
    client_model: str
    _role_sent: bool = False
    tools: ToolCallRelay | None = field(init=False, default=None)
    # The error that ended a relayed stream (sent to the client as its last event), for the handler.
    failure: GatewayError | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.request.tools is not None:
            self.tools = ToolCallRelay(self.request.tools)

    def absorb_usage(self, chunk: dict[str, Any]) -> None:
        self.record.absorb_usage(chunk.get("usage") or {})
        launcher = chunk.pop("specgate", None)
        if isinstance(launcher, dict):
            self.record.absorb_launcher(launcher)

    def rewrite(self, chunk: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The chunk to send, or None when the client must not see it."""
        chunk["model"] = self.client_model
        if _is_usage_chunk(chunk):
            self.absorb_usage(chunk)
            if not self.request.client_wants_usage:
                return None
            chunk.update(self.record.response_extras())
            # mlx_lm.server labels it "chat.completion" (text streams too); OpenAI's stream chunks say this.
            chunk["object"] = "chat.completion.chunk" if self.request.kind == "chat" else "text_completion"
            return chunk
        if _chunk_has_output(chunk):
            self.record.mark_token(now)  # generation timing counts the backend's tokens, held or not
        if self.tools is not None and not self.tools.rewrite(chunk):
            return None
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.record.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            # mlx repeats the role in every delta; OpenAI sends it once, first.
            if isinstance(delta, dict) and "role" in delta:
                if self._role_sent:
                    del delta["role"]
                else:
                    self._role_sent = True
        return chunk


def sse_error(error: GatewayError) -> bytes:
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def _comment(line: bytes) -> bytes:
    """A backend's SSE comment for the client; mlx_lm.server's prompt progress as `: prompt n/m`."""
    if line.startswith(_MLX_PROGRESS):
        return b": prompt " + line[len(_MLX_PROGRESS) :] + b"\n\n"
    return line + b"\n\n"


def _relay_batch(payloads: list[bytes], rewriter: StreamRewriter, now: float, out: list[bytes]) -> bool:
    """Rewrite one read's events into `out`; True once `[DONE]` is among them."""
    for payload in payloads:
        if payload.startswith(b":"):
            out.append(_comment(payload))
            continue
        if payload == b"[DONE]":
            out.append(DONE)
            return True
        chunk = _parse_chunk(payload)
        if chunk is None:
            continue
        if "error" in chunk and not chunk.get("choices"):
            reported = "the backend reported an error"
            raise BackendError(f"{reported}: {_backend_message(payload)}", summary=reported)
        rewritten = rewriter.rewrite(chunk, now)
        if rewritten is not None:
            out.append(b"data: " + dumps(rewritten) + b"\n\n")
    return False


async def relay_stream(
    response: UpstreamResponse, rewriter: StreamRewriter, timeouts: RelayTimeouts
) -> AsyncIterator[bytes]:
    """Relay SSE one socket read at a time; a backend failure becomes an SSE error event that ends the stream."""
    record = rewriter.record
    finished = False
    out: list[bytes] = []
    try:
        async for payloads in _sse_batches(response, record, timeouts):
            finished = _relay_batch(payloads, rewriter, time.monotonic(), out)
            if out:
                yield b"".join(out)
                out.clear()
            if finished:
                break
        if not finished:
            raise BackendDied("the backend closed the stream before it finished (it may have crashed)")
        record.outcome = "success"
    except GatewayError as error:
        record.outcome = outcome_of(error)
        record.error = error.summary
        rewriter.failure = error
        # Events of the failing read that came before the error still reach the client.
        yield b"".join([*out, sse_error(error)])


def _parse_chunk(payload: bytes | str) -> dict[str, Any] | None:
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:  # the stdlib reads what orjson rejects, such as NaN
            chunk = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    return chunk if isinstance(chunk, dict) else None


@dataclass
class Assembly:
    """A non-streaming answer built from the backend's stream."""

    request: BackendRequest
    first: dict[str, Any] | None = None
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if self.first is None:
            self.first = chunk
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if self.request.kind == "chat" else choice
            if isinstance(delta, dict):
                piece = delta.get("content") if self.request.kind == "chat" else delta.get("text")
                if piece:
                    self.text.append(piece)
                if delta.get("reasoning"):
                    self.reasoning.append(delta["reasoning"])
                for piece in delta.get("tool_calls") or ():
                    self._add_tool_call(piece)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def _add_tool_call(self, piece: Any) -> None:
        """Stream pieces of one call share its `index` (OpenAI): later ones add argument text."""
        index = piece.get("index") if isinstance(piece, dict) else None
        for call in self.tool_calls:
            if index is not None and call.get("index") == index:
                function = call.setdefault("function", {})
                added = (piece.get("function") or {}).get("arguments") or ""
                function["arguments"] = (function.get("arguments") or "") + added
                return
        self.tool_calls.append(piece)

    def body(self, client_model: str, record: RequestRecord) -> dict[str, Any]:
        first = self.first or {}
        text = "".join(self.text)
        if self.request.kind == "chat":
            if self.tool_calls and not text.strip():
                text = ""  # layout around the calls, not an answer
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if self.reasoning:
                message["reasoning"] = "".join(self.reasoning)
            if self.tool_calls:
                # A message's calls carry no stream index (OpenAI's non-streaming shape).
                message["tool_calls"] = [
                    {k: v for k, v in call.items() if k != "index"} if isinstance(call, dict) else call
                    for call in self.tool_calls
                ]
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            obj = "text_completion"
        choice["finish_reason"] = self.finish_reason
        body: dict[str, Any] = {
            "id": first.get("id"),
            "object": obj,
            "created": first.get("created", int(time.time())),
            "model": client_model,
            "system_fingerprint": first.get("system_fingerprint"),
            "choices": [choice],
            "usage": self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        body.update(record.response_extras())
        return body


async def assemble(
    response: UpstreamResponse, rewriter: StreamRewriter, timeouts: RelayTimeouts, client_model: str
) -> dict[str, Any]:
    """Read the whole upstream stream and build a non-streaming answer (raises on failure)."""
    assembly = Assembly(rewriter.request)
    finished = False
    async for payloads in _sse_batches(response, rewriter.record, timeouts):
        now = time.monotonic()
        for payload in payloads:
            finished = payload == b"[DONE]"
            if finished:
                break
            _assemble_one(payload, rewriter, assembly, now)
        if finished:
            break
    if not finished:
        raise BackendDied("the backend closed the connection before the answer was complete (it may have crashed)")
    rewriter.record.finish_reason = assembly.finish_reason
    return assembly.body(client_model, rewriter.record)


def _assemble_one(payload: bytes, rewriter: StreamRewriter, assembly: Assembly, now: float) -> None:
    if payload.startswith(b":"):
        return
    chunk = _parse_chunk(payload)
    if chunk is None:
        return
    if "error" in chunk and not chunk.get("choices"):
        reported = "the backend reported an error"
        raise BackendError(f"{reported}: {_backend_message(payload)}", summary=reported)
    if _is_usage_chunk(chunk):
        rewriter.absorb_usage(chunk)
        assembly.usage = chunk.get("usage")
        return
    rewritten = rewriter.rewrite(chunk, now)
    if rewritten is not None:
        assembly.add(rewritten)


async def read_unstreamed(
    response: UpstreamResponse, rewriter: StreamRewriter, timeouts: RelayTimeouts, client_model: str
) -> dict[str, Any]:
    """A non-streaming upstream answer (only for logprobs, which mlx never streams)."""
    try:
        raw = await asyncio.wait_for(response.aread(), timeouts.first_token)
    except TimeoutError as error:
        raise from_foreign(error, f"no answer from the backend within {timeouts.first_token:.0f}s") from None
    except UpstreamError as error:
        raise from_foreign(error, f"the backend connection broke: {error}") from error
    body = _parse_chunk(raw.decode("utf-8", errors="replace"))
    if body is None:
        raise BackendDied("the backend sent an unreadable answer")
    rewriter.absorb_usage(body)
    now = time.monotonic()
    rewriter.record.mark_token(now)
    choices = body.get("choices") or [{}]
    message = choices[0].get("message")
    plan = rewriter.request.tools
    made_call = plan is not None and isinstance(message, dict) and parse_message(message, plan)
    if made_call and choices[0].get("finish_reason") == "stop":
        choices[0]["finish_reason"] = "tool_calls"
    rewriter.record.finish_reason = choices[0].get("finish_reason")
    body["model"] = client_model
    body.update(rewriter.record.response_extras())
    return body
