"""The proxy's contract with a planner: what a planner reads, what it returns, and the one place that writes it.

A planner (app/adaptive/planner.py for the gateway) depends on this module alone of the proxy and the
backends. It reads a request through `PlannedRequest`, the backends' load through `Load` (a function the
gateway wires, `pool_load`), and finished requests through `FinishedRequest`; it returns a `Plan` and never
changes the request. `apply_plan` is the one place that writes the decision into the request sent upstream
and into the request's record. The proxy's own types (BackendRequest, RequestRecord, BackendPool) satisfy
these protocols; the planner never names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.backends.pool import BackendPool
from app.errors import Outcome
from app.profiles import Profile
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest


@dataclass(frozen=True)
class Plan:
    """A planner's decision for one request."""

    # The profile whose backend serves the request: the one asked for, or its baseline twin.
    profile: Profile
    # The draft length to send; None: send none (a profile without a draft, or routed to its twin).
    num_draft_tokens: int | None
    # The baseline twin that serves the request instead of its speculative profile (under contention).
    routed_to: str | None = None
    # Why k is what it is (warmup, model, probe, client, fixed), and the prompt class acceptance is learnt under.
    k_reason: str | None = None
    prompt_class: str | None = None


@dataclass(frozen=True)
class Load:
    """How busy a profile's backend is now, as a planner may see it."""

    waiting: int
    running: int
    concurrency: int
    # Whether the backend process is up (starting or ready): a planner never makes one start.
    backend_up: bool


def pool_load(pool: BackendPool, profile: Profile) -> Load:
    """`profile`'s backend load in `pool` (the gateway hands `partial(pool_load, pool)` to its planner)."""
    slot = pool.slot_for(profile)
    admission = slot.admission
    return Load(admission.waiting, admission.running, admission.concurrency, slot.backend.is_running)


class PlannedRequest(Protocol):
    """What a planner reads of a request rewritten for its backend (app/proxy/rewrite.py's BackendRequest)."""

    @property
    def kind(self) -> str: ...
    @property
    def body(self) -> Mapping[str, Any]: ...
    @property
    def num_draft_tokens(self) -> int | None: ...


class DraftFigures(Protocol):
    """The launcher's speculative counts for one request (app/proxy/record.py's SpecStats)."""

    @property
    def num_accepted_tokens(self) -> int: ...
    @property
    def drafted_per_position(self) -> Sequence[int]: ...
    @property
    def accepted_per_position(self) -> Sequence[int]: ...


class FinishedRequest(Protocol):
    """What a planner reads of a finished request (app/proxy/record.py's RequestRecord)."""

    @property
    def profile(self) -> str: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def routed_to(self) -> str | None: ...
    @property
    def prompt_class(self) -> str | None: ...
    @property
    def num_draft_tokens(self) -> int | None: ...
    @property
    def generation_tokens(self) -> int: ...
    @property
    def backend_generation_seconds(self) -> float | None: ...
    @property
    def spec(self) -> DraftFigures | None: ...


class Planner(Protocol):
    def plan(self, profile: Profile, body: Mapping[str, Any], request: PlannedRequest) -> Plan:
        """The plan for `request` (rewritten from the client's `body` for `profile`); changes neither."""
        ...


def apply_plan(plan: Plan, request: BackendRequest, record: RequestRecord) -> None:
    """Write the decision into the request sent upstream and into its record."""
    request.num_draft_tokens = record.num_draft_tokens = plan.num_draft_tokens
    if plan.num_draft_tokens is None:
        request.body.pop("num_draft_tokens", None)
    else:
        request.body["num_draft_tokens"] = plan.num_draft_tokens
    record.routed_to = plan.routed_to
    record.k_reason = plan.k_reason
    record.prompt_class = plan.prompt_class
    if plan.routed_to is not None:
        # The twin has no draft: no speculative figures to read, none to count.
        record.draft_model = None
