"""A request's slot and upstream socket are released by the code that took them (app/proxy/handler.py,
`CompletionHandler.handle`'s context), on every way out, a streaming body that never started included.

The gateway here is the real app (create_app, its lifespan, the fake backend program as a real process),
driven in this test's event loop through ASGI, because the case under test is a moment no HTTP client can
pick reliably: the client leaves while the response's headers are still being written, so the server never
starts the body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message

from app.gateway import Gateway
from app.profiles import ProfileSet, parse_profiles
from app.server import create_app
from app.settings import Settings
from tests.harness import chat, fake_model_dir, fake_profile

# A bound on a hang (a leaked slot makes the next request wait for ever), never a measure of speed.
HANG = 60.0


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """The ASGI lifespan, as a server runs it: startup before the requests, shutdown after."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def send(message: Message) -> None:
        await outbox.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), HANG))["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), HANG))["type"] == "lifespan.shutdown.complete"
        await task


def http_scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }  # fmt: skip


async def serve_one(app: ASGIApp, body: bytes) -> tuple[int, bytes]:
    """A client that reads the whole response."""
    sent: list[Message] = []
    given = False
    forever = asyncio.Event()

    async def receive() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(http_scope(body), receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_stream_whose_body_never_started_releases_its_slot(tmp_path: Path) -> None:
    # One request at a time, and one request of the profile running or queued (max_queue 1): a request that
    # kept its ticket would make the next one queue for ever, or be refused with 429.
    profiles = ProfileSet(parse_profiles(fake_profile("one", fake_model_dir(tmp_path), max_queue=1)))
    settings = Settings(profiles_dir=tmp_path, model_store=tmp_path / "store")
    edge = create_app(settings, profiles)
    gateway = edge.app.app.state.gateway
    assert isinstance(gateway, Gateway)
    body = json.dumps(chat("gone before the body", "one", max_tokens=5, stream=True)).encode()
    outcomes: list[str] = []
    gateway.handler.observers.append(lambda record: outcomes.append(record.outcome))

    async def scenario() -> None:
        async with lifespan(edge):
            headers_begun = asyncio.Event()
            client_gone = asyncio.Event()
            given = False

            async def receive() -> Message:
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await client_gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                assert message["type"] == "http.response.start", "the body must never start in this test"
                headers_begun.set()
                await asyncio.Event().wait()  # the headers never leave: the client is gone

            first = asyncio.create_task(edge(http_scope(body), receive, send))
            await asyncio.wait_for(headers_begun.wait(), HANG)
            admission = gateway.pool.slots[profiles.profiles["one"].backend_spec].admission
            assert admission.profile_count("one") == 1  # admitted: the request holds its ticket
            client_gone.set()
            await asyncio.wait_for(first, HANG)
            assert admission.profile_count("one") == 0
            assert (admission.running, admission.waiting) == (0, 0)

            status, answer = await asyncio.wait_for(
                serve_one(edge, json.dumps(chat("next", "one", max_tokens=3, stream=True)).encode()), HANG
            )
            assert status == 200
            assert answer.rstrip().endswith(b"data: [DONE]"), answer[-300:]
            assert b'"error"' not in answer
            assert outcomes == ["client_gone", "success"]

    asyncio.run(scenario())
