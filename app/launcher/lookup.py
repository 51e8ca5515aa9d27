"""Prompt-lookup (n-gram) drafting: draft tokens copied from earlier text, verified by the main model.

The draft costs no model step: the most recent n-gram of prompt + output (longest n first, from
`max_ngram` down to `min_ngram`) is searched for earlier in the same text, and the tokens that
followed its latest earlier occurrence are proposed. Verification follows `speculative_generate_step`
of mlx-lm 0.32.2 exactly: one forward pass over the last token plus the d drafted tokens, keep the
longest prefix where the target's own choice equals the draft, then one token of the target; the KV
cache is trimmed by the rejected tokens. So greedy output is the target's greedy output.

It plugs into mlx-lm through the `draft_model` argument of `stream_generate`: the launcher passes a
`LookupDrafter` there, and `mlx_lm.generate.speculative_generate_step` is replaced by a dispatcher
that runs `lookup_generate_step` for it (and mlx-lm's own code for a real draft model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from app.launcher.stats import SpeculationCounter


@dataclass(frozen=True)
class LookupSettings:
    """The proposer's n-gram sizes (tokens); k per round is the request's `num_draft_tokens`."""

    min_ngram: int = 2
    max_ngram: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")


class TokenHistory:
    """prompt + output so far as a growing NumPy buffer: one vectorised search per round."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self._buffer = np.zeros(max(64, 2 * len(tokens)), dtype=np.int64)
        self._length = 0
        self.extend(tokens)

    def __len__(self) -> int:
        return self._length

    def extend(self, tokens: Sequence[int]) -> None:
        needed = self._length + len(tokens)
        if needed > len(self._buffer):
            grown = np.zeros(max(needed, 2 * len(self._buffer)), dtype=np.int64)
            grown[: self._length] = self._buffer[: self._length]
            self._buffer = grown
        self._buffer[self._length : needed] = np.asarray(tokens, dtype=np.int64)
        self._length = needed

    def append(self, token: int) -> None:
        self.extend([token])

    @property
    def tokens(self) -> np.ndarray:
        return self._buffer[: self._length]


