"""The request path: profile -> admission (FIFO) -> backend ready -> upstream -> relay -> record.

A client that leaves at any point stops the work: while queued it leaves the queue, while the
backend starts it stops waiting, otherwise the upstream socket closes: specgate's launcher then stops a
prompt at the end of its current prefill chunk, and mlx_lm.server stops generating within a few tokens.

Streaming requests get their headers once admitted (issue 16 item 2): clients such as OpenCode give up
on a request whose headers take minutes (a long prompt on a CPU). Everything that can refuse a request
outright (bad input 400, unknown model 404, body too large 413, queue full 429, context too long 400)
happens before admission and stays a plain HTTP error. After admission the response is a 200 event
stream at once; while the request waits in the queue (`: queued`), for its backend to start
(`: loading`) or for the first token (`: waiting`, and the launcher's own `: prompt n/m`), an SSE comment
goes out at least every `keepalive` seconds. A later failure (the backend fails to start, dies, the
first-token timeout) is an SSE error event, `data: {"error": {...}}`, that ends the stream; the record
gets the same outcome as before. Non-streaming clients keep the old order: status with the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from app.backends.pool import BackendPool, BackendSlot
from app.errors import (
    BackendDied,
    BodyTooLarge,
    ClientGone,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    Outcome,
    internal_error,
    outcome_of,
)
from app.profiles import Profile, ProfileSet
from app.proxy.backend_fields import check_model_bounds
from app.proxy.context import check_prompt_length, fit_top_k
from app.proxy.forward import Forward, NodeForwarder
from app.proxy.plan import Planner, apply_plan
from app.proxy.record import RequestRecord
from app.proxy.relay import (
    RelayTimeouts,
    StreamRewriter,
    assemble,
    open_upstream,
    read_unstreamed,
    relay_stream,
    sse_error,
)
from app.proxy.rewrite import BackendRequest, Kind, build_backend_request
from app.proxy.upstream import UpstreamResponse
from app.scheduler import Ticket

logger = logging.getLogger("specgate.requests")
T = TypeVar("T")
Observer = Callable[[RequestRecord], None]
# The slot is None for a request served by an upstream node (app/proxy/forward.py).
StartObserver = Callable[[RequestRecord, BackendSlot | None], None]
RefusalObserver = Callable[[Profile | None, Outcome], None]


def request_id_of(request: Request) -> str:
    """The request's id: the edge (app/edge.py) decided it and left it as the one X-Request-Id header."""
    return request.headers["x-request-id"]


@dataclass
class Phase:
    """What an admitted request waits for, named in its keep-alive comments: queued, loading, waiting."""

    name: str = "queued"

    def comment(self) -> bytes:
        return b": " + self.name.encode() + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first.

    `work` runs in the calling task; one watcher task reads `receive` and cancels the caller when the
    disconnect comes. (Running `work` as a task of its own and waiting on both cost a second task and
    asyncio.wait's futures on every request.)
    """
    caller = asyncio.current_task()
    assert caller is not None
    client_gone = False

    async def watch() -> None:
        nonlocal client_gone
        await _wait_disconnect(request)
        client_gone = True
        caller.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not client_gone:
            raise
        caller.uncancel()  # our own cancellation: the client left
        raise ClientGone("the client disconnected") from None
    finally:
        watcher.cancel()


async def read_json_body(request: Request, limit: int) -> Any:
    """Read the body with a size limit (413), then parse it (400) — chunked uploads included."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("the client disconnected while sending the request body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        # Decoded here as UTF-8, strictly: json.loads(bytes) would also take UTF-16 and UTF-32 (and so read
        # a lone surrogate past the check below), and the body goes on to the backend as UTF-8.
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant)
        # Only a \u escape can carry a lone surrogate (strict UTF-8 has none); such a string cannot be sent on.
        if "\\ud" in text.lower():
            _refuse_surrogates(value)
        return value
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"the request body is not valid UTF-8 (at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"invalid JSON in the request body: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except ValueError as error:  # the only other one: an integer over Python's 4300-digit conversion limit
        raise InvalidRequest("a number in the request body has too many digits") from error
    except RecursionError as error:
        raise InvalidRequest("the request body is nested too deeply") from error


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"invalid JSON in the request body: {name} is not a JSON number")


