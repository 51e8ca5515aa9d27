"""A request served by an upstream node (issue 18 item 3): choose a node, forward, relay, retry what is safe.

A specgate node applies its own profile (system prompt, sampling defaults, tool parsing, speculation), and
any OpenAI-compatible server answers in the OpenAI shape already. So the client's body goes on as it came,
with `model` set to the profile's name (a client may have used an alias), and the node's answer comes back
byte for byte: one rewrite, the node's. Two exceptions, both for this gateway's own figures: a streaming
request whose client did not ask for usage is sent with `stream_options.include_usage` and the usage chunk
is dropped on the way back; the node's usage (and `metrics`) feed the record, so /metrics counts tokens.
The client's request id goes to the node as `X-Request-Id` (a specgate node keeps a sane one).

What is sent again, to another node (each node once per request):
- the connection could not be opened (refused, timed out): the node never saw a byte;
- the node answered 429 (its queue is full) or 503 (unavailable: a specgate node answers 503 only before a
  backend took the request: model files absent, backend failed to start, no node of its own);
- the node's connection broke before any answer byte reached the client (non-streaming: always so;
  streaming: only `:` comments relayed so far), and a fresh connection to it is refused: the node is gone,
  and the work it had begun is gone with it (a specgate node's backends do not outlive it), so the request
  runs once. A node that is still there (a broken proxy, a timeout) is not asked twice: the first copy may
  be running.
Never once an answer's first data event has reached the client: that stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from app.backends.nodes import Node, NodePool, node_client
from app.errors import BackendDied, BackendError, BackendTimeout, GatewayError, Outcome, QueueFull, outcome_of
from app.profiles import Profile
from app.proxy.record import RequestRecord
from app.proxy.relay import RelayTimeouts, sse_error

# Paths per request kind (the node's base URL has no /v1).
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
# A node's answers that say it never started the request: safe to send elsewhere.
RETRY_STATUSES = frozenset({429, 503})
# Whether a node whose connection broke is gone: connects refused within PROBE_ATTEMPTS tries (see `_gone`).
PROBE_TIMEOUT = 1.0
PROBE_ATTEMPTS = 5
PROBE_INTERVAL = 0.1


class NoNodeAvailable(BackendError):
    status_code = 503
    code = "no_node_available"


class _TryAnother(Exception):
    """This node did not take the request; the reason is logged and counted, the next node is asked."""


@dataclass
class Forward:
    """One request on its way to a node: what it holds and what it has sent the client."""

    profile: Profile
    kind: str
    body: dict[str, Any]
    record: RequestRecord
    client_wants_usage: bool
    # The conversation's start, hashed: its turns go to the node that holds its prompt cache (app/backends/nodes.py).
    session: str | None = None
    node: Node | None = None
    response: httpx.Response | None = None
    tried: list[Node] = field(default_factory=list)
    relayed_output: bool = False
    ended: bool = False


class NodeForwarder:
    """Serves requests of profiles with `nodes` through the NodePool's choice of node."""

    def __init__(self, nodes: NodePool, timeouts: RelayTimeouts, connect_timeout: float) -> None:
        self.nodes = nodes
        self.timeouts = timeouts
        # A read may wait up to the first-token bound (a node sends comments meanwhile; a plain server may not).
        self.http = node_client(connect_timeout, timeouts.first_token)

    async def close(self) -> None:
        await self.http.aclose()

    def in_flight(self, profile: Profile) -> int:
        return sum(node.in_flight[profile.name] for node in self.nodes.of(profile))

    def prefers_node(self, profile: Profile, local_load: int) -> bool:
        """Whether a request of a profile with a local backend and nodes goes to a node (a shorter queue)."""
        least = self.nodes.least_load(profile)
        return least is not None and least < local_load

    def begin(self, profile: Profile, kind: str, body: dict[str, Any], request_id: str) -> Forward:
        """Admit a request (429 past the profile's `max_queue` of requests in flight to its nodes)."""
        if self.in_flight(profile) >= profile.max_queue:
            raise QueueFull(
                f"profile {profile.name!r} has {profile.max_queue} requests in flight to its nodes; retry later",
                retry_after=1.0,
            )
        streaming = body.get("stream") is True
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        sent = {**body, "model": profile.name}
        if streaming and not wants_usage:
            sent["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        record = RequestRecord(
            request_id=request_id,
            profile=profile.name,
            model=profile.model,
            draft_model=None,
            kind=kind,
            streaming=streaming,
            num_draft_tokens=None,
        )
        return Forward(profile, kind, sent, record, wants_usage, session_key(kind, body))

    # ----- opening: a node, its status line, retries --------------------------------------------

    async def _open(self, forward: Forward) -> httpx.Response:
        """The response of the first node that takes the request (status line read)."""
        last_reason = "no node is up"
        while True:
            node = self.nodes.choose(forward.profile, exclude=forward.tried, session=forward.session)
            if node is None:
                raise NoNodeAvailable(
                    f"no node of profile {forward.profile.name!r} could take the request ({last_reason})",
                    summary=f"no node of profile {forward.profile.name!r} could take the request",
                )
            self._attach(forward, node)
            try:
                return await self._send(forward, node)
            except _TryAnother as reason:
                last_reason = f"{node.url}: {reason}"
                self._detach(forward, retried=True)

    def _attach(self, forward: Forward, node: Node) -> None:
        forward.node = node
        forward.tried.append(node)
        forward.record.node = node.url
        node.in_flight[forward.profile.name] += 1

    def _detach(self, forward: Forward, retried: bool = False) -> None:
        node = forward.node
        if node is None:
            return
        node.in_flight[forward.profile.name] -= 1
        if retried:
            node.figures_for(forward.profile.name).retried += 1
        forward.node = None

    async def _send(self, forward: Forward, node: Node) -> httpx.Response:
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Request-Id": forward.record.request_id,
            **self.nodes.keys.headers(node.url),
        }
        request = self.http.build_request(
            "POST", node.url + PATHS[forward.kind], content=_dumps(forward.body), headers=headers
        )
        forward.record.upstream_started = time.monotonic()
        try:
            response = await self.http.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            node.mark(False, f"cannot connect: {type(error).__name__}")
            raise _TryAnother(f"cannot connect ({type(error).__name__})") from None
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as error:
            # The request may have reached the node: sent again only if the node is gone.
            if await self._gone(node):
                raise _TryAnother(f"it went away before answering ({type(error).__name__})") from None
            raise BackendDied(f"node {node.url} closed the connection before answering") from None
        except httpx.TimeoutException:
            raise BackendTimeout(f"node {node.url} sent no answer within {self.timeouts.first_token:.0f}s") from None
        if response.status_code in RETRY_STATUSES:
            await response.aclose()
            raise _TryAnother(f"it answered HTTP {response.status_code}")
        forward.response = response
        return response

    async def _gone(self, node: Node) -> bool:
        """A fresh connection to the node is refused: its process is gone (not merely slow or cut off).

        Asked a few times over half a second: a process being killed closes its connections and its
        listening socket one after the other, so the first connect may still complete in the kernel's
        backlog of a socket about to close. A node that is alive accepts every time and is never taken
        for gone; one that cannot be reached (a timeout, no route) may still be working: not gone either."""
        parts = urlsplit(node.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for attempt in range(PROBE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    _, writer = await asyncio.open_connection(host, port)
            except ConnectionRefusedError:
                node.mark(False, "connection refused")
                return True
            except (OSError, TimeoutError):
                return False
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return False

    # ----- non-streaming ---------------------------------------------------------------------------

    async def answer(self, forward: Forward) -> tuple[int, bytes]:
        """The node's whole answer (status, body); a body cut short by a node that is gone is asked again."""
        while True:
            response = await self._open(forward)
            node = forward.node
            assert node is not None
            try:
                raw = await response.aread()
            except (httpx.ReadError, httpx.RemoteProtocolError) as error:
                await response.aclose()
                forward.response = None
                if await self._gone(node):
                    self._detach(forward, retried=True)
                    continue
                raise BackendDied(f"node {node.url} broke the connection mid-answer ({type(error).__name__})") from None
            except httpx.TimeoutException:
                raise BackendTimeout(f"node {node.url} went silent for {self.timeouts.first_token:.0f}s") from None
            finally:
                await response.aclose()
            forward.response = None
            if response.status_code == 200:
                forward.record.mark_token(time.monotonic())
                _absorb(forward.record, _parse(raw))
                _finish_reason(forward.record, _parse(raw))
            else:
                forward.record.outcome = _outcome_of_status(response.status_code)
                forward.record.error = f"node {node.url} answered HTTP {response.status_code}"
            return response.status_code, raw

    # ----- streaming -------------------------------------------------------------------------------

    async def stream(self, forward: Forward) -> AsyncIterator[bytes]:
        """The client's event stream: `: waiting` while no node has answered, then the node's events."""
        while True:
            opening = asyncio.ensure_future(self._open(forward))
            try:
                while not opening.done():
                    done, _ = await asyncio.wait((opening,), timeout=self.timeouts.keepalive)
                    if not done:
                        yield b": waiting\n\n"
                response = opening.result()
            except GatewayError as error:
                forward.record.outcome = outcome_of(error)
                forward.record.error = error.summary
                yield sse_error(error)
                return
            finally:
                if not opening.done():
                    opening.cancel()
                    with contextlib.suppress(BaseException):
                        await opening
                    if not opening.cancelled() and opening.exception() is None:
                        await opening.result().aclose()
            node = forward.node
            assert node is not None
            if response.status_code != 200:
                raw = await _read_error(response)
                forward.record.outcome = _outcome_of_status(response.status_code)
                forward.record.error = f"node {node.url} answered HTTP {response.status_code}"
                yield _error_event(raw, response.status_code, node)
                return
            try:
                async for piece in self._relay(forward, response):
                    yield piece
                return
            except (httpx.ReadError, httpx.RemoteProtocolError) as error:
                await response.aclose()
                forward.response = None
                if not forward.relayed_output and await self._gone(node):
                    self._detach(forward, retried=True)
                    continue
                failed: GatewayError = BackendDied(
                    f"node {node.url} broke the stream mid-answer ({type(error).__name__})"
                )
            except httpx.TimeoutException:
                failed = BackendTimeout(f"node {node.url} went silent for {self.timeouts.first_token:.0f}s")
            forward.record.outcome = outcome_of(failed)
            forward.record.error = failed.summary
            yield sse_error(failed)
            return

    async def _relay(self, forward: Forward, response: httpx.Response) -> AsyncIterator[bytes]:
        """The node's events as they come, one write per read; the usage chunk is read (and dropped when
        the client did not ask for it)."""
        record = forward.record
        pending = b""
        done = False
        async for data in response.aiter_bytes():
            pending += data.replace(b"\r\n", b"\n")
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[: cut + 2], pending[cut + 2 :]
            out: list[bytes] = []
            for event in events.split(b"\n\n")[:-1]:
                keep, finished = self._look_at(forward, event, time.monotonic())
                done = done or finished
                if keep:
                    out.append(event + b"\n\n")
            if out:
                yield b"".join(out)
        if pending.strip():
            yield pending
        if not done:
            raise httpx.RemoteProtocolError("the node closed the stream before [DONE]")
        if record.outcome == "unknown":
            record.outcome = "success"

    def _look_at(self, forward: Forward, event: bytes, now: float) -> tuple[bool, bool]:
        """(whether the client gets this event, whether it is the stream's end)."""
        record = forward.record
        data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return True, False  # a comment (`: queued`, `: prompt n/m`) or an empty event
        if data == b"[DONE]":
            return True, True
        forward.relayed_output = True
        chunk = _parse(data)
        if chunk is None:
            return True, False
        if "error" in chunk and not chunk.get("choices"):
            record.outcome = "backend_error"
            record.error = "the node reported an error"
            return True, True  # a specgate node's stream ends with its error event
        if "usage" in chunk and not chunk.get("choices"):
            _absorb(record, chunk)
            return forward.client_wants_usage, False
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if (isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls"))) or (
                isinstance(choice, dict) and choice.get("text")
            ):
                record.mark_token(now)
            if isinstance(choice, dict) and choice.get("finish_reason"):
                record.finish_reason = str(choice["finish_reason"])
        return True, False

    # ----- the end ---------------------------------------------------------------------------------

    async def end(self, forward: Forward, error: BaseException | None) -> None:
        """Release the node (its in-flight count, the connection) and count the outcome; once."""
        if forward.ended:
            return
        forward.ended = True
        if forward.response is not None:
            with contextlib.suppress(Exception):
                await forward.response.aclose()
            forward.response = None
        record = forward.record
        node = forward.node
        if node is not None:
            outcome: Outcome = outcome_of(error) if error is not None else record.outcome
            if outcome == "unknown":
                outcome = "success"  # ended without an error and without a failure recorded on the way
            figures = node.figures_for(forward.profile.name)
            figures.requests[outcome] += 1
            if outcome == "success":
                figures.latency_sum += time.monotonic() - record.arrived
                figures.latency_count += 1
            self._detach(forward)


def session_key(kind: str, body: dict[str, Any]) -> str | None:
    """What identifies a conversation across its turns: its first two messages (the system prompt and the
    first user message: every later turn repeats them), or a text prompt's first 2,000 characters."""
    if kind == "chat":
        messages = body.get("messages")
        start: Any = messages[:2] if isinstance(messages, list) and messages else None
    else:
        prompt = body.get("prompt")
        start = prompt[:2000] if isinstance(prompt, str) and prompt else None
    if start is None:
        return None
    return hashlib.sha256(_dumps(start)).hexdigest()[:32]


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False).encode()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _absorb(record: RequestRecord, body: dict[str, Any] | None) -> None:
    """Tokens (and a specgate node's speculative figures) from a node's usage, for this gateway's /metrics."""
    if body is None:
        return
    usage = body.get("usage")
    if isinstance(usage, dict):
        record.absorb_usage(usage)
    metrics = body.get("metrics")
    spec = metrics.get("speculative_decoding") if isinstance(metrics, dict) else None
    if isinstance(spec, dict):
        record.absorb_node_spec(spec)


def _finish_reason(record: RequestRecord, body: dict[str, Any] | None) -> None:
    choices = body.get("choices") if body is not None else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
        record.finish_reason = str(choices[0]["finish_reason"])


def _outcome_of_status(status: int) -> Outcome:
    if status == 429:
        return "rejected"
    if status == 499:
        return "client_gone"
    return "client_error" if 400 <= status < 500 else "backend_error"


async def _read_error(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await response.aclose()


def _error_event(raw: bytes, status: int, node: Node) -> bytes:
    """A node's error answer as the stream's last event: its own OpenAI error body when it sent one."""
    body = _parse(raw)
    if body is not None and isinstance(body.get("error"), dict):
        return b"data: " + _dumps(body) + b"\n\n"
    error = BackendError(f"node {node.url} answered HTTP {status}")
    return sse_error(error)
