"""The HTTP handler: mlx_lm.server's `APIHandler` plus the figures, `/specgate/stats` and request ids.

One handler instance serves one HTTP request (in its own thread), so per-request state lives on `self`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from mlx_lm import server

from app.launcher.abandon import ClientGone
from app.launcher.client_watch import ClientWatch
from app.launcher.generation import attach_stats
from app.launcher.prefill import attach_prefill
from app.launcher.stats import BackendCounters, RequestStats

logger = logging.getLogger("specgate.launcher")

STATS_PATH = "/specgate/stats"


def handler_class(counters: BackendCounters) -> type[Any]:
    """An `APIHandler` subclass reporting into `counters`."""

    class SpecgateHandler(server.APIHandler):
        specgate_stats: RequestStats | None = None

        def do_GET(self) -> None:
            if self.path == STATS_PATH:
                self._send_json(counters.snapshot())
            else:
                super().do_GET()  # type: ignore[no-untyped-call]

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # The gateway asks for the stats at every refresh of a status page: not worth a log line each.
            if self.path != STATS_PATH:
                super().log_request(code, size)

        def _send_json(self, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self._set_completion_headers(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def handle_completion(self, request: Any, stop_words: list[str]) -> None:
            client = ClientWatch(self.connection)
            stats = RequestStats(request_id=self.headers.get("X-Request-Id"), client=client)
            attach_stats(request, stats)
            attach_prefill(request, getattr(self, "body", None))
            self.specgate_stats = stats
            counters.request_started(stats)
            outcome = "aborted"
            try:
                super().handle_completion(request, stop_words)
                outcome = "done"
            except (ClientGone, ConnectionError):
                # The client left (its prompt was abandoned, or a write found the connection closed):
                # nobody to answer, and nothing wrong with the server; no traceback in the log.
                outcome = "abandoned" if stats.abandoned else "aborted"
            finally:
                client.release()  # before the server closes the socket
                counters.request_finished(stats)
                _log_request(self.path, stats, outcome)

        def completion_usage_response(
            self,
            prompt_token_count: int | None = None,
            completion_token_count: int | None = None,
            prompt_cache_count: int | None = None,
        ) -> dict[str, Any]:
            response: dict[str, Any] = super().completion_usage_response(
                prompt_token_count, completion_token_count, prompt_cache_count
            )
            self._add_figures(response, prompt_token_count, completion_token_count, prompt_cache_count)
            return response

        def generate_response(
            self,
            text: str,
            finish_reason: Literal["length", "stop"] | None,
            prompt_token_count: int | None = None,
            completion_token_count: int | None = None,
            prompt_cache_count: int | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> dict[Any, Any]:
            response: dict[Any, Any] = super().generate_response(
                text, finish_reason, prompt_token_count, completion_token_count, prompt_cache_count, *args, **kwargs
            )
            # Non-streaming: this is the whole body, built once, after the last token.
            if not self.stream:
                self._add_figures(response, prompt_token_count, completion_token_count, prompt_cache_count)
            return response

        def _add_figures(
            self,
            response: dict[str, Any],
            prompt_tokens: int | None,
            generation_tokens: int | None,
            cached_tokens: int | None,
        ) -> None:
            if self.specgate_stats is None:
                return
            response["specgate"] = self.specgate_stats.to_json(
                prompt_tokens=prompt_tokens or 0,
                cached_tokens=cached_tokens if cached_tokens is not None else 0,
                generation_tokens=generation_tokens or 0,
            )

    return SpecgateHandler


def _log_request(path: str, stats: RequestStats, outcome: str) -> None:
    """One line per request: its id and figures, never its text."""
    spec = stats.speculation
    accepted = f"{spec.num_accepted_tokens}/{spec.num_draft_tokens}" if spec else "-"
    prompt = f", prompt {stats.prompt_processed}/{stats.prompt_total}" if stats.abandoned else ""
    logger.info(
        "specgate request %s %s %s: %d tokens, accepted/drafted %s%s",
        stats.request_id or "-",
        path,
        outcome,
        stats.tokens,
        accepted,
        prompt,
    )
