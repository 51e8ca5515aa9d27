"""Per-request figures (speculative decoding, timings) and the backend-wide counters.

The speculative figures are reconstructed from the `from_draft` flags that `stream_generate` yields,
following `speculative_generate_step` in mlx_lm/generate.py (0.32.2). Each verification round:

- drafts `min(k, max_tokens - tokens so far)` tokens (0 when k is 0),
- yields the accepted drafted tokens (`from_draft=True`), then one token of the target
  (`from_draft=False`) unless `max_tokens` was reached by the accepted ones.

So a round starts at the first token after a target token (or at the first token of the request) and
every target token closes one. Every token the generator makes is yielded by `stream_generate` (it
yields the eos token and the `max_tokens`-th token as its final response), so counting the yielded
responses counts the generator's tokens. A round the consumer cuts short (stop word, client gone)
counts with everything it drafted: the draft and the verification pass ran before its first token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.launcher.client_watch import ClientWatch

T = TypeVar("T")


@dataclass
class SpeculationCounter:
    """Speculative-decoding figures of one `stream_generate` call with a draft model."""

    num_draft_tokens_per_round: int
    max_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # Set when the generator reports each round's draft length itself (prompt lookup drafts fewer
    # than k when it finds nothing); otherwise rounds are reconstructed from the flags as above.
    explicit_rounds: bool = False
    _produced: int = 0
    _round_open: bool = False
    _round_drafted: int = 0
    _round_accepted: int = 0

    def __post_init__(self) -> None:
        k = max(self.num_draft_tokens_per_round, 0)
        self.drafted_per_position = [0] * k
        self.accepted_per_position = [0] * k

    def observe(self, from_draft: bool) -> None:
        """Account for one yielded token."""
        if not self._round_open and not self.explicit_rounds:
            self._open_round()
        if from_draft:
            self.num_accepted_tokens += 1
            if self._round_accepted < self._round_drafted:
                self.accepted_per_position[self._round_accepted] += 1
            self._round_accepted += 1
        else:
            # The target's own token ends every round that does not end at max_tokens.
            self._round_open = False
        self._produced += 1

    def _open_round(self) -> None:
        k = max(self.num_draft_tokens_per_round, 0)
        # max_tokens < 0 means "no limit" in mlx_lm's generators.
        left = self.max_tokens - self._produced if self.max_tokens >= 0 else k
        self.open_round(min(k, left))

    def open_round(self, drafted: int) -> None:
        """A verification round starts with `drafted` tokens (at most k) to verify."""
        self._round_open = True
        self._round_drafted = drafted
        self._round_accepted = 0
        if drafted > 0:
            self.num_drafts += 1
            self.num_draft_tokens += drafted
            for position in range(drafted):
                self.drafted_per_position[position] += 1


@dataclass
class RequestStats:
    """Everything the launcher reports in band for one completion request.

    Created by the HTTP handler thread, carried to the generation thread on the request object,
    so the figures are those of this request by construction.
    """

    request_id: str | None
    # The request's connection (None where there is no socket to watch).
    client: ClientWatch | None = None
    speculation: SpeculationCounter | None = None
    arrived_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    # Prompt processing, written by the generation thread at every prefill chunk: tokens of the prompt
    # after its cached prefix (`total`), and how many of them are processed.
    prompt_processed: int = 0
    prompt_total: int | None = None
    # Its prompt processing was stopped because the client had gone.
    abandoned: bool = False
    # Of the cached prompt tokens, those the disk tier restored (app/launcher/disk_tier.py).
    disk_cached_tokens: int = 0

    def mark_started(self) -> None:
        self.started_at = time.perf_counter()

    def prompt_progress(self, processed: int, total: int) -> None:
        self.prompt_processed = processed
        self.prompt_total = total

    def client_gone(self) -> bool:
        return self.client is not None and self.client.gone()

    @property
    def in_prompt(self) -> bool:
        """Between the start of its prompt processing and its first token."""
        return self.prompt_total is not None and self.prompt_processed < self.prompt_total and self.tokens == 0

    @property
    def phase(self) -> str:
        """`queued` (not taken by the generation thread yet), `prompt`, `generating`, or `abandoned` (its
        prompt stopped, its handler not yet gone)."""
        if self.abandoned:
            return "abandoned"
        if self.tokens > 0 or (self.prompt_total is not None and self.prompt_processed >= self.prompt_total):
            return "generating"
        return "queued" if self.prompt_total is None else "prompt"

    def activity(self) -> dict[str, Any]:
        """What this request is doing now, for `/specgate/stats`."""
        return {
            "request_id": self.request_id,
            "phase": self.phase,
            "prompt_processed": self.prompt_processed,
            "prompt_total": self.prompt_total,
            "tokens": self.tokens,
            "seconds": round(time.perf_counter() - self.arrived_at, 3),
        }

    def mark_token(self) -> None:
        now = time.perf_counter()
        self.tokens += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def timed(self, responses: Iterable[T]) -> Iterator[T]:
        """Yield `responses`, stamping the arrival of each."""
        for response in responses:
            self.mark_token()
            yield response

    def to_json(self, prompt_tokens: int, cached_tokens: int, generation_tokens: int) -> dict[str, Any]:
        """The `"specgate"` object of docs/architecture.md, "launcher -> gateway"."""
        spec = self.speculation
        return {
            "request_id": self.request_id,
            "num_drafts": spec.num_drafts if spec else 0,
            "num_draft_tokens": spec.num_draft_tokens if spec else 0,
            "num_accepted_tokens": spec.num_accepted_tokens if spec else 0,
            "drafted_per_position": list(spec.drafted_per_position) if spec else [],
            "accepted_per_position": list(spec.accepted_per_position) if spec else [],
            "prompt_tokens": prompt_tokens,
            "cached_tokens": max(cached_tokens, 0),
            "cached_tokens_disk": min(self.disk_cached_tokens, max(cached_tokens, 0)),
            "generation_tokens": generation_tokens,
            "prompt_seconds": _seconds(self.started_at, self.first_token_at),
            "generation_seconds": _seconds(self.first_token_at, self.last_token_at),
        }


def _seconds(start: float | None, end: float | None) -> float:
    if start is None or end is None:
        return 0.0
    return round(end - start, 6)


class BackendCounters:
    """Backend-wide counters and the requests in progress, served at `GET /specgate/stats`; safe to
    update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests_started = 0
        self._requests_finished = 0
        self._tokens_generated = 0
        self._prefills_abandoned = 0
        self._prefill_tokens_skipped = 0
        # Keyed by identity: request ids are the client's and need not be unique.
        self._active: dict[int, RequestStats] = {}
        self._dtypes: dict[str, str | None] = {"model_dtype": None, "draft_dtype": None}
        self._sections: dict[str, Callable[[], dict[str, Any]]] = {}

    def request_started(self, stats: RequestStats) -> None:
        with self._lock:
            self._requests_started += 1
            self._active[id(stats)] = stats

    def request_finished(self, stats: RequestStats) -> None:
        with self._lock:
            self._requests_finished += 1
            self._active.pop(id(stats), None)

    @property
    def prefills_abandoned(self) -> int:
        return self._prefills_abandoned

    def prefill_abandoned(self, stats: RequestStats) -> None:
        """Count a prompt whose processing stops because its client left (once per request)."""
        with self._lock:
            if stats.abandoned:
                return
            stats.abandoned = True
            self._prefills_abandoned += 1
            if stats.prompt_total is not None:
                self._prefill_tokens_skipped += max(stats.prompt_total - stats.prompt_processed, 0)

    def add_tokens(self, count: int) -> None:
        with self._lock:
            self._tokens_generated += count

    def set_dtypes(self, model: str | None, draft: str | None) -> None:
        with self._lock:
            self._dtypes = {"model_dtype": model, "draft_dtype": draft}

    def add_section(self, name: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Another part's own figures, read at each snapshot (e.g. the disk tier's)."""
        self._sections[name] = snapshot

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counters = {
                "requests_started": self._requests_started,
                "requests_finished": self._requests_finished,
                "tokens_generated": self._tokens_generated,
                "active_requests": self._requests_started - self._requests_finished,
                "prefills_abandoned": self._prefills_abandoned,
                "prefill_tokens_skipped": self._prefill_tokens_skipped,
                "requests": [stats.activity() for stats in self._active.values()],
                **self._dtypes,
            }
        return {**counters, **{name: snapshot() for name, snapshot in self._sections.items()}}