def _refuse_surrogates(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRequest(
                "the request body has a lone UTF-16 surrogate (\\uD800-\\uDFFF) in a string"
            ) from error
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key)
            _refuse_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_surrogates(item)


class CompletionHandler:
    """Serves `/v1/chat/completions` and `/v1/completions` for every profile."""

    def __init__(
        self,
        pool: BackendPool,
        planner: Planner,
        timeouts: RelayTimeouts,
        max_body_bytes: int,
    ) -> None:
        self.pool = pool
        # `auto` draft lengths and routing to a baseline twin under contention (app/adaptive/planner.py).
        self.planner = planner
        self.timeouts = timeouts
        self.max_body_bytes = max_body_bytes
        self.profiles = ProfileSet([])
        self.observers: list[Observer] = []
        self.start_observers: list[StartObserver] = []
        # Called with (profile or None, outcome) for a request refused before it had a record.
        self.refusal_observers: list[RefusalObserver] = []
        # Model value -> local directory (for the prompt-length check); set by the Gateway.
        self.model_dir: Callable[[str], str | None] = lambda value: None
        # Profiles with `nodes` (issue 18 item 3); set by the Gateway.
        self.forwarder: NodeForwarder | None = None

    def profile_for(self, body: Any) -> Profile:
        if not isinstance(body, dict):
            raise InvalidRequest(f"the request body must be a JSON object, not a JSON {type(body).__name__}")
        name = body.get("model")
        if name is None:
            raise InvalidRequest("'model' is required: the name of a profile", param="model")
        if not isinstance(name, str):
            raise InvalidRequest("'model' must be a string", param="model")
        profile = self.profiles.get(name)
        if profile is None:
            available = ", ".join(sorted(self.profiles.names())) or "(none configured)"
            raise ModelNotFound(f"model {name!r} does not exist; available: {available}", param="model")
        return profile

    @contextlib.asynccontextmanager
    async def handle(self, request: Request, kind: Kind) -> AsyncIterator[Response]:
        """The response to a completion request, as a context that the caller sends the response inside.

        A request refused before admission raises here, on entry. Once admitted, the request's slot (its
        ticket) and its upstream socket belong to this context: its exit releases them, whether the
        response's body ran to its end, failed, or never started (a client gone before the body began:
        the server never iterates a body then, so nothing inside the body could be relied on to release).
        The normal ends release from the body itself, before the response's last write, so that a client
        that has read a whole response finds its request in /metrics; the exit then has nothing left to do.
        """
        request_id = request_id_of(request)
        profile: Profile | None = None
        try:
            body = await read_json_body(request, self.max_body_bytes)
            profile = self.profile_for(body)
            forward = self._forward_if_node(profile, kind, body, request_id)
        except Exception as error:
            self._refused(profile, error)
            raise
        if forward is not None:
            async with self._forwarded(request, forward) as response:
                yield response
            return
        try:
            backend_request = build_backend_request(kind, body, profile)
            model_dir = self.model_dir(profile.model)
            await check_model_bounds(profile, model_dir, backend_request.body)
            await check_prompt_length(profile, model_dir, body)
            await fit_top_k(model_dir, backend_request.body)
            client_model = body["model"]
            # The planner decides (k, routing to a twin); apply_plan alone writes the decision (app/proxy/plan.py).
            plan = self.planner.plan(profile, body, backend_request)
            slot = self.pool.slot_for(plan.profile)
            record = RequestRecord(
                request_id=request_id,
                profile=profile.name,
                model=profile.model,
                draft_model=profile.draft_model,
                kind=kind,
                streaming=backend_request.client_streams,
                num_draft_tokens=plan.num_draft_tokens,
            )
            apply_plan(plan, backend_request, record)
            ticket = slot.admission.admit(profile.name, profile.max_queue)
        except Exception as error:
            self._refused(profile, error)
            raise
        exchange = Exchange(slot, ticket, StreamRewriter(backend_request, record, client_model))
        start = partial(self._start, slot, ticket, backend_request, record)
        try:
            if backend_request.client_streams:
                # Headers now; the wait for a slot, the backend and the first token happen in the stream.
                yield StreamingResponse(
                    self._stream(exchange, start),
                    media_type="text/event-stream",
                    headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                )
            else:
                yield JSONResponse(await self._answer(request, exchange, start))
        except BaseException as error:
            if exchange.error is None:
                exchange.error = error
            raise
        finally:
            await self._end(exchange)

    # ----- requests served by an upstream node (app/proxy/forward.py) ---------------------------------

    def _forward_if_node(self, profile: Profile, kind: Kind, body: dict[str, Any], request_id: str) -> Forward | None:
        """The forward of a request that goes to a node: always without a local backend, else when a node's
        queue is shorter than the local backend's (ties stay local: no network hop)."""
        forwarder = self.forwarder
        if not profile.nodes or forwarder is None:
            return None
        if profile.local:
            admission = self.pool.slot_for(profile).admission
            if not forwarder.prefers_node(profile, admission.running + admission.waiting):
                return None
        return forwarder.begin(profile, kind, body, request_id)

    @contextlib.asynccontextmanager
    async def _forwarded(self, request: Request, forward: Forward) -> AsyncIterator[Response]:
        for observe in self.start_observers:
            observe(forward.record, None)
        try:
            if forward.record.streaming:
                yield StreamingResponse(
                    self._forward_stream(forward),
                    media_type="text/event-stream",
                    headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                )
            else:
                assert self.forwarder is not None
                status, raw = await race_disconnect(request, self.forwarder.answer(forward))
                await self._end_forward(forward, None, finished=True)
                yield Response(raw, status_code=status, media_type="application/json")
        except BaseException as error:
            await self._end_forward(forward, error)
            raise
        finally:
            await self._end_forward(forward, None)

    async def _forward_stream(self, forward: Forward) -> AsyncIterator[bytes]:
        assert self.forwarder is not None
        async for piece in self.forwarder.stream(forward):
            yield piece
        await self._end_forward(forward, None, finished=True)

    async def _end_forward(self, forward: Forward, error: BaseException | None, finished: bool = False) -> None:
        if forward.ended:
            return
        if error is None and not finished:
            error = ClientGone("the client left before the response ended")
        assert self.forwarder is not None
        await self.forwarder.end(forward, error)
        self._finish(forward.record, error)

    async def _answer(
        self, request: Request, exchange: Exchange, start: Callable[[Phase], Coroutine[Any, Any, UpstreamResponse]]
    ) -> dict[str, Any]:
        """A non-streaming answer: the backend's whole reply, read while the client waits for its status."""
        rewriter = exchange.rewriter
        exchange.upstream = await race_disconnect(request, start(Phase()))
        read = assemble if rewriter.request.upstream_streams else read_unstreamed
        answer = await race_disconnect(request, read(exchange.upstream, rewriter, self.timeouts, rewriter.client_model))
        await self._end(exchange, finished=True)
        return answer

    async def _start(
        self, slot: BackendSlot, ticket: Ticket, request: BackendRequest, record: RequestRecord, phase: Phase
    ) -> UpstreamResponse:
        for observe in self.start_observers:
            observe(record, slot)
        await slot.admission.wait_turn(ticket)
        record.queue_seconds = ticket.queue_seconds
        phase.name = "loading"
        await self.pool.ensure_ready(slot)
        phase.name = "waiting"
        record.upstream_started = time.monotonic()
        process = slot.backend.process
        try:
            return await open_upstream(slot.backend, request, record.request_id, self.timeouts)
        except BackendDied:
            # No answer at all. If the process it went to has died, the request never reached generation:
            # restart the backend and send it once more. That is the normal fate of requests queued behind
            # a crash (each is handed its slot as soon as the request that saw the crash ends, before the
            # exit is known), and of the first request after a backend was killed while idle.
            if not await slot.backend.has_exited(process):
                raise
            logger.info(
                "request %s: backend %s was gone before it answered; sending the request again once it has restarted",
                record.request_id,
                slot.backend.name,
            )
            phase.name = "loading"
            await self.pool.ensure_ready(slot)
            phase.name = "waiting"
            return await open_upstream(slot.backend, request, record.request_id, self.timeouts)

    async def _stream(
        self, exchange: Exchange, start: Callable[[Phase], Coroutine[Any, Any, UpstreamResponse]]
    ) -> AsyncIterator[bytes]:
        """The body of a streaming response. It holds nothing of its own: the start it begins and the
        upstream it opens are the exchange's, which `handle`'s context releases on every way out."""
        record = exchange.record
        phase = Phase()
        starting = exchange.starting = asyncio.ensure_future(start(phase))
        try:
            while exchange.upstream is None:  # queued, loading, connecting: a sign of life every keep-alive step
                done, _ = await asyncio.wait((starting,), timeout=self.timeouts.keepalive)
                if done:
                    exchange.upstream = starting.result()
                else:
                    yield phase.comment()
        except GatewayError as failed:
            # The headers are out: the failure is the stream's last event (outcome recorded as before).
            exchange.error = failed
            yield sse_error(failed)
            await self._end(exchange)
            return
        except Exception as bug:
            logger.exception("unexpected error starting request %s", record.request_id)
            exchange.error = bug
            yield sse_error(internal_error(bug))
            await self._end(exchange)
            return
        async for piece in relay_stream(exchange.upstream, exchange.rewriter, self.timeouts):
            yield piece
        await self._end(exchange, finished=True)

    async def _end(self, exchange: Exchange, finished: bool = False) -> None:
        """Release what the request holds, once: its start, its upstream socket (closing it is what stops
        mlx_lm.server from generating), then its slot; then record how it ended. `finished`: the response
        was produced to its end; an end without it or an error is a client that left."""
        if exchange.ended:
            return
        exchange.ended = True
        record = exchange.record
        error = exchange.error
        if error is None and not finished:
            error = ClientGone("the client left before the response ended")
        try:
            upstream = exchange.upstream
            if upstream is None and exchange.starting is not None:
                upstream = await _abandon(exchange.starting)
            if upstream is not None:
                await upstream.aclose()
        finally:
            # Asked before the slot is handed on, so the next request restarts a dead backend (issue 19 item 10).
            _notice_backend_failure(exchange.slot, error if error is not None else exchange.rewriter.failure)
            exchange.slot.admission.release(exchange.ticket)
            exchange.slot.backend.touch()
            if error is None and record.outcome in ("success", "unknown"):
                exchange.slot.backend.mark_served()
            self._finish(record, error)

    def _refused(self, profile: Profile | None, error: Exception) -> None:
        """Refused before it was queued: no record, but /metrics still counts it by outcome."""
        outcome = outcome_of(error)
        for observe in self.refusal_observers:
            try:
                observe(profile, outcome)
            except Exception:
                logger.exception("refusal observer failed")

    def _finish(self, record: RequestRecord, error: BaseException | None) -> None:
        record.finished = time.monotonic()
        if error is not None:
            record.outcome = outcome_of(error)
            if isinstance(error, GatewayError) and record.outcome != "client_gone":
                record.error = error.summary
            elif record.outcome == "internal_error":
                # The type only: an exception's text or repr can hold the request (a UnicodeEncodeError
                # holds the whole string it failed on), and records are shown to everyone (/status.json).
                record.error = internal_error(error).message
        elif record.outcome == "unknown":
            record.outcome = "success"
        record.seal()
        logger.info("%s", record.log_line())
        for observe in self.observers:
            try:
                observe(record)
            except Exception:
                logger.exception("request observer failed")
        record.drop_token_gaps()


