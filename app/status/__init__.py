"""The status page (`/`, one self-contained HTML file) and the JSON it polls (`/status.json`).

Figures come from `RecentRequests`, a handler observer that keeps the last finished RequestRecords in
a bounded deque and the requests in flight (whose tokens so far give a live tokens/sec); states, pids and
queues come from the pool at the moment of asking; memory is the backend process's resident set from
/proc (None where there is no /proc); what each ready backend works on (its requests in progress, a
prompt's progress, abandoned prefills) from the backend itself (app/backends/activity.py).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections import deque
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from app.backends.activity import read_activities
from app.backends.pool import BackendSlot
from app.errors import Outcome
from app.gateway import Gateway
from app.proxy.record import RequestRecord

router = APIRouter()
# Per-profile figures are taken over this many of its latest finished requests.
PROFILE_WINDOW = 50
_FAILED_OUTCOMES: frozenset[Outcome] = frozenset({"backend_error", "internal_error"})


class RecentRequests:
    """The last `capacity` finished requests and every request in flight (a handler observer pair)."""

    def __init__(self, capacity: int = 500) -> None:
        self.finished: deque[RequestRecord] = deque(maxlen=capacity)
        # Keyed by object identity: a client may reuse an X-Request-Id, and records are not hashable.
        self.in_flight: dict[int, RequestRecord] = {}

    def on_start(self, record: RequestRecord, slot: BackendSlot | None) -> None:
        self.in_flight[id(record)] = record

    def on_finish(self, record: RequestRecord) -> None:
        self.in_flight.pop(id(record), None)
        self.finished.append(record)

    def install(self, gateway: Gateway) -> None:
        gateway.handler.start_observers.append(self.on_start)
        gateway.handler.observers.append(self.on_finish)


def read_rss_bytes(pid: int | None) -> int | None:
    """Resident memory of one process (the launcher holds the model weights itself)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """The direct children of a process, from /proc (none where there is no /proc)."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                data = stat.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain anything: the parent pid follows the last ')'.
        if int(data[data.rfind(b")") + 2 :].split()[1]) == pid:
            children.append(int(entry))
    return children


def backend_rss_bytes(pid: int | None, distributed: bool) -> int | None:
    """Resident memory of a backend: its process, plus, for a distributed one, its local ranks (the children
    of mlx.launch, which hold the weights; remote ranks are not counted)."""
    total = read_rss_bytes(pid)
    if pid is None or total is None or not distributed:
        return total
    return total + sum(read_rss_bytes(child) or 0 for child in child_pids(pid))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def record_json(record: RequestRecord, now: float) -> dict[str, Any]:
    spec = record.spec
    finished = record.finished if record.finished is not None else now
    return {
        "request_id": record.request_id,
        "profile": record.profile,
        "kind": record.kind,
        "streaming": record.streaming,
        "outcome": record.outcome,
        "finish_reason": record.finish_reason,
        "error": record.error,
        # Wall-clock time of the end, from the monotonic clock the record uses.
        "finished_at": round(time.time() - (now - finished), 3),
        "age_seconds": round(now - finished, 2),
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "disk_cached_tokens": record.disk_cached_tokens,
        "generation_tokens": record.generation_tokens,
        "queue_ms": _ms(record.queue_seconds),
        "ttft_ms": _ms(record.ttft),
        "e2e_ms": _ms(record.e2e),
        "tokens_per_second": _round(record.decode_tokens_per_second, 2),
        "num_draft_tokens": record.num_draft_tokens,
        "draft_tokens": spec.num_draft_tokens if spec else None,
        "accepted_tokens": spec.num_accepted_tokens if spec else None,
        "acceptance_rate": _round(spec.acceptance_rate, 4) if spec else None,
        "mean_acceptance_length": _round(spec.mean_acceptance_length, 3) if spec else None,
    }


def live_json(record: RequestRecord, now: float, in_backend: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request still running: tokens so far (one per chunk with output) and its rate so far; with
    `in_backend` (the backend's own entry for it), its prompt progress."""
    tokens = 0 if record.first_token is None else len(record.token_gaps) + 1
    rate = None
    if record.first_token is not None and record.last_token is not None and tokens >= 2:
        span = record.last_token - record.first_token
        rate = (tokens - 1) / span if span > 0 else None
    return {
        "request_id": record.request_id,
        "profile": record.profile,
        "age_seconds": round(now - record.arrived, 2),
        "phase": "queued" if record.upstream_started is None else "prompt" if tokens == 0 else "generating",
        "tokens": tokens,
        "tokens_per_second": _round(rate, 2),
        "ttft_ms": _ms(record.ttft),
        "prompt_processed": in_backend["prompt_processed"] if in_backend else None,
        "prompt_total": in_backend["prompt_total"] if in_backend else None,
    }


