"""`/metrics`: Prometheus figures of the gateway, on its own registry.

Speculative decoding follows vLLM's counter schema under a `specgate_` prefix, so vLLM dashboards and
PromQL carry over (acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted /
drafts). Two kinds of source:

- finished requests (`RequestRecord`s from the handler's observers, refusals from its refusal
  observers) feed counters and histograms;
- the backend pool is read at scrape time by a custom collector (running and waiting requests,
  backend states, restarts, load time), so those gauges can never drift from the pool.

Label values are only ever configured ones (profile names, model and draft-model values as written in
the profiles), never a client's text: a request for an unknown model is counted with empty labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder

from app.backends.process import BackendState
from app.errors import Outcome
from app.profiles import Profile
from app.proxy.record import RequestRecord

if TYPE_CHECKING:
    from app.gateway import Gateway

LABELS = ("profile", "model", "draft_model")
Labels = tuple[str, str, str]
NO_PROFILE: Labels = ("", "", "")
FINISH_REASONS = ("stop", "length", "tool_calls")

# Buckets span a CPU decoding a 1.5B model (~1 tok/s, prompts taking minutes) and a GPU at 200 tok/s
# and beyond (5 ms per token), so both get usable quantiles.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 320.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0)  # fmt: skip
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0,
               1920.0, 3840.0)  # fmt: skip
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                 320.0, 640.0)  # fmt: skip
TOKENS_PER_SECOND_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0,
                             75.0, 100.0, 125.0, 150.0, 200.0, 250.0, 300.0, 400.0, 500.0, 750.0, 1000.0,
                             2000.0)  # fmt: skip


def profile_labels(profile: Profile) -> Labels:
    return (profile.name, profile.model, profile.draft_model or "")


class RequestMetrics:
    """Counters and histograms fed by finished requests."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(f"specgate_{name}", doc, [*LABELS, *extra], registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"specgate_{name}", doc, LABELS, registry=registry, buckets=buckets)

        self.requests = counter("requests", "Requests by outcome (refused ones included)", "outcome")
        self.success = counter(
            "request_success", "Requests served, by finish reason (stop, length, tool_calls, other)", "finished_reason"
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of served requests")
        self.cached_tokens = counter("prompt_tokens_cached", "Prompt tokens read from the backend's prompt cache")
        self.disk_cached_tokens = counter(
            "prompt_tokens_cached_disk", "Of the cached prompt tokens, those restored from the prompt cache on disk"
        )
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.drafts = counter("spec_decode_num_drafts", "Verification rounds that carried at least one drafted token")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Tokens proposed by the draft model")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Drafted tokens the target model accepted")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by draft position (0-based)", "position"
        )
        # Not in vLLM: rounds near the end of a request draft fewer than k tokens, so the exact
        # per-position acceptance rate needs its own denominator.
        self.drafted_per_pos = counter(
            "spec_decode_num_drafted_tokens_per_pos", "Drafted tokens by draft position (0-based)", "position"
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival at the gateway to the first token sent", TTFT_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Time between two chunks of output", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival at the gateway to the last byte", E2E_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Time waiting in the gateway's queue for a backend slot", QUEUE_BUCKETS
        )
        self.decode_rate = histogram(
            "request_decode_tokens_per_second",
            "Per request: tokens after the first over the seconds between first and last token",
            TOKENS_PER_SECOND_BUCKETS,
        )

    def prime(self, profiles: Iterable[Profile]) -> None:
        """Create every configured profile's series at zero, so rate() and dashboards see them at once."""
        for profile in profiles:
            labels = profile_labels(profile)
            self.requests.labels(*labels, "success")
            for family in (self.prompt_tokens, self.generation_tokens):
                family.labels(*labels)
            if profile.is_speculative:
                for family in (self.drafts, self.draft_tokens, self.accepted):
                    family.labels(*labels)

    def refused(self, labels: Labels, outcome: Outcome) -> None:
        """A request refused before it was queued (bad body, unknown model, queue full)."""
        self.requests.labels(*labels, outcome).inc()

    def observe(self, labels: Labels, record: RequestRecord) -> None:
        self.requests.labels(*labels, record.outcome).inc()
        self.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        self.cached_tokens.labels(*labels).inc(record.cached_tokens)
        self.disk_cached_tokens.labels(*labels).inc(record.disk_cached_tokens)
        self.generation_tokens.labels(*labels).inc(record.generation_tokens)
        self._observe_spec(labels, record)
        if record.outcome == "success":
            # Latencies describe served requests; failures are counted above by outcome.
            self._observe_latencies(labels, record)

    def _observe_spec(self, labels: Labels, record: RequestRecord) -> None:
        spec = record.spec
        if spec is None:
            return
        self.drafts.labels(*labels).inc(spec.num_drafts)
        self.draft_tokens.labels(*labels).inc(spec.num_draft_tokens)
        self.accepted.labels(*labels).inc(spec.num_accepted_tokens)
        for position, count in enumerate(spec.accepted_per_position):
            self.accepted_per_pos.labels(*labels, str(position)).inc(count)
        for position, count in enumerate(spec.drafted_per_position):
            self.drafted_per_pos.labels(*labels, str(position)).inc(count)

    def _observe_latencies(self, labels: Labels, record: RequestRecord) -> None:
        reason = record.finish_reason if record.finish_reason in FINISH_REASONS else "other"
        self.success.labels(*labels, reason).inc()
        self.queue.labels(*labels).observe(record.queue_seconds)
        if record.ttft is not None:
            self.ttft.labels(*labels).observe(record.ttft)
        if record.e2e is not None:
            self.e2e.labels(*labels).observe(record.e2e)
        itl = self.itl.labels(*labels)
        for gap in record.token_gaps:
            itl.observe(gap)
        if record.decode_tokens_per_second is not None:
            self.decode_rate.labels(*labels).observe(record.decode_tokens_per_second)


