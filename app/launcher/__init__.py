"""The backend program: `python -m app.launcher` runs mlx_lm.server with specgate's hooks installed.

mlx_lm.server is imported and run as it is (never copied); the hooks replace a few names in its module
namespace with subclasses or wrappers:

- `stats.py`: per-request speculative-decoding figures and timings, backend-wide counters, the requests
  in progress (`/specgate/stats`).
- `cache_fixes.py`: a prompt cache that fixes bugs B1 and B2 of mlx-lm 0.32.2.
- `disk_tier.py`, `prompt_store.py`, `prompt_files.py`: that prompt cache backed by files on disk, which
  outlive the process (restart, TTL unload, eviction).
- `loading.py`: dtype cast after loading, the load event.
- `http_handler.py`: the HTTP handler: in-band figures, `/specgate/stats`, request-id logging.
- `prefill.py`: an answer that starts with given text (a forced tool call's opening).
- `client_watch.py`, `abandon.py`: a prompt whose client has left stops at the next prefill chunk; prompt
  progress on every path, including those with a draft.
- `hooks.py`: installs all of the above into `mlx_lm.server`.
- `__main__.py`: the command line.

Prompt progress: mlx_lm.server 0.32.2 itself writes `: keepalive n/m` SSE comments on a stream while it
processes the prompt (its `progress_callback`, once per prefill chunk), except with a draft model, where
abandon.py reports the main model's chunks the same way; the gateway shows them to clients as
`: prompt n/m` (docs/architecture.md, launcher -> gateway contract).
"""
