"""Hooks on mlx_lm.server's generation side: where tokens are made, counted and timed.

How one request's figures reach its own response, by construction:

1. The HTTP handler creates a `RequestStats` and attaches it to the `CompletionRequest` object it hands
   to `ResponseGenerator.generate` (see http_handler.py).
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
import logging
import threading
from collections.abc import Callable, Iterator
from queue import Empty as QueueEmpty
from queue import Queue
from typing import Any

from mlx_lm import server

from app.launcher.abandon import ClientGone, PromptWatch, stop_for_gone_client
from app.launcher.lookup import LookupDrafter, LookupSettings
from app.launcher.prefill import with_prefill
from app.launcher.ranks import agree_any, world
from app.launcher.stats import BackendCounters, RequestStats, SpeculationCounter

logger = logging.getLogger("specgate.launcher")

_STATS_ATTRIBUTE = "specgate_stats"
# How often a handler thread waiting for its request's next output looks whether the generation
# thread abandoned it (mlx_lm's own wait checks only for a dead generation thread, every second).
_HANDLER_POLL_SECONDS = 0.25

# The request `_serve_single` is serving right now. Thread-local because `stream_generate` is a plain
# function the server calls without any reference to the request; the generation thread serves one
# single request at a time, so "the current one" is well defined within it.
_serving = threading.local()
# In a handler thread: the stats of the request it waits for.
_handling = threading.local()


class _ThisRankOnly:
    """A request's stats as carried on the request object, which is pickled when mlx_lm.server shares the
    request with the other ranks (ranks.py): they pickle as nothing (the stats hold the client's socket,
    which means nothing elsewhere, and a lock, which cannot be pickled)."""

    def __init__(self, stats: RequestStats) -> None:
        self.stats = stats

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _nothing, ()


def _nothing() -> None:
    return None


def attach_stats(request: Any, stats: RequestStats) -> None:
    setattr(request, _STATS_ATTRIBUTE, _ThisRankOnly(stats))


def stats_of(request: Any) -> RequestStats | None:
    holder = getattr(request, _STATS_ATTRIBUTE, None)
    return holder.stats if isinstance(holder, _ThisRankOnly) else None


def _serving_collectively() -> bool:
    """Whether the request being served is served by several ranks at once (`_serve_single` of a
    distributed run): then its stop decisions are taken by all ranks together."""
    return bool(getattr(_serving, "collective", False))


def _current_stats() -> RequestStats | None:
    stats: RequestStats | None = getattr(_serving, "stats", None)
    return stats


def _current_prompt() -> list[int] | None:
    prompt: list[int] | None = getattr(_serving, "prompt", None)
    return prompt


def tokenized_stats() -> RequestStats | None:
    """The stats of the request the generation thread tokenized last: the one it is setting up."""
    stats: RequestStats | None = getattr(_serving, "tokenized", None)
    return stats


class WatchedGenerationContext(server.GenerationContext):
    """`GenerationContext` whose stop flag also rises when the request's client has gone.

    The batch generator reads `_should_stop` after every prefill chunk and every token of each request
    and drops the request when it is set; the single-stream path reads it after every token. Both paths
    build the context right after `_tokenize`, which names the request's stats.
    """

    counters = BackendCounters()  # replaced by `install`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specgate_stats = tokenized_stats()
        self.specgate_collective = _serving_collectively()

    @property
    def _should_stop(self) -> bool:
        stop = stop_for_gone_client(self.__dict__.get("specgate_stats"), self.counters, self.__dict__["_stopped"])
        if not self.__dict__.get("specgate_collective", False):
            return stop
        # Several ranks serve this request in `_serve_single`, which reads this once after every token on
        # every rank. Rank 0 alone knows its client; all ranks stop together, or the others would wait in
        # the next token's collectives forever. mlx_lm raises NotImplementedError for a stop in a
        # distributed run: ClientGone instead ends the request on every rank the same way (no cache stored).
        if agree_any(stop):
            logger.info("specgate: rank 0 stopped the request being served (its client left); every rank stops it")
            raise ClientGone("rank 0 stopped this request; every rank stops it")
        return False

    @_should_stop.setter
    def _should_stop(self, value: bool) -> None:
        self.__dict__["_stopped"] = value


class AbandonAwareTimeBudget(server.TimeBudget):
    """The batch loop's time budget, cut short once a request in it was abandoned.

    The server runs `batch_generator.next()` (one prefill chunk, or one token for each request) for up
    to 0.5 s before it removes the requests whose `_should_stop` it saw; ending the budget there
    removes an abandoned prompt after the chunk that noticed, not 0.5 s of chunks later.
    """

    counters = BackendCounters()  # replaced by `install`

    def __iter__(self) -> AbandonAwareTimeBudget:
        self._abandoned_before = self.counters.prefills_abandoned
        super().__iter__()  # type: ignore[no-untyped-call]
        return self

    def __next__(self) -> None:
        # In a distributed run every rank must run the same iterations: leave the budget alone there.
        if not self._is_distributed and self.counters.prefills_abandoned != self._abandoned_before:
            raise StopIteration
        super().__next__()  # type: ignore[no-untyped-call]


class SpecgateResponseGenerator(server.ResponseGenerator):
    """Carries each request's `RequestStats` into the generation thread and times its tokens."""

    # Set by `install` when the backend drafts by prompt lookup.
    prompt_lookup: LookupSettings | None = None
    # Set by `install` from --single-stream: no request goes to the batch generator.
    single_stream: bool = False

    def _serve_single(self, request: tuple[Any, Any, Any], stream: Any) -> None:
        stats = stats_of(request[1])
        collective = world().distributed
        if stats is None and collective:
            # Another rank than 0 (the stats stayed there): a stand-in without a client, so that this rank
            # runs exactly the checks rank 0 runs, each of them a collective (`agree_any`).
            stats = RequestStats(request_id=None)
        _serving.stats = stats
        _serving.collective = collective
        try:
            super()._serve_single(request, stream)  # type: ignore[no-untyped-call]
        finally:
            _serving.stats = None
            _serving.prompt = None
            _serving.tokenized = None
            _serving.collective = False

    def _tokenize(self, tokenizer: Any, request: Any, args: Any) -> Any:
        result = with_prefill(super()._tokenize(tokenizer, request, args), tokenizer, request)  # type: ignore[no-untyped-call]
        # The whole prompt: `stream_generate` only sees the part after the cached prefix, and prompt
        # lookup searches all of it.
        _serving.prompt = list(result[0])
        # In `_serve_single` of a distributed run, the stand-in of another rank (set there) stays.
        _serving.tokenized = stats_of(request) or (_current_stats() if _serving_collectively() else None)
        return result

    def _await_response(self, response_queue: Queue[Any]) -> Any:
        """mlx_lm's wait, which also gives up on a request the generation thread abandoned.

        The batch generator drops such a request without a word to its handler (mlx_lm expects the
        handler to have gone already); a non-streaming handler would wait for it forever.
        """
        stats: RequestStats | None = getattr(_handling, "stats", None)
        while True:
            try:
                return response_queue.get(timeout=_HANDLER_POLL_SECONDS)
            except QueueEmpty:
                if not self.generation_available():  # type: ignore[no-untyped-call]
                    raise RuntimeError("generation thread died") from None
                if stats is not None and stats.abandoned:
                    raise ClientGone("the client left during prompt processing") from None
                # The batch generator also drops a generating request whose client left; a non-streaming
                # handler (which writes nothing until the end) would not notice by itself.
                if stats is not None and stats.client_gone():
                    raise ClientGone("the client left") from None

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
        _handling.stats = stats_of(request)
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
    """Wrap `stream_generate`: count every token, and speculative figures when a draft is used;
    watch the prompt processing of the request being served (abandon.py).

    With `lookup` set (and no draft model), a request with k > 0 drafts by prompt lookup: its
    `LookupDrafter` goes in as `draft_model`, which `stream_generate` hands to the (dispatching)
    `speculative_generate_step`. k = 0 decodes plainly.
    """
    signature = inspect.signature(original)

    def stream_generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        extra = call.arguments.setdefault("kwargs", {})
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
        else:
            counter = _speculation_counter(call.arguments)
        stats = _current_stats()
        if stats is not None:
            _watch_prompt(call.arguments, stats, counters)
            if counter is not None:
                stats.speculation = counter
        return _counted(original(*call.args, **call.kwargs), counter, counters)

    return stream_generate


