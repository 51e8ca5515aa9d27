"""Backend logs over HTTP: the last lines a profile's backend printed, and a live follow (SSE).

    GET /logs/{profile}?lines=N[&format=json]   text/plain, one line per backend line (JSON: a list of objects)
    GET /logs/{profile}/stream?lines=N          text/event-stream: the last N lines, then each new one as it comes

`{profile}` is a profile name or alias (names may contain `/`), or a backend name as `/status.json` lists it.
The buffer belongs to the backend, so profiles that share a backend show the same lines, and it survives
restarts: the crash that ended the previous process is still there to read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from app.backends.logs import BackendLog, LogLine
from app.errors import ModelNotFound
from app.gateway import Gateway

router = APIRouter()
MAX_LINES = 10_000
# An SSE comment this often keeps idle connections open through proxies and lets a gone client be noticed.
KEEPALIVE_SECONDS = 15.0


def find_log(gateway: Gateway, name: str) -> BackendLog:
    profile = gateway.profiles.get(name)
    if profile is not None and profile.local:
        return gateway.pool.slot_for(profile).backend.log
    for slot in gateway.pool.slots.values():
        if slot.backend.name == name:
            return slot.backend.log
    available = ", ".join(sorted(gateway.profiles.names())) or "(none configured)"
    raise ModelNotFound(f"no profile or backend named {name!r}; profiles: {available}", param="profile")


def line_json(line: LogLine) -> dict[str, Any]:
    return {"time": round(line.time, 3), "stream": line.stream, "text": line.text}


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


# Declared before the tail route: `{name:path}` would otherwise take ".../stream" as part of the name.
@router.get("/logs/{name:path}/stream")
async def follow_log(
    name: str, request: Request, lines: int = Query(default=50, ge=0, le=MAX_LINES)
) -> StreamingResponse:
    log = find_log(_gateway(request), name)
    # Subscribe, then copy the tail, with no await between: no line can fall between the two.
    queue = log.subscribe()
    backlog = log.tail(lines)

    async def events() -> AsyncIterator[bytes]:
        try:
            for line in backlog:
                yield _event(line)
            while True:
                try:
                    line = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield _event(line)
        finally:
            log.unsubscribe(queue)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _event(line: LogLine) -> bytes:
    return f"data: {json.dumps(line_json(line), ensure_ascii=False)}\n\n".encode()


@router.get("/logs/{name:path}")
async def tail_log(
    name: str,
    request: Request,
    lines: int = Query(default=200, ge=0, le=MAX_LINES),
    format: str = Query(default="text", pattern="^(text|json)$"),
) -> Response:
    log = find_log(_gateway(request), name)
    tail = log.tail(lines)
    if format == "json":
        return Response(
            json.dumps({"backend": log.name, "lines": [line_json(line) for line in tail]}, ensure_ascii=False),
            media_type="application/json",
        )
    return PlainTextResponse("".join(f"{line.text}\n" for line in tail))
