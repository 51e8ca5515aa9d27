"""Stop a request's prompt processing once its client has gone: checked between prefill chunks.

mlx_lm.server 0.32.2 stops a request only between generated tokens, and only once the handler thread
failed to write to the client; a prompt of thousands of tokens went on being processed, chunk by chunk,
for minutes after the gateway had closed the connection, while the next request waited (issue 16).
Here the generation thread asks the request's `ClientWatch` (client_watch.py) at every chunk boundary of every
path, and stops the prefill when the client has gone:

- one request at a time, no draft (`generate_step`): its `prompt_progress_callback`, once per chunk,
  goes through `PromptWatch.progress`, which raises `ClientGone` out of the prefill loop;
- with a draft model or prompt lookup (`speculative_generate_step`, which gets no progress callback): the
  models it is handed are wrapped in `PrefillWatchedModel`, which reports and checks before each prefill
  chunk's forward pass (the previous chunk has been evaluated by then);
- the batch generator: the server reads `ctx._should_stop` after every chunk and token of every request,
  and `WatchedGenerationContext` (generation.py) answers True when the client has gone.

`ClientGone` ends `_serve_single`'s work through its own error path: nothing is stored in the prompt
cache, the exception reaches the handler (if it still waits), and the generation thread takes the next
request. The handler thread also stops waiting for a request the generation thread abandoned
(`SpecgateResponseGenerator._await_response` in generation.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from app.launcher.lookup import LookupDrafter
from app.launcher.ranks import agree_any
from app.launcher.stats import BackendCounters, RequestStats

logger = logging.getLogger("specgate.launcher")
ProgressCallback = Callable[[int, int], None]


class ClientGone(Exception):
    """The client of the request being served closed its connection: its work stops here."""


class PromptWatch:
    """One request's prompt processing, seen from the generation thread."""

    def __init__(
        self, stats: RequestStats, counters: BackendCounters, report: ProgressCallback | None, collective: bool = False
    ) -> None:
        self.stats = stats
        self.counters = counters
        self._report = report
        # Served by several ranks: every rank checks at the same chunks, and all stop if rank 0's client left.
        self._collective = collective

    def progress(self, processed: int, total: int) -> None:
        """`processed` of `total` prompt tokens are done: record, report (SSE comment), then check."""
        self.stats.prompt_progress(processed, total)
        if self._report is not None:
            self._report(processed, total)
        if processed < total:
            self.check()

    def check(self) -> None:
        """Raise ClientGone when the client has left, counting the prompt as abandoned."""
        gone = self.stats.client_gone()
        if self._collective:
            gone = agree_any(gone)
        if gone:
            abandon(self.stats, self.counters)
            raise ClientGone(f"client gone at prompt {self.stats.prompt_processed}/{self.stats.prompt_total}")


class PrefillWatchedModel:
    """A model as `speculative_generate_step` sees it, whose prefill calls report and check first.

    Both speculative paths prefill all prompt tokens but the last, in calls of at most
    `prefill_step_size` tokens, each evaluated before the next call; the calls after that are decoding.
    The main model reports its progress; the draft (which prefills first) reports the start and checks.
    Everything else is the model's own (`layers`, parameters), so the computation is unchanged.
    """

    def __init__(self, model: Any, prompt_tokens: int, watch: PromptWatch, reports: bool) -> None:
        self._model = model
        self._watch = watch
        self._reports = reports
        self._total = prompt_tokens
        self._processed = 0
        self._prefilling = prompt_tokens > 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if self._prefilling:
            self._before_chunk()
            self._processed += int(inputs.shape[-1])
            self._prefilling = self._processed < self._total - 1
        elif self._reports and self._watch.stats.prompt_processed < self._total:
            self._watch.progress(self._total, self._total)  # the last prompt token goes in with decoding
        return self._model(inputs, *args, **kwargs)

    def _before_chunk(self) -> None:
        if self._reports:
            self._watch.progress(self._processed, self._total)
        elif self._processed == 0:
            self._watch.progress(0, self._total)
        else:
            self._watch.check()


def watching_speculative_step(inner: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for `speculative_generate_step` that takes a `prompt_watch` (from generation.py)."""

    @functools.wraps(inner)
    def speculative_generate_step(
        prompt: Any, model: Any, draft_model: Any, *args: Any, prompt_watch: PromptWatch | None = None, **kwargs: Any
    ) -> Any:
        if prompt_watch is not None:
            size = int(prompt.size)
            model = PrefillWatchedModel(model, size, prompt_watch, reports=True)
            # A prompt-lookup drafter is no model: it does no prefill.
            if not isinstance(draft_model, LookupDrafter):
                draft_model = PrefillWatchedModel(draft_model, size, prompt_watch, reports=False)
        return inner(prompt, model, draft_model, *args, **kwargs)

    return speculative_generate_step


def stop_for_gone_client(stats: RequestStats | None, counters: BackendCounters, stopped: bool) -> bool:
    """For `ctx._should_stop`: whether to stop (already `stopped`, or the client has gone). A prompt in
    progress whose client has gone counts as abandoned, whichever noticed first: the handler (a failed
    write, then `ctx.stop()`) or this check."""
    gone = stats is not None and stats.client_gone()
    if gone and stats is not None and stats.in_prompt:
        abandon(stats, counters)
    return stopped or gone


def abandon(stats: RequestStats, counters: BackendCounters) -> None:
    """Count and log a prompt whose processing stops here because its client left."""
    if stats.abandoned:
        return
    counters.prefill_abandoned(stats)
    logger.info(
        "specgate request %s: client gone, prompt processing stopped at %d/%s",
        stats.request_id or "-",
        stats.prompt_processed,
        stats.prompt_total,
    )