def propose(tokens: np.ndarray | Sequence[int], k: int, settings: LookupSettings) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram.

    n runs from `max_ngram` down to `min_ngram`; the first n with an earlier occurrence wins, and
    among its occurrences the latest one (the nearest context, e.g. the line being rewritten).
    """
    text = np.asarray(tokens, dtype=np.int64)
    length = len(text)
    if k <= 0 or length < settings.min_ngram + 1:
        return []
    # Candidates: end positions c < length - 1 of an earlier occurrence; c + 1 is where its continuation
    # starts, so at least one token follows. Filter by one more token of the suffix at each step.
    candidates = np.nonzero(text[: length - 1] == text[length - 1])[0]
    survivors_by_n: dict[int, np.ndarray] = {1: candidates}
    for n in range(2, settings.max_ngram + 1):
        candidates = candidates[candidates >= n - 1]
        candidates = candidates[text[candidates - (n - 1)] == text[length - n]]
        if len(candidates) == 0:
            break
        survivors_by_n[n] = candidates
    for n in range(min(settings.max_ngram, max(survivors_by_n)), settings.min_ngram - 1, -1):
        found = survivors_by_n.get(n)
        if found is not None and len(found) > 0:
            start = int(found[-1]) + 1
            return [int(token) for token in text[start : start + k]]
    return []


class LookupDrafter:
    """One request's proposer: its full token history and the counter its rounds are reported into.

    Passed to `stream_generate` as `draft_model`; it is not a model (no layers, no cache of its own).
    """

    def __init__(self, prompt: Sequence[int], settings: LookupSettings, counter: SpeculationCounter | None) -> None:
        self.history = TokenHistory(prompt)
        self.settings = settings
        self.counter = counter

    def draft(self, k: int) -> list[int]:
        return propose(self.history.tokens, k, self.settings)


def lookup_generate_step(
    prompt: mx.array,
    model: Any,
    drafter: LookupDrafter,
    stream: Any,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list[Callable[[mx.array, mx.array], mx.array]] | None = None,
    prompt_cache: list[Any] | None = None,
    prefill_step_size: int = 512,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
) -> Generator[tuple[int, mx.array, bool], None, None]:
    """`speculative_generate_step` with the proposer in place of a draft model; same yields."""
    cache = prompt_cache[: len(model.layers)] if prompt_cache is not None else make_prompt_cache(model)
    if not can_trim_prompt_cache(cache):
        raise ValueError("prompt-lookup drafting requires a trimmable prompt cache")
    sample = sampler or greedy_sampler
    quantize = functools.partial(
        maybe_quantize_kv_cache,
        quantized_kv_start=quantized_kv_start,
        kv_group_size=kv_group_size,
        kv_bits=kv_bits,
    )

    def verify(y: mx.array, drafted: list[int]) -> tuple[list[int], mx.array]:
        """One forward pass over y + drafted; the target's choice after each of its 1 + d positions."""
        inputs = mx.concatenate([y, mx.array(drafted, mx.uint32)]) if drafted else y
        logits = model(inputs[None], cache=cache)[0, -(len(drafted) + 1) :, :]
        quantize(cache)
        if logits_processors:
            # Each position sees the text before it, as plain decoding would have at that point.
            history = drafter.history.tokens.tolist()
            rows = []
            for i in range(len(drafted) + 1):
                context = mx.array(history + drafted[:i], mx.uint32)
                row = logits[i : i + 1]
                for processor in logits_processors:
                    row = processor(context, row)
                rows.append(row)
            logits = mx.concatenate(rows, axis=0)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = sample(logprobs)
        mx.eval(chosen, logprobs)
        values: list[int] = chosen.tolist()  # type: ignore[assignment]  # a 1-d array of token ids
        return [int(t) for t in values], logprobs

    with mx.stream(stream):
        y = prompt.astype(mx.uint32)
        # Prefill all but the last prompt token, as mlx-lm does: the first round feeds that one.
        while y.size > 1:
            step = min(prefill_step_size, y.size - 1)
            model(y[:step][None], cache=cache)
            quantize(cache)
            mx.eval([c.state for c in cache])
            y = y[step:]
            mx.clear_cache()

        produced = 0
        drafted: list[int] = []
        accepted = 0
        try:
            while True:
                left = max_tokens - produced if max_tokens >= 0 else num_draft_tokens
                drafted = drafter.draft(min(num_draft_tokens, left))
                accepted = 0
                if drafter.counter is not None:
                    drafter.counter.open_round(len(drafted))
                chosen, logprobs = verify(y, drafted)
                while accepted < len(drafted) and chosen[accepted] == drafted[accepted]:
                    accepted += 1
                    produced += 1
                    drafter.history.append(chosen[accepted - 1])
                    yield chosen[accepted - 1], logprobs[accepted - 1], True
                    if produced == max_tokens:
                        break
                if produced != max_tokens:
                    produced += 1
                    drafter.history.append(chosen[accepted])
                    yield chosen[accepted], logprobs[accepted], False
                if produced == max_tokens:
                    break
                y = mx.array([chosen[accepted]], mx.uint32)
                # The cache holds y + every drafted token; keep y and the accepted ones.
                trim_prompt_cache(cache, len(drafted) - accepted)
                drafted, accepted = [], 0
        finally:
            # Stopped mid-round (max_tokens, stop word, client gone): drop what was not accepted,
            # so that the server stores a cache that matches the tokens it emitted.
            trim_prompt_cache(cache, len(drafted) - accepted)


def dispatching_speculative_step(original: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for `mlx_lm.generate.speculative_generate_step`: a `LookupDrafter` runs ours."""

    @functools.wraps(original)
    def speculative_generate_step(prompt: mx.array, model: Any, draft_model: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(draft_model, LookupDrafter):
            return lookup_generate_step(prompt, model, draft_model, *args, **kwargs)
        return original(prompt, model, draft_model, *args, **kwargs)

    return speculative_generate_step
