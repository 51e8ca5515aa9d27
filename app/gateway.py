"""The running gateway: profiles, the backend pool and the request handler, with their lifecycle."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from app.adaptive.collector import PlannerCollector
from app.adaptive.planner import SpeculationPlanner
from app.backends.node_keys import load_node_keys
from app.backends.nodes import NodePool
from app.backends.pool import BackendPool
from app.backends.process import BackendState, BackendTiming
from app.models.sources import SourceStatus, describe_source
from app.profiles import Profile, ProfileSet
from app.proxy.forward import NodeForwarder
from app.proxy.handler import CompletionHandler
from app.proxy.plan import pool_load
from app.proxy.record import RequestRecord
from app.proxy.relay import RelayTimeouts
from app.settings import Settings

logger = logging.getLogger("specgate")
_CREATED = int(time.time())


class Gateway:
    """Owns every long-lived part; `start()` and `close()` bracket its life."""

    def __init__(self, settings: Settings, profiles: ProfileSet) -> None:
        self.settings = settings
        self.profiles = profiles
        # One client for all backends: they speak HTTP/1.0 and close each connection anyway.
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False)
        timing = BackendTiming(
            start_timeout=settings.backend_start_timeout,
            stop_grace=settings.backend_stop_grace,
            backoff_initial=settings.restart_backoff_initial,
            backoff_max=settings.restart_backoff_max,
            log_lines=settings.backend_log_lines,
            blas=settings.blas,
            prompt_cache_dir=settings.prompt_cache_root,
            prompt_cache_disk_bytes=settings.prompt_cache_disk_bytes,
            prompt_cache_min_tokens=settings.prompt_cache_min_tokens,
            run_dir=settings.run_root,
        )
        self.pool = BackendPool(timing, settings.max_backends, self.resolve, self.http)
        # Chooses k for `auto` profiles and routes to baseline twins; learns from every finished request.
        self.planner = SpeculationPlanner(partial(pool_load, self.pool), profiles)
        self.handler = CompletionHandler(
            self.pool,
            self.planner,
            RelayTimeouts(
                first_token=settings.first_token_timeout,
                inactivity=settings.inactivity_timeout,
                keepalive=settings.keepalive_seconds,
                head=settings.head_timeout,
            ),
            settings.max_body_bytes,
        )
        # Upstream nodes of profiles with `nodes` (issue 18 item 3): health checks, choice, forwarding.
        self.nodes = NodePool(
            load_node_keys(settings),
            settings.node_health_seconds,
            settings.node_connect_timeout,
            settings.node_affinity_slack,
        )
        self.handler.forwarder = NodeForwarder(self.nodes, self.handler.timeouts, settings.node_connect_timeout)
        # Model value -> its local directory, once resolved present (see model_dir).
        self._model_dirs: dict[str, str] = {}
        self.handler.model_dir = self.model_dir
        self.handler.observers.append(self._planner_observe)
        self.apply_profiles(profiles)

    def _planner_observe(self, record: RequestRecord) -> None:
        # A node's figures come from another machine's backend: they would skew this gateway's estimates.
        if record.node is None:
            self.planner.observe(record)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the collectors that live outside app/metrics.py to the registry behind /metrics."""
        registry.register(PlannerCollector(self.planner))

    def resolve(self, value: str) -> SourceStatus:
        return describe_source(value, self.settings.model_store)

    def model_dir(self, value: str) -> str | None:
        """The directory of a present model, for the handler's prompt checks. Resolved once per value:
        resolving reads the store's manifests, which has no place on every request's path."""
        known = self._model_dirs.get(value)
        if known is None:
            status = self.resolve(value)
            if not status.present or status.path is None:
                return None  # not there (yet): asked again next time, so a pull is noticed
            known = self._model_dirs[value] = status.path
        return known

    def apply_profiles(self, profiles: ProfileSet) -> list[Any]:
        """Switch to a new profile set; returns the slots no profile uses any more."""
        unused = self.pool.configure(profiles)
        self.nodes.configure(profiles)
        self._model_dirs.clear()  # a reload may point a name at other files
        self.profiles = profiles
        self.handler.profiles = profiles
        self.planner.profiles = profiles
        return unused

    async def start(self) -> None:
        self.pool.start_reaper()
        self.nodes.start()
        for name in self.settings.preload:
            profile = self.profiles.get(name)
            if profile is None:
                logger.warning("preload: no profile named %r", name)
                continue
            logger.info("preloading %s", name)
            try:
                await self.pool.ensure_ready(self.pool.slot_for(profile))
            except Exception as error:
                logger.error("preload of %s failed: %s", name, error)

    async def close(self) -> None:
        await self.nodes.close()
        if self.handler.forwarder is not None:
            await self.handler.forwarder.close()
        await self.pool.close()
        await self.http.aclose()

    def describe_profile(self, name: str) -> dict[str, Any]:
        profile = self.profiles.profiles[name]
        if not profile.local:
            return self._describe_remote(name)
        slot = self.pool.slot_for(profile)
        backend = slot.backend
        sources = [self.resolve(profile.model)]
        if profile.uses_draft_weights and profile.draft_model is not None:
            sources.append(self.resolve(profile.draft_model))
        missing = [s for s in sources if not s.present]
        state = backend.state.value
        if missing and backend.state is BackendState.STOPPED:
            state = "not_present"
        info: dict[str, Any] = {
            **_model_head(profile),
            "state": state,
            "model": profile.model,
            "draft_model": profile.draft_model,
            "num_draft_tokens": profile.num_draft_tokens if profile.is_speculative else None,
            "aliases": list(profile.aliases),
            "context_length": profile.context_length,
            "max_output_tokens": profile.max_output_tokens,
            "backend": {
                "name": backend.name,
                "pid": backend.pid,
                "port": backend.port,
                "restarts": backend.crashes.total_restarts,
                "consecutive_failures": backend.crashes.consecutive,
                "retry_in": round(backend.retry_in(), 2),
                # Failed more than once in a row and waiting out a back-off before the next start.
                "crash_loop": backend.crashes.consecutive > 1 and backend.retry_in() > 0,
                "failure": backend.failure,
                "load_seconds": backend.load_seconds,
                "blas": backend.blas_summary,
                "running": slot.admission.running,
                "waiting": slot.admission.waiting,
                "shared_with": [p for p in slot.profiles if p != profile.name],
                "distributed": backend.distributed_info(),
            },
        }
        if missing:
            info["detail"] = "; ".join(s.detail for s in missing)
        if profile.nodes:
            info["nodes"] = self.describe_nodes(name)
        return info

    def describe_nodes(self, name: str) -> list[dict[str, Any]]:
        """The nodes of one profile as /v1/models and /status.json show them."""
        profile = self.profiles.profiles[name]
        now = time.monotonic()
        described = []
        for node in self.nodes.of(profile):
            figures = node.figures_for(name)
            described.append(
                {
                    "url": node.url,
                    "up": node.up,
                    "kind": node.kind,
                    "queue": node.reported.get(name),
                    "in_flight": node.in_flight[name],
                    "requests": dict(figures.requests),
                    "retried": figures.retried,
                    "latency_ms_mean": round(figures.latency_sum / figures.latency_count * 1000.0, 1)
                    if figures.latency_count
                    else None,
                    "last_error": node.last_error,
                    "since_seconds": round(now - node.changed_at, 1),
                    "checked_seconds_ago": round(now - node.checked_at, 1) if node.checked_at is not None else None,
                }
            )
        return described

    def _describe_remote(self, name: str) -> dict[str, Any]:
        """A profile without a local backend: its state is its nodes'."""
        profile = self.profiles.profiles[name]
        nodes = self.describe_nodes(name)
        up = sum(1 for node in nodes if node["up"])
        in_flight = sum(node["in_flight"] for node in nodes)
        return {
            **_model_head(profile),
            "state": "ready" if up else "unknown" if all(node["up"] is None for node in nodes) else "down",
            "model": profile.model or None,
            "draft_model": None,
            "num_draft_tokens": None,
            "aliases": list(profile.aliases),
            "context_length": None,
            "max_output_tokens": None,
            # No local process: the running figures are this gateway's requests in flight to the nodes.
            "backend": {"name": None, "running": in_flight, "waiting": 0},
            "nodes": nodes,
        }

    def backend_summary(self) -> dict[str, str]:
        return {slot.backend.name: slot.backend.state.value for slot in self.pool.slots.values()}


def _model_head(profile: Profile) -> dict[str, Any]:
    """The fields of a `/v1/models` entry that every profile has, local or served by nodes."""
    return {
        "id": profile.name,
        "object": "model",
        "created": _CREATED,
        "owned_by": "specgate",
        "name": profile.display_name or profile.name,
        "description": profile.description,
    }