class PoolCollector:
    """Gauges read from the backend pool at scrape time (runs in the event loop, like the pool)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def describe(self) -> list[Metric]:
        # Registering must not read the pool; the families are declared by collect() at scrape time.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._profile_families()
        yield from self._backend_families()
        yield from self._node_families()

    def _profile_families(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "specgate_num_requests_running", "Requests holding a backend slot", labels=list(LABELS)
        )
        waiting = GaugeMetricFamily(
            "specgate_num_requests_waiting", "Requests queued in the gateway for a backend slot", labels=list(LABELS)
        )
        info = GaugeMetricFamily(
            "specgate_profile_info",
            "1 per configured profile, with the backend that serves it (for joins on `backend`)",
            labels=[*LABELS, "backend"],
        )
        slots = list(self.gateway.pool.slots.values())
        for profile in self.gateway.profiles:
            labels = list(profile_labels(profile))
            # A profile may be routed to its baseline twin's slot: count its tickets wherever they are.
            admitted = sum(slot.admission.profile_count(profile.name) for slot in slots)
            queued = sum(slot.admission.waiting_for(profile.name) for slot in slots)
            # Requests in flight to the profile's upstream nodes run elsewhere but hold this gateway's client.
            admitted += sum(node.in_flight[profile.name] for node in self.gateway.nodes.of(profile))
            running.add_metric(labels, admitted - queued)
            waiting.add_metric(labels, queued)
            slot = self.gateway.pool.slots.get(profile.backend_spec)
            if slot is not None:
                info.add_metric([*labels, slot.backend.name], 1)
        yield from (running, waiting, info)

    def _backend_families(self) -> Iterator[Metric]:
        names = ["backend", "model", "draft_model"]
        state = GaugeMetricFamily(
            "specgate_backend_state", "1 for the state the backend is in, 0 for the others", labels=[*names, "state"]
        )
        restarts = CounterMetricFamily(
            "specgate_backend_restarts", "Restarts after a crash or failed start", labels=names
        )
        load = GaugeMetricFamily(
            "specgate_backend_load_seconds", "Seconds the last start took to load the models", labels=names
        )
        for slot in self.gateway.pool.slots.values():
            backend = slot.backend
            labels = [backend.name, backend.spec.model, backend.spec.draft_model or ""]
            for value in BackendState:
                state.add_metric([*labels, value.value], 1.0 if backend.state is value else 0.0)
            restarts.add_metric(labels, backend.crashes.total_restarts)
            if backend.load_seconds is not None:
                load.add_metric(labels, backend.load_seconds)
        yield from (state, restarts, load)

    def _node_families(self) -> Iterator[Metric]:
        """Upstream nodes of profiles with `nodes` (app/backends/nodes.py), per profile and node URL."""
        names = ["profile", "node"]
        up = GaugeMetricFamily(
            "specgate_node_up",
            "1 while the node answers its health checks, 0 while it is down or unchecked",
            labels=names,
        )
        in_flight = GaugeMetricFamily(
            "specgate_node_in_flight", "This gateway's requests in flight to the node", labels=names
        )
        queue = GaugeMetricFamily(
            "specgate_node_queue", "Running plus waiting requests the node reported at its last check", labels=names
        )
        requests = CounterMetricFamily(
            "specgate_node_requests", "Requests the node served or failed, by outcome", labels=[*names, "outcome"]
        )
        retried = CounterMetricFamily(
            "specgate_node_retried",
            "Requests the node did not take (down, full) that went to another node",
            labels=names,
        )
        transitions = CounterMetricFamily(
            "specgate_node_up_changes", "Times the node went down or came back", labels=["node"]
        )
        latency = SummaryMetricFamily(
            "specgate_node_request_latency_seconds", "Served requests: arrival here to the last byte", labels=names
        )
        nodes = self.gateway.nodes
        for profile in self.gateway.profiles:
            for node in nodes.of(profile):
                labels = [profile.name, node.url]
                up.add_metric(labels, 1.0 if node.up else 0.0)
                in_flight.add_metric(labels, node.in_flight[profile.name])
                if node.kind == "specgate":
                    queue.add_metric(labels, node.reported.get(profile.name, 0))
                figures = node.figures_for(profile.name)
                for outcome in sorted({"success", *figures.requests}):
                    requests.add_metric([*labels, outcome], figures.requests[outcome])
                retried.add_metric(labels, figures.retried)
                latency.add_metric(labels, figures.latency_count, figures.latency_sum)
        for node in nodes.nodes.values():
            transitions.add_metric([node.url], node.transitions)
        yield from (up, in_flight, queue, requests, retried, transitions, latency)


class GatewayMetrics:
    """The registry behind `/metrics` and what feeds it."""

    def __init__(self, gateway: Gateway) -> None:
        # `*_created` series would double the exposition for a timestamp no dashboard uses (process-wide
        # switch; the gateway's process is ours).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = RequestMetrics(self.registry)
        self.registry.register(PoolCollector(gateway))
        gateway.register_metrics(self.registry)

    def install(self) -> None:
        self.gateway.handler.observers.append(self.on_finish)
        self.gateway.handler.refusal_observers.append(self.on_refusal)

    def labels_for(self, name: str | None, record: RequestRecord | None = None) -> Labels:
        profile = self.gateway.profiles.get(name) if name is not None else None
        if profile is not None:
            return profile_labels(profile)
        if record is not None:
            # A profile removed by a reload while this request ran: its values were configured too.
            return (record.profile, record.model, record.draft_model or "")
        return NO_PROFILE

    def on_finish(self, record: RequestRecord) -> None:
        self.requests.observe(self.labels_for(record.profile, record), record)

    def on_refusal(self, profile: Profile | None, outcome: Outcome) -> None:
        self.requests.refused(profile_labels(profile) if profile is not None else NO_PROFILE, outcome)

    def render(self, accept: str) -> tuple[bytes, str]:
        self.requests.prime(self.gateway.profiles)
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # In the event loop on purpose: the pool collector reads state that only the loop writes.
    gateway_metrics: GatewayMetrics = request.app.state.metrics
    body, content_type = gateway_metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


def install_metrics(app: FastAPI, gateway: Gateway) -> GatewayMetrics:
    """Create the registry, attach its observers and keep it on the app for the route."""
    gateway_metrics = GatewayMetrics(gateway)
    gateway_metrics.install()
    app.state.metrics = gateway_metrics
    return gateway_metrics