@dataclass
class Exchange:
    """What one admitted request holds, released once by `CompletionHandler._end`: its slot (the ticket),
    the start under way (queue, backend start, connect), the upstream response (its socket)."""

    slot: BackendSlot
    ticket: Ticket
    rewriter: StreamRewriter
    starting: asyncio.Future[UpstreamResponse] | None = None
    upstream: UpstreamResponse | None = None
    error: BaseException | None = None
    ended: bool = False

    @property
    def record(self) -> RequestRecord:
        return self.rewriter.record


async def _abandon(starting: asyncio.Future[UpstreamResponse]) -> UpstreamResponse | None:
    """Stop a start the stream no longer waits for; the upstream it opened anyway, if it did, to close."""
    if not starting.done():
        starting.cancel()  # leaves the queue, or stops waiting for the backend
        with contextlib.suppress(BaseException):
            await starting
    if starting.cancelled() or starting.exception() is not None:
        return None
    return starting.result()


def _notice_backend_failure(slot: BackendSlot, error: BaseException | None) -> None:
    """A request that failed because its backend's connection broke (it died, most likely) asks whether the
    backend is gone before it releases its slot: then the request it hands the slot to restarts the backend
    rather than being sent to the dead process (issue 19 item 10). A synchronous check, only on failure."""
    if isinstance(error, BackendDied):
        slot.backend.notice_if_gone()
