"""Attention for verification rounds on mlx's CUDA backend, without a per-shape cuDNN build.

Why: mlx's CUDA `scaled_dot_product_attention` hands a call with several query rows to cuDNN and caches
cuDNN's execution plan keyed on the exact q/k/v shapes. A verification round (k drafted tokens + 1
checked in one pass) has k + 1 query rows over a key sequence that is longer every round, so every round
misses that cache and builds a new cuDNN graph in every attention layer: on an H100 that costs about
75 ms per round, ten plain decode steps, and no acceptance rate pays it back (docs/benchmarks.md).

What: on CUDA, a call with a few query rows over a longer key sequence (a verification round, or the
tail of a prompt after a prompt-cache hit) is computed here with plain mlx ops (two matmuls and a
softmax in float32), which compile once per kernel, not per shape. One-row decode steps keep mlx's
vector kernel and a whole prompt's prefill (key length = query length) keeps cuDNN's flash kernel.
On other devices nothing changes (the CPU's float32 results stay bit for bit what they were).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx

# More query rows than this is a prompt, not a verification round: cuDNN's kernel earns its build there.
MAX_QUERY_ROWS = 32
MODES = ("auto", "fused", "unfused")
ENV = "SPECGATE_VERIFY_ATTENTION"


def on_cuda() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu)


def unfused_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    """softmax(q k^T * scale [+ causal mask]) v with grouped-query heads, as mlx's own fallback computes it.

    queries: (B, Hq, Lq, D); keys, values: (B, Hkv, Lk, D), Hq a multiple of Hkv. A causal mask is
    aligned bottom-right: query row i sits at position Lk - Lq + i and sees keys 0..Lk - Lq + i.
    """
    batch, query_heads, query_len, dim = queries.shape
    kv_heads, key_len = keys.shape[1], keys.shape[2]
    group = query_heads // kv_heads
    # Query head h reads key/value head h // group: fold each group's rows together for one matmul.
    grouped = (queries * scale).reshape(batch, kv_heads, group * query_len, dim)
    scores = (grouped @ keys.swapaxes(-1, -2)).reshape(batch, kv_heads, group, query_len, key_len)
    if causal:
        rows = mx.arange(key_len - query_len, key_len)[:, None]
        visible = mx.arange(key_len)[None, :] <= rows
        scores = mx.where(visible, scores, mx.array(-float("inf"), scores.dtype))
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(batch, kv_heads, group * query_len, key_len)
    return (weights @ values).reshape(batch, query_heads, query_len, values.shape[-1])


def routed_sdpa(fused: Callable[..., mx.array]) -> Callable[..., mx.array]:
    """Wrap mlx's fused attention: verification-shaped calls go to `unfused_attention`."""

    def scaled_dot_product_attention(
        queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: Any = None, **kwargs: Any
    ) -> mx.array:
        query_len, key_len = queries.shape[2], keys.shape[2]
        plain_mask = mask is None or (isinstance(mask, str) and mask == "causal")
        grouped_heads = queries.shape[1] % keys.shape[1] == 0 and kwargs.get("sinks") is None
        if 1 < query_len <= MAX_QUERY_ROWS and key_len > query_len and plain_mask and grouped_heads:
            return unfused_attention(queries, keys, values, scale, causal=mask == "causal")
        return fused(queries, keys, values, scale=scale, mask=mask, **kwargs)

    scaled_dot_product_attention.__wrapped__ = fused  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def resolve_mode(flag: str) -> str:
    """The mode to use: the flag, unless the environment overrides it (a kill switch without a restart
    of the gateway's profile: set it in the gateway's environment)."""
    mode = os.environ.get(ENV, flag) or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def install(mode: str) -> bool:
    """Route verification-shaped attention as `mode` says; True when the unfused path is in use.

    mlx_lm's models call `mx.fast.scaled_dot_product_attention` through the module attribute at call
    time (mlx_lm/models/base.py), so replacing the attribute reaches every model architecture.
    """
    if mode == "fused" or (mode == "auto" and not on_cuda()):
        return False
    current = mx.fast.scaled_dot_product_attention
    if not hasattr(current, "__wrapped__"):
        mx.fast.scaled_dot_product_attention = routed_sdpa(current)
    return True
