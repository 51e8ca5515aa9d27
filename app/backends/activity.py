"""What a backend is doing now, in its own words: the launcher's `GET /specgate/stats`.

The gateway's queue shows what it sent; only the backend knows what it still works on. A prompt whose
client left used to go on being processed for minutes while the gateway showed nothing running
(issue 16), so the status page asks each ready backend, at the moment of asking, and shows its
requests in progress (`prompt 2048/7239`) and the prompts it abandoned.

A backend that does not answer in time, or a backend program without the endpoint (plain
`mlx_lm.server` as a profile's `backend.command`), has no activity: None, never an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from app.backends.process import Backend, BackendState

STATS_PATH = "/specgate/stats"
# The status page refreshes every 2 s; a busy backend answers from a thread of its own in milliseconds.
STATS_TIMEOUT = 1.0
_COUNTERS = (
    "requests_started",
    "requests_finished",
    "tokens_generated",
    "prefills_abandoned",
    "prefill_tokens_skipped",
)


async def read_backend_stats(http: httpx.AsyncClient, backend: Backend) -> dict[str, Any] | None:
    """The backend's `/specgate/stats`, or None when it is not ready or did not answer with a JSON object."""
    if backend.state is not BackendState.READY or backend.port is None:
        return None
    try:
        response = await http.get(backend.base_url + STATS_PATH, timeout=STATS_TIMEOUT)
        stats = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


async def read_activities(http: httpx.AsyncClient, backends: list[Backend]) -> dict[str, dict[str, Any] | None]:
    """`activity` of each backend by name, asked concurrently."""
    stats = await asyncio.gather(*(read_backend_stats(http, backend) for backend in backends))
    return {backend.name: activity(found) for backend, found in zip(backends, stats, strict=True)}


def activity(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The part of a backend's stats that `/status.json` shows: its requests in progress, what they do
    (`doing`, e.g. "prompt 2048/7239"), and its counters (null where the backend does not keep one)."""
    if stats is None:
        return None
    requests = [_request(entry) for entry in stats.get("requests") or () if isinstance(entry, dict)]
    counters = {name: _int(stats.get(name)) for name in _COUNTERS}
    return {"doing": ", ".join(r["doing"] for r in requests) or "idle", "requests": requests, **counters}


def _request(entry: dict[str, Any]) -> dict[str, Any]:
    phase = str(entry.get("phase"))
    processed, total, tokens = (_int(entry.get(key)) for key in ("prompt_processed", "prompt_total", "tokens"))
    if phase == "prompt":
        doing = f"prompt {processed}/{total}"
    elif phase == "generating":
        doing = f"generating, {tokens} tokens"
    else:
        doing = phase
    return {
        "request_id": entry.get("request_id"),
        "phase": phase,
        "prompt_processed": processed,
        "prompt_total": total,
        "tokens": tokens,
        "doing": doing,
    }


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
