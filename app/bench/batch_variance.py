"""Does this BLAS round a row differently when it comes in a batch, and does that change greedy answers?

`python -m app.bench.batch_variance [--blas auto|off|PATH] [--model M --draft D] [--prompts coding]`

Why: a speculative step verifies k+1 tokens in one forward pass (every matmul has k+1 rows), plain
decoding runs one row at a time. Greedy output is only guaranteed equal if row i of a k+1-row product
equals the same row computed alone, bit for bit. Netlib's reference BLAS has that property (one loop
order whatever the shape); optimized BLAS libraries pick kernels by shape and may not. This command
measures both levels on the machine it runs on:

1. matmul: for decode-shaped weights, is each row of an m-row product (m = 2..9) bitwise the 1-row result?
2. models (with `--model` and `--draft`): greedy tokens of plain decoding against speculative decoding at
   each k, in this process, and where they first differ.

It re-runs itself with the chosen BLAS preloaded (app/blas.py), as a backend would be.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

# (output features, input features) of Qwen2.5-Coder-1.5B's matmuls, the lm head, and tiny ones.
SHAPES: tuple[tuple[int, int], ...] = ((8960, 1536), (1536, 8960), (1536, 1536), (256, 1536), (151936, 1536), (64, 64))
ROWS = range(2, 10)
_CHILD = "SPECGATE_BATCH_VARIANCE_CHILD"


@dataclass(frozen=True)
class Divergence:
    prompt_id: str
    k: int
    tokens: int
    first_difference: int | None  # index of the first differing token; None: identical


def matmul_variance(shapes: Iterable[tuple[int, int]] = SHAPES) -> dict[tuple[int, int], list[int]]:
    """For each weight shape, the row counts m whose products differ from the 1-row product anywhere."""
    import mlx.core as mx

    mx.random.seed(0)
    variant: dict[tuple[int, int], list[int]] = {}
    with mx.stream(mx.cpu):
        for n, k in shapes:
            weight = mx.random.normal((n, k))
            rows = mx.random.normal((max(ROWS), k))
            alone = [rows[i : i + 1] @ weight.T for i in range(max(ROWS))]
            mx.eval(weight, rows, *alone)
            differing = []
            for m in ROWS:
                batch = rows[:m] @ weight.T
                mx.eval(batch)
                if any(bool(mx.any(batch[i : i + 1] != alone[i]).item()) for i in range(m)):
                    differing.append(m)
            variant[(n, k)] = differing
    return variant


def greedy_divergences(
    model_dir: str, draft_dir: str, prompt_set: str, max_tokens: int, ks: list[int]
) -> list[Divergence]:
    """Plain greedy decoding against speculative decoding at each k, token by token, per prompt."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.sample_utils import make_sampler

    from app.bench.prompts import load_prompt_set

    model, tokenizer = load(model_dir)[:2]
    draft = load(draft_dir)[0]
    for loaded in (model, draft):
        loaded.set_dtype(mx.float32)
        mx.eval(loaded.parameters())
    sampler = make_sampler(0.0)
    found = []
    for prompt in load_prompt_set(prompt_set).prompts:
        tokens = mx.array(tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True))  # type: ignore[no-untyped-call]
        plain = [int(t) for t, _ in generate_step(tokens, model, sampler=sampler, max_tokens=max_tokens)]
        for k in ks:
            steps = speculative_generate_step(
                tokens, model, draft, sampler=sampler, max_tokens=max_tokens, num_draft_tokens=k
            )
            speculative = [int(step[0]) for step in steps]
            pairs = zip(plain, speculative, strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if first is None and len(plain) != len(speculative):
                first = min(len(plain), len(speculative))
            found.append(Divergence(prompt.id, k, len(plain), first))
            where = "identical" if first is None else f"first differs at token {first}"
            print(f"  {prompt.id} k={k}: {len(plain)} tokens, {where}", file=sys.stderr, flush=True)
    return found


def _resolve(value: str) -> str:
    from app.models.sources import describe_source
    from app.settings import Settings

    status = describe_source(value, Settings().model_store)
    if not status.present or status.path is None:
        raise SystemExit(f"{value}: {status.detail}")
    return status.path


def _reexec_with_blas(value: str) -> None:
    """Run this command again with the BLAS preloaded: a preload only acts at process start."""
    from app.blas import plan, validate_value

    env = dict(os.environ)
    plan(validate_value(value)).apply(env)
    env[_CHILD] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "app.bench.batch_variance", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.bench.batch_variance", description=__doc__.split("\n")[0])
    parser.add_argument("--blas", default="auto", help="auto (default), off, or a library path (app/blas.py)")
    parser.add_argument("--model", help="main model (catalog:NAME, a directory, gguf:PATH) for the greedy check")
    parser.add_argument("--draft", help="draft model for the greedy check")
    parser.add_argument("--prompts", default="coding", help="prompt set (default coding)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", default="3,5", help="draft lengths, comma-separated (default 3,5)")
    args = parser.parse_args(argv)
    if os.environ.get(_CHILD) != "1":
        _reexec_with_blas(args.blas)
    from app.launcher.blas_probe import probe

    report = probe(os.environ.get("SPECGATE_BLAS_EXPECTED") or None)
    print(f"BLAS: {report.summary}, sgemm {report.gflops} GFLOP/s ({report.library})")
    started = time.perf_counter()
    for (n, k), rows in matmul_variance().items():
        verdict = "batch-invariant" if not rows else f"rows differ from the 1-row product at m = {rows}"
        print(f"  x[m, {k}] @ W[{k}, {n}]: {verdict}")
    if args.model and args.draft:
        ks = [int(value) for value in args.k.split(",")]
        found = greedy_divergences(_resolve(args.model), _resolve(args.draft), args.prompts, args.max_tokens, ks)
        same = sum(1 for item in found if item.first_difference is None)
        print(
            f"greedy speculative = plain: {same}/{len(found)} (prompt, k) pairs identical over {args.max_tokens} tokens"
        )
        for item in found:
            if item.first_difference is not None:
                print(f"  {item.prompt_id} k={item.k}: first differs at token {item.first_difference}")
    print(f"({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
