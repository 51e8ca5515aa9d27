"""`python -m app.bench.roundcost MODEL_DIR [fused|unfused]`: what one verification pass costs.

Times one forward pass of the model over q new tokens (q = 1 is a decode step, q = k + 1 a verification
round) after a 360-token prompt, two ways: with the key sequence growing every pass, as in real
generation, and with the cache trimmed back after each pass so the same shape repeats. A gap between the
two is a per-shape cost (on mlx's CUDA backend: a cuDNN plan built per shape, see docs/benchmarks.md);
`unfused` runs the same passes with app/launcher/verify_attention.py's plain-ops attention installed.
Needs only the model directory; prints medians of 15 passes (after 3 unmeasured ones per size).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

PASSES = 15
SIZES = (1, 3, 5, 9)


def _time_passes(model: Any, cache: list[Any], rows: int, trim: bool, passes: int = PASSES) -> list[float]:
    import mlx.core as mx
    from mlx_lm.models.cache import trim_prompt_cache

    times = []
    for _ in range(passes):
        start = time.perf_counter()
        mx.eval(model(mx.array([[100 + i for i in range(rows)]]), cache=cache))
        times.append(time.perf_counter() - start)
        if trim:
            trim_prompt_cache(cache, rows)
    return times


def main(argv: list[str]) -> int:
    if not argv or argv[-1] in ("-h", "--help") or (len(argv) > 1 and argv[1] not in ("fused", "unfused")):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    mode = argv[1] if len(argv) > 1 else "fused"
    if mode == "unfused":
        from app.launcher.verify_attention import install

        install("unfused")
    loaded = load(argv[0])
    model, tokenizer = loaded[0], loaded[1]
    cache = make_prompt_cache(model)
    prompt = tokenizer.encode("def add(a, b):\n    return a + b\n" * 30)
    mx.eval(model(mx.array([prompt]), cache=cache))
    print(f"{mx.default_device()}, prompt of {len(prompt)} tokens, {mode} attention")
    for rows in (1, 2, 3, 5, 9):  # warm-up: compile each size's kernels once
        _time_passes(model, cache, rows, trim=False, passes=3)
    for rows in SIZES:
        growing = _time_passes(model, cache, rows, trim=False)
        repeated = _time_passes(model, cache, rows, trim=True)
        print(
            f"{mode} q={rows}: growing keys {statistics.median(growing) * 1e3:.2f} ms "
            f"(max {max(growing) * 1e3:.1f}), repeated shape {statistics.median(repeated) * 1e3:.2f} ms",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
