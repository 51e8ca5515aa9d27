"""One streamed chat request, timed where the user sits (the client), and the gateway's profile list.

Client-side timing is the point: time to first token includes the gateway, the queue and prompt
processing; decode rate is tokens after the first over the time from first to last content chunk. The
gateway's own figures (acceptance, its `timings`) are read from the usage chunk when present, so the bench
also works against servers that have none (any OpenAI-compatible URL).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError


class BenchError(Exception):
    """A failure the user can act on; the message says what to do next."""


def normalize_url(url: str) -> str:
    """`http://host:port`, with any trailing `/v1` or `/` removed: users paste either form."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class ProfileInfo:
    """One entry of the gateway's /v1/models (specgate's fields; absent for other servers)."""

    name: str
    model: str | None
    draft_model: str | None
    num_draft_tokens: int | None
    state: str | None
    detail: str | None

    @property
    def is_speculative(self) -> bool:
        return self.draft_model is not None

    @classmethod
    def from_listing(cls, item: dict[str, Any]) -> ProfileInfo:
        k = item.get("num_draft_tokens")
        return cls(
            name=str(item.get("id")),
            model=item.get("model"),
            draft_model=item.get("draft_model"),
            num_draft_tokens=int(k) if isinstance(k, int) else None,
            state=item.get("state"),
            detail=item.get("detail"),
        )


def list_profiles(http: httpx.Client, url: str) -> dict[str, ProfileInfo]:
    try:
        response = http.get(f"{url}/v1/models", timeout=10.0)
    except httpx.TransportError as error:
        raise BenchError(
            f"no server answers at {url} ({type(error).__name__}): start the gateway with `specgate serve` "
            "(or pass --url to the one you run)"
        ) from error
    if response.status_code == 404:
        return {}  # a server without a model list: --profiles names what to send
    if response.status_code != 200:
        raise BenchError(f"{url}/v1/models answered HTTP {response.status_code}: is this an OpenAI-compatible server?")
    data = response.json().get("data") or []
    return {info.name: info for info in (ProfileInfo.from_listing(item) for item in data)}


@dataclass
class Sample:
    """What one request did, as measured by the client (times in seconds)."""

    arm: str
    profile: str
    prompt_id: str
    rep: int
    k: int | None
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    decode_seconds: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    spec: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    # The 1-minute load average when the request ended: on a shared machine, part of every figure.
    load: float | None = None

    @property
    def server_decode_seconds(self) -> float | None:
        predicted = (self.timings or {}).get("predicted_ms")
        return predicted / 1000.0 if isinstance(predicted, int | float) and predicted > 0 else None

    @property
    def burst(self) -> bool:
        """True when the tokens reached the client in fewer, larger pieces than the backend made them.

        A busy machine delays the gateway or the client; the tokens then arrive together and the
        client-side decode window shrinks towards zero (a fast tiny model reads as 90,000 tokens/sec).
        """
        server = self.server_decode_seconds
        return server is not None and (self.decode_seconds is None or self.decode_seconds < 0.5 * server)

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first over first -> last token, as the client saw them; for a burst, the
        backend's own generation time (from the response's `timings`) stands in for the window."""
        # The first token is prompt processing's; decode speed counts the ones after it.
        window = self.server_decode_seconds if self.burst else self.decode_seconds
        if window is None or window <= 0 or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / window

    @property
    def output(self) -> str:
        """Text plus tool calls: what the equality check compares."""
        if not self.tool_calls:
            return self.text
        return self.text + json.dumps([call.get("function") for call in self.tool_calls], sort_keys=True)

    def as_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "profile": self.profile,
            "prompt_id": self.prompt_id,
            "rep": self.rep,
            "k": self.k,
            "ok": self.ok,
            "error": self.error,
            "ttft_s": self.ttft,
            "e2e_s": self.e2e,
            "decode_s": self.decode_seconds,
            "decode_tokens_per_second": self.decode_tps,
            "burst": self.burst,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": self.finish_reason,
            "speculative_decoding": self.spec,
            "timings": self.timings,
            "load_average_1m": self.load,
            "text": self.text,
            "tool_calls": self.tool_calls,
        }


def _has_output(delta: dict[str, Any]) -> bool:
    return bool(delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"))


class _ToolCallAssembler:
    """Streams carry tool calls in pieces keyed by index (OpenAI); join them into whole calls."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, Any]] = {}

    def add(self, pieces: list[dict[str, Any]]) -> None:
        for position, piece in enumerate(pieces):
            index = piece.get("index", position)
            call = self.calls.setdefault(index, {"type": "function", "function": {"name": "", "arguments": ""}})
            if piece.get("id"):
                call["id"] = piece["id"]
            function = piece.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            arguments = function.get("arguments")
            call["function"]["arguments"] += arguments if isinstance(arguments, str) else json.dumps(arguments or "")

    def result(self) -> list[dict[str, Any]]:
        return [self.calls[index] for index in sorted(self.calls)]


