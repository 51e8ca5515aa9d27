"""Where a request goes and with which draft length: the planner decides, the proxy writes.

A planner (app/adaptive/planner.py for the gateway) reads the profile, the client's body and the rewritten
request and returns a `Plan`; it never changes the request. `apply_plan` is the one place that writes the
decision into the request sent upstream and into the request's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.backends.pool import BackendSlot
from app.profiles import Profile
from app.proxy.record import RequestRecord
from app.proxy.rewrite import BackendRequest


@dataclass(frozen=True)
class Plan:
    """A planner's decision for one request."""

    slot: BackendSlot
    # The draft length to send; None: send none (a profile without a draft, or routed to its twin).
    num_draft_tokens: int | None
    # The baseline twin that serves the request instead of its speculative profile (under contention).
    routed_to: str | None = None
    # Why k is what it is (warmup, model, probe, client, fixed), and the prompt class acceptance is learnt under.
    k_reason: str | None = None
    prompt_class: str | None = None


class Planner(Protocol):
    def plan(self, profile: Profile, body: dict[str, Any], request: BackendRequest) -> Plan:
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
