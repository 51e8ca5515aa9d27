"""Upstream nodes (issue 18 item 3): other specgate gateways or OpenAI-compatible servers serving a profile.

A node is known by its base URL; profiles that list the same URL share one `Node`. The pool checks every
node every `node_health_seconds`: a specgate node answers `/status.json` (its profiles' running and
waiting requests: its queue), any other server `/v1/models`. A node that does not answer (or answers 5xx)
is down; a request that cannot connect to it marks it down at once; a down node is still checked, and is
up again from its first good answer.

Which node serves a request (`choose`): the up node (or one not checked yet) with the least load, where a
node's load for a profile is the larger of the queue it reported at its last check and the requests this
gateway has in flight to it now (the report is up to one period old; our own count is exact). Equal loads
go round-robin, so requests that never overlap still spread.

Sessions stick to a node: a conversation's prompt cache (in memory and on disk) lives on the node that
served its last turn, and on a CPU a cache miss costs minutes of prefill. A request that carries a session
key (app/proxy/forward.py: its conversation's start) goes to the node that served that key last while that
node is usable and its load is at most `affinity_slack` above the least; otherwise by load as above.

Every request to a node goes on a connection of its own (no keep-alive): a node's answer can never be
read as another request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.backends.node_keys import NodeKeys
from app.profiles import Profile, ProfileSet

logger = logging.getLogger("specgate.nodes")
# Session keys remembered (least recently used forgotten first).
AFFINITY_KEYS = 10_000
# A health check waits this long for an answer (a node's status page asks its backends, up to 1 s each).
CHECK_TIMEOUT = 3.0


@dataclass
class NodeFigures:
    """What this gateway sent one node for one profile (for /metrics and the status page)."""

    requests: Counter[str] = field(default_factory=Counter)  # by outcome
    retried: int = 0  # requests that never reached this node's backend and went to another node
    latency_sum: float = 0.0  # served requests: arrival at this gateway to the last byte
    latency_count: int = 0


class Node:
    def __init__(self, url: str) -> None:
        self.url = url
        # None until the first check; then whether it answered its last check (or a request since).
        self.up: bool | None = None
        self.kind: str | None = None  # "specgate" (reads its queue) or "openai"
        self.reported: dict[str, int] = {}  # profile -> running + waiting, from its last /status.json
        self.in_flight: Counter[str] = Counter()  # profile -> our requests to it now
        self.figures: dict[str, NodeFigures] = {}
        self.last_error: str | None = None
        self.checked_at: float | None = None
        self.changed_at = time.monotonic()
        self.transitions = 0  # up <-> down changes (a flapping node shows here)

    def load(self, profile: str) -> int:
        return max(self.reported.get(profile, 0), self.in_flight[profile])

    def figures_for(self, profile: str) -> NodeFigures:
        return self.figures.setdefault(profile, NodeFigures())

    def mark(self, up: bool, reason: str | None = None) -> None:
        if up != self.up:
            if up:
                logger.info("node %s is up%s", self.url, "" if self.up is None else " again")
            else:
                logger.warning("node %s is down: %s", self.url, reason)
            if self.up is not None:
                self.transitions += 1
            self.changed_at = time.monotonic()
        self.up = up
        self.last_error = None if up else reason


class NodePool:
    """Every node of every profile, their health checks and the choice of a node per request."""

    def __init__(self, keys: NodeKeys, health_seconds: float, connect_timeout: float, affinity_slack: int = 1) -> None:
        self.keys = keys
        self.health_seconds = health_seconds
        self.affinity_slack = affinity_slack
        self._affinity: OrderedDict[str, str] = OrderedDict()  # session key -> the URL of the node that took it
        self.nodes: dict[str, Node] = {}
        self._turn: Counter[str] = Counter()  # per profile: the round-robin start among equal loads
        self._checker: asyncio.Task[None] | None = None
        # Health checks only; requests get their own client (app/proxy/forward.py) with the same settings.
        self.http = node_client(connect_timeout, CHECK_TIMEOUT)

    def configure(self, profiles: ProfileSet) -> None:
        wanted = {url for profile in profiles for url in profile.nodes}
        for url in wanted:
            self.nodes.setdefault(url, Node(url))
        for url in [url for url in self.nodes if url not in wanted]:
            del self.nodes[url]

    def of(self, profile: Profile) -> list[Node]:
        return [self.nodes[url] for url in profile.nodes if url in self.nodes]

    def least_load(self, profile: Profile) -> int | None:
        """The smallest load among the profile's usable nodes (None: none is usable)."""
        loads = [node.load(profile.name) for node in self.of(profile) if node.up is not False]
        return min(loads) if loads else None

    def choose(self, profile: Profile, exclude: Iterable[Node] = (), session: str | None = None) -> Node | None:
        """The usable node for `profile`: the session's own node unless its load is more than `affinity_slack`
        above the least, else the least loaded (round-robin among equals); None if none is left."""
        skip = set(map(id, exclude))
        nodes = [node for node in self.of(profile) if node.up is not False and id(node) not in skip]
        if not nodes:
            return None
        least = min(node.load(profile.name) for node in nodes)
        chosen = None
        if session is not None:
            url = self._affinity.get(session)
            chosen = next((node for node in nodes if node.url == url), None)
            if chosen is not None and chosen.load(profile.name) > least + self.affinity_slack:
                chosen = None
        if chosen is None:
            start = self._turn[profile.name] % len(nodes)
            self._turn[profile.name] += 1
            ordered = nodes[start:] + nodes[:start]
            chosen = min(ordered, key=lambda node: node.load(profile.name))
        if session is not None:
            self._affinity[session] = chosen.url
            self._affinity.move_to_end(session)
            while len(self._affinity) > AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        return chosen

    def start(self) -> None:
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_forever())

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        await self.http.aclose()

    async def _check_forever(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.health_seconds)

    async def check_all(self) -> None:
        nodes = list(self.nodes.values())
        await asyncio.gather(*(self.check(node) for node in nodes))

    async def check(self, node: Node) -> None:
        headers = self.keys.headers(node.url)
        try:
            response = await self.http.get(f"{node.url}/status.json", params={"requests": "0"}, headers=headers)
            status = _specgate_status(response)
            if status is not None:
                node.kind = "specgate"
                node.reported = status
                node.mark(True)
            else:
                response = await self.http.get(f"{node.url}/v1/models", headers=headers)
                if response.status_code >= 500:
                    node.mark(False, f"/v1/models answered HTTP {response.status_code}")
                else:
                    node.kind = "openai"
                    node.reported = {}
                    node.mark(True)
                    if response.status_code in (401, 403):
                        node.last_error = f"/v1/models answered HTTP {response.status_code}: check its key"
        except httpx.HTTPError as error:
            node.mark(False, f"health check failed: {type(error).__name__}: {error}".rstrip(": "))
        except Exception as error:  # a check must never end the checker
            logger.exception("health check of node %s failed", node.url)
            node.mark(False, f"health check failed: {type(error).__name__}")
        node.checked_at = time.monotonic()


def _specgate_status(response: httpx.Response) -> dict[str, int] | None:
    """A specgate node's queue per profile from its /status.json, or None when it is no specgate node."""
    if response.status_code != 200:
        return None
    try:
        data: Any = response.json()
    except ValueError:
        return None
    profiles = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(profiles, list):
        return None
    queues: dict[str, int] = {}
    for entry in profiles:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            running, waiting = entry.get("running"), entry.get("waiting")
            queues[entry["name"]] = (running if isinstance(running, int) else 0) + (
                waiting if isinstance(waiting, int) else 0
            )
    return queues


def node_client(connect_timeout: float, read_timeout: float) -> httpx.AsyncClient:
    """A client for nodes: a new connection per request (never a reused one, so never another request's
    bytes), no proxy from the environment, redirects not followed (a key must not go elsewhere)."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
    )