def _watch_prompt(arguments: dict[str, Any], stats: RequestStats, counters: BackendCounters) -> None:
    """Route the prompt progress of this call through a PromptWatch (reports, then checks the client).

    Without a draft, `generate_step` calls the progress callback once per prefill chunk. With one,
    `stream_generate` drops the callback; the watch goes to `speculative_generate_step` instead.
    """
    extra = arguments["kwargs"]
    watch = PromptWatch(stats, counters, extra.pop("prompt_progress_callback", None), _serving_collectively())
    if arguments.get("draft_model") is None:
        extra["prompt_progress_callback"] = watch.progress
    else:
        extra["prompt_watch"] = watch


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
    """`BatchGenerator` (the path without a draft) that counts the tokens it generates and records each
    request's prompt progress (whose `ctx._should_stop` then sees a client gone mid-prompt)."""

    class CountingBatchGenerator(base):  # type: ignore[misc]  # base is a parameter
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.specgate_stats: dict[int, RequestStats] = {}

        def insert_segments(self, *args: Any, **kwargs: Any) -> list[int]:
            uids: list[int] = super().insert_segments(*args, **kwargs)
            stats = tokenized_stats()  # the server inserts one request at a time, right after `_tokenize`
            if stats is not None and len(uids) == 1:
                self.specgate_stats[uids[0]] = stats
            return uids

        def next(self) -> tuple[list[Any], list[Any]]:
            prompt_responses, generation_responses = super().next()
            for response in prompt_responses:
                stats = self.specgate_stats.get(response.uid)
                if stats is not None:
                    stats.prompt_progress(*response.progress)
            for response in generation_responses:
                if response.finish_reason is not None:
                    self.specgate_stats.pop(response.uid, None)
            counters.add_tokens(len(generation_responses))
            return prompt_responses, generation_responses

        def remove(self, uids: list[int], *args: Any, **kwargs: Any) -> Any:
            for uid in uids:
                self.specgate_stats.pop(uid, None)
            return super().remove(uids, *args, **kwargs)

    return CountingBatchGenerator


def current_request_stats() -> RequestStats | None:
    """The stats of the request `_serve_single` serves on this thread; None elsewhere (the batch path)."""
    return _current_stats()
