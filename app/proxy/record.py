"""What one request did: timings, tokens and speculative-decoding figures.

The launcher reports the backend's own figures in band (`"specgate"` key, see
docs/architecture.md); the gateway adds what only it sees (queue time, time to first token as the
client experienced it). One record feeds the response's `metrics`/`timings`, `/metrics` and the
request log line.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from app.errors import Outcome

# What a finished record keeps of text: records are kept (the status page holds 500) and shown to everyone.
ERROR_CHARS = 300
FINISH_REASON_CHARS = 40
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def bounded_text(text: str | None, limit: int) -> str | None:
    """`text` on one line, cut to `limit` characters (an ellipsis says it was cut)."""
    if text is None:
        return None
    text = _CONTROLS.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class SpecStats:
    """Speculative-decoding counts for one request, as the launcher measured them."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @classmethod
    def from_launcher(cls, data: dict[str, Any]) -> SpecStats:
        def ints(name: str) -> list[int]:
            value = data.get(name)
            return [int(v) for v in value] if isinstance(value, list) else []

        return cls(
            num_drafts=int(data.get("num_drafts") or 0),
            num_draft_tokens=int(data.get("num_draft_tokens") or 0),
            num_accepted_tokens=int(data.get("num_accepted_tokens") or 0),
            drafted_per_position=ints("drafted_per_position"),
            accepted_per_position=ints("accepted_per_position"),
        )

    @property
    def acceptance_rate(self) -> float | None:
        if self.num_draft_tokens == 0:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens

    @property
    def mean_acceptance_length(self) -> float | None:
        # vLLM's definition: tokens per verification step = 1 + accepted / drafts.
        if self.num_drafts == 0:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts


@dataclass
class RequestRecord:
    """Everything measured about one request, filled in as it runs."""

    request_id: str
    profile: str
    model: str
    draft_model: str | None
    kind: str
    streaming: bool
    num_draft_tokens: int | None
    arrived: float = field(default_factory=time.monotonic)
    queue_seconds: float = 0.0
    upstream_started: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # Of `cached_tokens`, those the backend restored from its prompt cache on disk (the rest: memory).
    disk_cached_tokens: int = 0
    generation_tokens: int = 0
    backend_prompt_seconds: float | None = None
    backend_generation_seconds: float | None = None
    spec: SpecStats | None = None
    finish_reason: str | None = None
    outcome: Outcome = "unknown"
    error: str | None = None
    finished: float | None = None
    # From the planner's Plan (app/proxy/plan.py): the twin that served the request under contention, why k
    # is what it is ("auto" profiles: warmup, model, probe), and the prompt class acceptance is learnt under.
    routed_to: str | None = None
    k_reason: str | None = None
    prompt_class: str | None = None
    # The upstream node that served it (app/proxy/forward.py), or None for a local backend.
    node: str | None = None

    def seal(self) -> None:
        """Bound what the finished record holds (the error and finish reason: a backend's text)."""
        self.error = bounded_text(self.error, ERROR_CHARS)
        self.finish_reason = bounded_text(self.finish_reason, FINISH_REASON_CHARS)

    def drop_token_gaps(self) -> None:
        """After the observers: one float per token is the only part of a record that grows with the
        answer (a 32k-token answer, ~1 MB), and the status page keeps 500 records."""
        self.token_gaps = []

    def mark_token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.token_gaps.append(now - self.last_token)
        self.last_token = now

    def absorb_usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.generation_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens = int(details.get("cached_tokens") or 0)

    def absorb_launcher(self, data: dict[str, Any]) -> None:
        prompt = data.get("prompt_seconds")
        generation = data.get("generation_seconds")
        self.backend_prompt_seconds = float(prompt) if isinstance(prompt, int | float) else None
        self.backend_generation_seconds = float(generation) if isinstance(generation, int | float) else None
        disk = data.get("cached_tokens_disk")
        self.disk_cached_tokens = int(disk) if isinstance(disk, int) and disk > 0 else 0
        if self.draft_model is not None:
            self.spec = SpecStats.from_launcher(data)

    def absorb_node_spec(self, data: dict[str, Any]) -> None:
        """A node's `metrics.speculative_decoding` (the vLLM shape it answered with) as this record's figures."""
        histogram = data.get("acceptance_histogram")
        self.spec = SpecStats(
            num_drafts=int(data.get("num_spec_steps") or 0),
            num_draft_tokens=int(data.get("num_draft_tokens") or 0),
            num_accepted_tokens=int(data.get("num_accepted_draft_tokens") or 0),
            accepted_per_position=[int(v) for v in histogram] if isinstance(histogram, list) else [],
        )

    # ----- derived figures -------------------------------------------------------------------

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrived

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrived

    @property
    def prompt_seconds(self) -> float | None:
        if self.backend_prompt_seconds is not None:
            return self.backend_prompt_seconds
        if self.first_token is None or self.upstream_started is None:
            return None
        return self.first_token - self.upstream_started

    @property
    def decode_seconds(self) -> float | None:
        if self.backend_generation_seconds is not None:
            return self.backend_generation_seconds
        if self.first_token is None or self.last_token is None:
            return None
        return self.last_token - self.first_token

    @property
    def decode_tokens_per_second(self) -> float | None:
        # The first token belongs to prompt processing; decode speed counts the ones after it.
        seconds = self.decode_seconds
        if seconds is None or seconds <= 0 or self.generation_tokens < 2:
            return None
        return (self.generation_tokens - 1) / seconds

    # ----- response shapes -------------------------------------------------------------------

    def speculative_decoding(self) -> dict[str, Any] | None:
        """vLLM's per-request `metrics.speculative_decoding` shape, plus how k was chosen and routing."""
        if self.spec is None and self.routed_to is None:
            return None
        spec = self.spec or SpecStats()
        result: dict[str, Any] = {
            "num_spec_steps": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_draft_tokens": spec.num_accepted_tokens,
            "draft_acceptance_rate": spec.acceptance_rate,
            "mean_acceptance_length": spec.mean_acceptance_length,
            "acceptance_histogram": list(spec.accepted_per_position),
        }
        if self.routed_to is not None:
            result["routed_to"] = self.routed_to
        if self.k_reason is not None and self.k_reason not in ("fixed", "client"):
            result["num_speculative_tokens"] = self.num_draft_tokens
            result["num_speculative_tokens_reason"] = self.k_reason
        return result

    def timings(self) -> dict[str, Any]:
        """llama.cpp's per-request `timings` shape."""
        prompt_ms = (self.prompt_seconds or 0.0) * 1000.0
        predicted_ms = (self.decode_seconds or 0.0) * 1000.0
        result: dict[str, Any] = {
            "prompt_n": self.prompt_tokens - self.cached_tokens,
            "prompt_ms": round(prompt_ms, 3),
            "prompt_per_second": (
                round((self.prompt_tokens - self.cached_tokens) / (prompt_ms / 1000.0), 3) if prompt_ms > 0 else None
            ),
            "predicted_n": self.generation_tokens,
            "predicted_ms": round(predicted_ms, 3),
            "predicted_per_second": (
                round(self.decode_tokens_per_second, 3) if self.decode_tokens_per_second is not None else None
            ),
            "cache_n": self.cached_tokens,
            # Not llama.cpp's: how many of cache_n came from the prompt cache on disk.
            "cache_disk_n": self.disk_cached_tokens,
        }
        if self.spec is not None:
            result["draft_n"] = self.spec.num_draft_tokens
            result["draft_n_accepted"] = self.spec.num_accepted_tokens
        return result

    def response_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {"timings": self.timings()}
        spec = self.speculative_decoding()
        if spec is not None:
            extras["metrics"] = {"speculative_decoding": spec}
        return extras

    def log_line(self) -> str:
        parts = [f"{self.request_id} {self.profile} {self.outcome}"]
        if self.finish_reason:
            parts.append(f"finish={self.finish_reason}")
        disk = f", {self.disk_cached_tokens} from disk" if self.disk_cached_tokens else ""
        parts.append(f"prompt={self.prompt_tokens} (cached {self.cached_tokens}{disk}) gen={self.generation_tokens}")
        if self.ttft is not None:
            parts.append(f"ttft={self.ttft * 1000:.0f}ms")
        if self.decode_tokens_per_second is not None:
            parts.append(f"{self.decode_tokens_per_second:.1f} tok/s")
        if self.spec is not None and self.spec.num_draft_tokens:
            rate = self.spec.acceptance_rate or 0.0
            parts.append(
                f"draft tokens accepted: {self.spec.num_accepted_tokens}/{self.spec.num_draft_tokens} ({rate:.0%})"
            )
        if self.queue_seconds > 0.001:
            parts.append(f"queued {self.queue_seconds * 1000:.0f}ms")
        if self.node is not None:
            parts.append(f"node={self.node}")
        if self.error:
            parts.append(f"error={self.error}")
        return ", ".join(parts)
