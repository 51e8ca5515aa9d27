"""Model loading hooks: the `--dtype` cast and the load event.

mlx_lm.server loads the main and the draft model with the module-level name `load`, then keeps them on
its `ModelProvider`; the generation thread loads the default model first thing (`load_default`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import server

from app.launcher.ranks import event_stream
from app.launcher.stats import BackendCounters

logger = logging.getLogger("specgate.launcher")

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}


def cast_model(model: Any, dtype: mx.Dtype) -> None:
    """Cast the floating-point parameters of `model` (quantized weights stay integer)."""
    model.set_dtype(dtype)
    # Materialize now: otherwise the first request pays for the cast, inside its prompt_seconds.
    mx.eval(model.parameters())


def model_dtype(model: Any) -> str | None:
    """The dtype(s) of the floating-point parameters actually loaded, e.g. "float32"."""
    if model is None:
        return None
    leaves = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    names = {
        str(value.dtype).removeprefix("mlx.core.") for _, value in leaves if mx.issubdtype(value.dtype, mx.floating)
    }
    return ",".join(sorted(names)) or None


def casting_load(original: Callable[..., Any], dtype_name: str) -> Callable[..., Any]:
    """Wrap mlx_lm's `load` so that every model it returns is cast to `dtype_name`."""
    dtype = DTYPES[dtype_name]

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        # (model, tokenizer) or (model, tokenizer, config): the model is always first.
        cast_model(result[0], dtype)
        return result

    return load


def emit_event(event: str, **fields: Any) -> None:
    """One `SPECGATE_EVENT {json}` line on stdout, flushed: the supervisor reads it as it comes. Of several
    ranks, rank 0 alone reports (ranks.py)."""
    stream = event_stream()
    if stream is not None:
        print("SPECGATE_EVENT " + json.dumps({"event": event, **fields}), file=stream, flush=True)


def model_provider_class(counters: BackendCounters) -> type[Any]:
    """`ModelProvider` that announces the loaded default model and dies if it cannot load it."""

    class SpecgateModelProvider(server.ModelProvider):
        def _load(self, model_path: Any, adapter_path: Any = None, draft_model_path: Any = None) -> None:
            if not (self.is_distributed and draft_model_path is not None and adapter_path is None):
                super()._load(model_path, adapter_path, draft_model_path)  # type: ignore[no-untyped-call]
                return
            # mlx_lm refuses a draft in a distributed run. The main model is sharded over the ranks as
            # mlx_lm does it; the draft is loaded whole on every rank. Each rank then drafts the same
            # tokens from the same weights and the same text (no collective in the draft's steps), and
            # verifies them with its shard of the main model: the ranks stay in lock-step.
            super()._load(model_path, None, None)  # type: ignore[no-untyped-call]
            # The module's `load` (as hooked: cast to --dtype), whole, never `sharded_load`.
            draft_model, draft_tokenizer = cast(Any, server).load(draft_model_path)[:2]
            provider: Any = self  # mlx_lm declares these attributes as None
            if draft_tokenizer.vocab_size != provider.tokenizer.vocab_size:
                logger.warning("draft model tokenizer does not match the model's; speculation may not work")
            logger.info("specgate: draft model %s loaded whole on this rank (main model sharded)", draft_model_path)
            provider.model_key = (model_path, None, draft_model_path)
            provider.draft_model = draft_model
            provider.is_batchable = False

        def load_default(self) -> None:
            started = time.perf_counter()
            try:
                super().load_default()  # type: ignore[no-untyped-call]
            except Exception:
                # mlx_lm.server would keep running with a dead generation thread: /health turns 503
                # and the supervisor waits for its deadline. Exiting lets it see the failure at once.
                logger.exception("specgate: loading the default model failed")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            if self.model is None:
                return
            main, draft = model_dtype(self.model), model_dtype(self.draft_model)
            counters.set_dtypes(main, draft)
            logger.info("specgate: loaded; model dtype %s, draft dtype %s", main, draft)
            emit_event("loaded", load_seconds=round(time.perf_counter() - started, 3))

    return SpecgateModelProvider