def profile_figures(records: list[RequestRecord]) -> dict[str, Any]:
    """Figures over a profile's recent finished requests. Acceptance is pooled (sum / sum), as PromQL's is."""
    served = [r for r in records if r.outcome == "success"]
    ttfts = [r.ttft for r in served if r.ttft is not None]
    speeds = [r.decode_tokens_per_second for r in served if r.decode_tokens_per_second is not None]
    drafted = sum(r.spec.num_draft_tokens for r in served if r.spec)
    accepted = sum(r.spec.num_accepted_tokens for r in served if r.spec)
    drafts = sum(r.spec.num_drafts for r in served if r.spec)
    last = served[-1] if served else None
    return {
        "requests": len(records),
        "served": len(served),
        "failed": sum(1 for r in records if r.outcome in _FAILED_OUTCOMES),
        "rejected": sum(1 for r in records if r.outcome == "rejected"),
        "generation_tokens": sum(r.generation_tokens for r in served),
        "ttft_ms_median": _ms(statistics.median(ttfts)) if ttfts else None,
        "tokens_per_second_mean": _round(statistics.fmean(speeds), 2) if speeds else None,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": _round(accepted / drafted, 4) if drafted else None,
        "mean_acceptance_length": _round(1.0 + accepted / drafts, 3) if drafts else None,
        "last": {
            "request_id": last.request_id,
            "ttft_ms": _ms(last.ttft),
            "tokens_per_second": _round(last.decode_tokens_per_second, 2),
            "acceptance_rate": _round(last.spec.acceptance_rate, 4) if last.spec else None,
            "generation_tokens": last.generation_tokens,
        }
        if last is not None
        else None,
    }


def backend_json(slot: BackendSlot, now: float, activity: dict[str, Any] | None = None) -> dict[str, Any]:
    backend = slot.backend
    running = backend.is_running
    return {
        "name": backend.name,
        "state": backend.state.value,
        "model": backend.spec.model,
        "draft_model": backend.spec.draft_model,
        "dtype": backend.spec.dtype,
        "profiles": list(slot.profiles),
        "pid": backend.pid if running else None,
        "port": backend.port if running else None,
        "rss_bytes": backend_rss_bytes(backend.pid, backend.spec.distributed is not None) if running else None,
        "load_seconds": _round(backend.load_seconds, 2),
        "blas": backend.blas_summary,
        "blas_detail": backend.blas,
        # Several MLX ranks: placement and the exact mlx.launch command (null for one process).
        "distributed": backend.distributed_info(),
        "uptime_seconds": round(now - backend.ready_at, 1)
        if backend.ready_at is not None and backend.state.value == "ready"
        else None,
        "idle_seconds": round(now - backend.last_used, 1),
        "ttl_seconds": slot.ttl,
        "running": slot.admission.running,
        "waiting": slot.admission.waiting,
        "restarts": backend.crashes.total_restarts,
        "failure": backend.failure,
        # The backend's own account (null when not ready or silent): requests in progress and what they
        # do ("prompt 2048/7239"), and prompts abandoned because their client left.
        "activity": activity,
    }


class StatusBuilder:
    def __init__(self, gateway: Gateway, recent: RecentRequests) -> None:
        self.gateway = gateway
        self.recent = recent
        self.started = time.monotonic()

    async def read_activities(self) -> dict[str, dict[str, Any] | None]:
        backends = [slot.backend for slot in self.gateway.pool.slots.values()]
        return await read_activities(self.gateway.http, backends)

    def build(self, request_limit: int, activities: dict[str, dict[str, Any] | None] | None = None) -> dict[str, Any]:
        now = time.monotonic()
        gateway = self.gateway
        activities = activities or {}
        finished = list(self.recent.finished)
        live = list(self.recent.in_flight.values())
        in_backends = {
            entry["request_id"]: entry
            for activity in activities.values()
            if activity is not None
            for entry in activity["requests"]
        }
        profiles = []
        for name in gateway.profiles.names():
            info = gateway.describe_profile(name)
            mine = [r for r in finished if r.profile == name][-PROFILE_WINDOW:]
            profiles.append(
                {
                    "name": name,
                    "display_name": info["name"],
                    "state": info["state"],
                    "detail": info.get("detail"),
                    "model": info["model"],
                    "draft_model": info["draft_model"],
                    "num_draft_tokens": info["num_draft_tokens"],
                    # `auto` profiles: the k in use per prompt class and the estimates behind it.
                    "adaptive": gateway.planner.explain(name),
                    "backend": info["backend"]["name"],
                    "running": info["backend"]["running"],
                    "waiting": info["backend"]["waiting"],
                    "figures": profile_figures(mine),
                    # Profiles with `nodes`: each node's health, queue and this gateway's requests to it.
                    "nodes": info.get("nodes"),
                    "live": [live_json(r, now, in_backends.get(r.request_id)) for r in live if r.profile == name],
                }
            )
        return {
            "time": round(time.time(), 3),
            "uptime_seconds": round(now - self.started, 1),
            "window": PROFILE_WINDOW,
            "profiles": profiles,
            "backends": [
                backend_json(slot, now, activities.get(slot.backend.name)) for slot in gateway.pool.slots.values()
            ],
            "requests": [record_json(r, now) for r in reversed(finished[-request_limit:])] if request_limit else [],
        }


def install_status(app: Any, gateway: Gateway) -> StatusBuilder:
    """Attach the observers and keep the builder on the app for the routes."""
    recent = RecentRequests()
    recent.install(gateway)
    builder = StatusBuilder(gateway, recent)
    app.state.status = builder
    return builder


@functools.cache
def page_html() -> str:
    return resources.files("app.status").joinpath("page.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def status_page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers={"cache-control": "no-cache"})


@router.get("/status.json")
async def status_json(request: Request, requests: int = Query(default=50, ge=0, le=500)) -> JSONResponse:
    builder: StatusBuilder = request.app.state.status
    activities = await builder.read_activities()
    return JSONResponse(builder.build(requests, activities), headers={"cache-control": "no-store"})
