"""Hooks on mlx_lm.server's generation side: where tokens are made, counted and timed.

How one request's figures reach its own response, by construction:

1. The HTTP handler creates a `RequestStats` and attaches it to the `CompletionRequest` object it hands
   to `ResponseGenerator.generate` (see handler.py).
2. That very object travels through the request queue to the generation thread. With a draft model (and
   for any request the batch generator cannot take) the thread serves it in `_serve_single`, which calls
   `stream_generate` once, synchronously. The `_serve_single` override publishes the request's stats in a
   thread-local for exactly that call; the `stream_generate` wrapper counts into them.
3. `generate` returns the ctx and the token iterator to the handler thread; the override times the
   iterator into the same stats object. Timings are taken there for both paths (single and batched), so
   they mean the same thing: from the moment the generation thread took the request (it hands over the
   ctx first) to the first and the last token.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mlx_lm import server

from app.launcher.lookup import LookupDrafter, LookupSettings
from app.launcher.prefill import with_prefill
from app.launcher.stats import BackendCounters, RequestStats, SpeculationCounter

_STATS_ATTRIBUTE = "specgate_stats"

# The request `_serve_single` is serving right now. Thread-local because `stream_generate` is a plain
# function the server calls without any reference to the request; the generation thread serves one
# single request at a time, so "the current one" is well defined within it.
_serving = threading.local()


def attach_stats(request: Any, stats: RequestStats) -> None:
    setattr(request, _STATS_ATTRIBUTE, stats)


def stats_of(request: Any) -> RequestStats | None:
    stats = getattr(request, _STATS_ATTRIBUTE, None)
    return stats if isinstance(stats, RequestStats) else None


def _current_stats() -> RequestStats | None:
    stats: RequestStats | None = getattr(_serving, "stats", None)
    return stats


def _current_prompt() -> list[int] | None:
    prompt: list[int] | None = getattr(_serving, "prompt", None)
    return prompt


class SpecgateResponseGenerator(server.ResponseGenerator):
    """Carries each request's `RequestStats` into the generation thread and times its tokens."""

    # Set by `install` when the backend drafts by prompt lookup.
    prompt_lookup: LookupSettings | None = None
    # Set by `install` from --single-stream: no request goes to the batch generator.
    single_stream: bool = False

    def _serve_single(self, request: tuple[Any, Any, Any], stream: Any) -> None:
        _serving.stats = stats_of(request[1])
        try:
            super()._serve_single(request, stream)  # type: ignore[no-untyped-call]
        finally:
            _serving.stats = None
            _serving.prompt = None

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> Any:
        result = with_prefill(super()._tokenize(tokenizer, request, args), tokenizer, request)  # type: ignore[no-untyped-call]
        # The whole prompt: `stream_generate` only sees the part after the cached prefix, and prompt
        # lookup searches all of it.
        _serving.prompt = list(result[0])
        return result

    def _is_batchable(self, args: Any) -> bool:
        # Prompt lookup runs in `stream_generate` (the single path), like a model draft does.
        if self.prompt_lookup is not None or self.single_stream:
            return False
        return bool(super()._is_batchable(args))  # type: ignore[no-untyped-call]

    def generate(
        self,
        request: Any,
        generation_args: Any,
        progress_callback: Callable[[int, int], None] | None = None,
    ) -> tuple[Any, Iterator[Any]]:
        ctx, responses = super().generate(request, generation_args, progress_callback)
        stats = stats_of(request)
        if stats is None:
            return ctx, responses
        # The generation thread puts the ctx on the queue as it starts serving the request.
        stats.mark_started()
        return ctx, stats.timed(responses)


def counting_stream_generate(
    original: Callable[..., Any], counters: BackendCounters, lookup: LookupSettings | None = None
) -> Callable[..., Any]:
    """Wrap `stream_generate`: count every token, and speculative figures when a draft is used.

    With `lookup` set (and no draft model), a request with k > 0 drafts by prompt lookup: its
    `LookupDrafter` goes in as `draft_model`, which `stream_generate` hands to the (dispatching)
    `speculative_generate_step`. k = 0 decodes plainly.
    """
    signature = inspect.signature(original)

    def stream_generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        extra = call.arguments.get("kwargs", {})
        k = int(extra.get("num_draft_tokens", 2))
        if lookup is not None and call.arguments.get("draft_model") is None and k > 0:
            counter: SpeculationCounter | None = SpeculationCounter(
                num_draft_tokens_per_round=k, max_tokens=int(call.arguments["max_tokens"]), explicit_rounds=True
            )
            prompt = call.arguments["prompt"]
            rest = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
            full = _current_prompt()
            # The server passes the prompt after its cached prefix; search the whole prompt.
            history = full if full is not None and full[len(full) - len(rest) :] == rest else rest
            call.arguments["draft_model"] = LookupDrafter(history, lookup, counter)
            responses = original(*call.args, **call.kwargs)
        else:
            counter = _speculation_counter(call.arguments)
            responses = original(*args, **kwargs)
        stats = _current_stats()
        if stats is not None and counter is not None:
            stats.speculation = counter
        return _counted(responses, counter, counters)

    return stream_generate


def _counted(responses: Iterator[Any], counter: SpeculationCounter | None, counters: BackendCounters) -> Iterator[Any]:
    try:
        for response in responses:
            counters.add_tokens(1)
            if counter is not None:
                counter.observe(bool(response.from_draft))
            yield response
    finally:
        # The server stops consuming on a stop word or a gone client. Close the inner generator now,
        # so that `speculative_generate_step` rewinds its caches before the server stores them.
        close = getattr(responses, "close", None)
        if close is not None:
            close()


def _speculation_counter(arguments: dict[str, Any]) -> SpeculationCounter | None:
    if arguments.get("draft_model") is None:
        return None
    extra = arguments.get("kwargs", {})
    # 2 is speculative_generate_step's own default, used when the caller passes none.
    return SpeculationCounter(
        num_draft_tokens_per_round=int(extra.get("num_draft_tokens", 2)),
        max_tokens=int(arguments["max_tokens"]),
    )


def counting_batch_generator(base: type[Any], counters: BackendCounters) -> type[Any]:
    """`BatchGenerator` (the path without a draft) that counts the tokens it generates."""

    class CountingBatchGenerator(base):  # type: ignore[misc]  # base is a parameter
        def next(self) -> tuple[list[Any], list[Any]]:
            prompt_responses, generation_responses = super().next()
            counters.add_tokens(len(generation_responses))
            return prompt_responses, generation_responses

    return CountingBatchGenerator


def current_request_stats() -> RequestStats | None:
    """The stats of the request `_serve_single` serves on this thread; None elsewhere (the batch path)."""
    return _current_stats()
