"""Talk to a backend: open the upstream request, relay its SSE stream, or assemble one answer.

Every low-level failure (httpx, the backend's own error shapes) is mapped to the gateway's
errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.backends.process import Backend
from app.errors import BackendDied, BackendError, BackendTimeout, GatewayError, InvalidRequest, error_body
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class RelayTimeouts:
    first_token: float
    inactivity: float


def _backend_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", errors="replace").strip()[:500] or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))[:500]
    return str(error if error is not None else data)[:500]


def map_backend_status(status: int, raw: bytes, backend: Backend) -> GatewayError:
    """mlx_lm.server answers failures with `{"error": "<string>"}` and, before generation, 404."""
    message = _backend_message(raw)
    if "generation thread died" in message:
        backend.note_broken(message)
        return BackendDied(f"backend {backend.name} lost its generation thread and is restarting: {message}")
    if status in (400, 404, 411, 413, 422):
        return InvalidRequest(f"the backend rejected the request: {message}")
    return BackendError(f"backend {backend.name} answered HTTP {status}: {message}")


async def open_upstream(
    http: httpx.AsyncClient,
    backend: Backend,
    request: BackendRequest,
    request_id: str,
    timeouts: RelayTimeouts,
) -> httpx.Response:
    """Send the request; return the open response once the backend has sent a 200 status line."""
    content = json.dumps(request.body, ensure_ascii=False).encode()
    upstream = http.build_request(
        "POST",
        backend.base_url + request.path,
        content=content,
        headers={"content-type": "application/json", "x-request-id": request_id},
        # Reads are bounded per chunk by the relay (first token vs. between tokens), not here.
        timeout=httpx.Timeout(connect=10.0, read=None, write=30.0, pool=10.0),
    )
    try:
        response = await http.send(upstream, stream=True)
    except httpx.TransportError as error:
        raise BackendDied(f"backend {backend.name} is unreachable: {type(error).__name__}: {error}") from error
    if response.status_code != 200:
        try:
            raw = await asyncio.wait_for(response.aread(), timeouts.inactivity)
        except (httpx.TransportError, TimeoutError):
            raw = b""
        finally:
            await response.aclose()
        raise map_backend_status(response.status_code, raw, backend)
    return response


async def _sse_events(response: httpx.Response, record: RequestRecord, timeouts: RelayTimeouts) -> AsyncIterator[str]:
    """Yield SSE data payloads (and comments, prefixed ':'), bounding the silence between them."""
    lines = response.aiter_lines()
    while True:
        limit = timeouts.first_token if record.first_token is None else timeouts.inactivity
        try:
            line = await asyncio.wait_for(anext(lines), limit)
        except StopAsyncIteration:
            return
        except TimeoutError:
            what = "first token" if record.first_token is None else "next token"
            raise BackendTimeout(f"the backend sent nothing for {limit:.0f}s while waiting for the {what}") from None
        except httpx.TransportError as error:
            raise BackendDied(f"the backend connection broke mid-response: {type(error).__name__}") from error
        if line.startswith("data:"):
            yield line[5:].strip()
        elif line.startswith(":"):
            yield line


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
            return chunk
        if _chunk_has_output(chunk):
            self.record.mark_token(now)
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


async def relay_stream(
    response: httpx.Response, rewriter: StreamRewriter, timeouts: RelayTimeouts
) -> AsyncIterator[bytes]:
    """Relay SSE chunk by chunk; a backend failure becomes an SSE error event that ends the stream."""
    record = rewriter.record
    finished = False
    try:
        async for payload in _sse_events(response, record, timeouts):
            if payload.startswith(":"):
                yield payload.encode() + b"\n\n"
                continue
            if payload == "[DONE]":
                finished = True
                yield DONE
                break
            chunk = _parse_chunk(payload)
            if chunk is None:
                continue
            if "error" in chunk and not chunk.get("choices"):
                raise BackendError(f"the backend reported an error: {_backend_message(payload.encode())}")
            out = rewriter.rewrite(chunk, time.monotonic())
            if out is not None:
                yield b"data: " + json.dumps(out, ensure_ascii=False).encode() + b"\n\n"
        if not finished:
            raise BackendDied("the backend closed the stream before it finished (it may have crashed)")
        record.outcome = "success"
    except GatewayError as error:
        record.outcome = "backend_error"
        record.error = error.message
        yield sse_error(error)


def _parse_chunk(payload: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(payload)
    except json.JSONDecodeError:
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
                if delta.get("tool_calls"):
                    self.tool_calls.extend(delta["tool_calls"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def body(self, client_model: str, record: RequestRecord) -> dict[str, Any]:
        first = self.first or {}
        text = "".join(self.text)
        if self.request.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if self.reasoning:
                message["reasoning"] = "".join(self.reasoning)
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
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
    response: httpx.Response, rewriter: StreamRewriter, timeouts: RelayTimeouts, client_model: str
) -> dict[str, Any]:
    """Read the whole upstream stream and build a non-streaming answer (raises on failure)."""
    assembly = Assembly(rewriter.request)
    finished = False
    async for payload in _sse_events(response, rewriter.record, timeouts):
        if payload.startswith(":"):
            continue
        if payload == "[DONE]":
            finished = True
            break
        chunk = _parse_chunk(payload)
        if chunk is None:
            continue
        if "error" in chunk and not chunk.get("choices"):
            raise BackendError(f"the backend reported an error: {_backend_message(payload.encode())}")
        if _is_usage_chunk(chunk):
            rewriter.absorb_usage(chunk)
            assembly.usage = chunk.get("usage")
            continue
        rewriter.rewrite(chunk, time.monotonic())
        assembly.add(chunk)
    if not finished:
        raise BackendDied("the backend closed the connection before the answer was complete (it may have crashed)")
    rewriter.record.finish_reason = assembly.finish_reason
    return assembly.body(client_model, rewriter.record)


async def read_unstreamed(
    response: httpx.Response, rewriter: StreamRewriter, timeouts: RelayTimeouts, client_model: str
) -> dict[str, Any]:
    """A non-streaming upstream answer (only for logprobs, which mlx never streams)."""
    try:
        raw = await asyncio.wait_for(response.aread(), timeouts.first_token)
    except TimeoutError:
        raise BackendTimeout(f"no answer from the backend within {timeouts.first_token:.0f}s") from None
    except httpx.TransportError as error:
        raise BackendDied(f"the backend connection broke: {type(error).__name__}") from error
    body = _parse_chunk(raw.decode("utf-8", errors="replace"))
    if body is None:
        raise BackendDied("the backend sent an unreadable answer")
    rewriter.absorb_usage(body)
    now = time.monotonic()
    rewriter.record.mark_token(now)
    choices = body.get("choices") or [{}]
    rewriter.record.finish_reason = choices[0].get("finish_reason")
    body["model"] = client_model
    body.update(rewriter.record.response_extras())
    return body


def error_payload(error: GatewayError) -> dict[str, Any]:
    return error_body(error.message, error.error_type, error.param, error.code)