def stream_chat(http: httpx.Client, url: str, body: dict[str, Any], sample: Sample, timeout: float) -> Sample:
    """Send `body` as a streaming chat completion and fill `sample`; failures land in `sample.error`."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    try:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                sample.error = _error_message(response)
                return sample
            _read_stream(response, sample, started)
    except (httpx.TransportError, SSEError) as error:
        sample.error = f"{type(error).__name__}: {error}"
        return sample
    sample.e2e = time.perf_counter() - started
    return sample


def _read_stream(response: httpx.Response, sample: Sample, started: float) -> None:
    first: float | None = None
    last: float | None = None
    text: list[str] = []
    tools = _ToolCallAssembler()
    done = False
    # Comments (the gateway's `: queued`, `: prompt n/m`) are no events: they never count as output.
    for event in EventSource(response).iter_sse():
        if event.data == "[DONE]":
            done = True
            break
        now = time.perf_counter()
        chunk = json.loads(event.data)
        if "error" in chunk and not chunk.get("choices"):
            error = chunk["error"]
            sample.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if _has_output(delta):
                first = now if first is None else first
                last = now
            text.append(delta.get("content") or "")
            tools.add(delta.get("tool_calls") or [])
            sample.finish_reason = choice.get("finish_reason") or sample.finish_reason
        if chunk.get("usage"):
            _absorb_usage(sample, chunk)
    sample.text = "".join(text)
    sample.tool_calls = tools.result()
    if first is not None and last is not None:
        sample.ttft = first - started
        sample.decode_seconds = last - first
    sample.ok = done
    if not done:
        sample.error = "the stream ended without [DONE]"


def _absorb_usage(sample: Sample, chunk: dict[str, Any]) -> None:
    usage = chunk["usage"]
    sample.completion_tokens = int(usage.get("completion_tokens") or 0)
    sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    sample.cached_tokens = int(details.get("cached_tokens") or 0)
    metrics = chunk.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("speculative_decoding"), dict):
        sample.spec = metrics["speculative_decoding"]
    if isinstance(chunk.get("timings"), dict):
        sample.timings = chunk["timings"]


def _error_message(response: httpx.Response) -> str:
    raw = response.read()
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}: {raw[:300].decode(errors='replace')}"
    message = error.get("message") if isinstance(error, dict) else error
    return f"HTTP {response.status_code}: {message}"


def backend_blas(http: httpx.Client, url: str, profiles: list[str]) -> dict[str, str | None]:
    """The BLAS each profile's backend reported (specgate's /v1/models `backend.blas`), for the machine
    description: a CPU figure means little without it. Empty for servers that do not say."""
    try:
        response = http.get(f"{url}/v1/models", timeout=10.0)
        data = (response.json().get("data") or []) if response.status_code == 200 else []
    except (httpx.TransportError, ValueError):
        return {}
    found: dict[str, str | None] = {}
    for item in data:
        backend = item.get("backend") if isinstance(item, dict) else None
        if item.get("id") in profiles and isinstance(backend, dict):
            found[str(item["id"])] = backend.get("blas")
    return found
