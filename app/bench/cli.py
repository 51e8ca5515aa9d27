"""`specgate bench`: the command line. The work lives in the other modules of this package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.bench.client import BenchError, normalize_url
from app.bench.prompts import BUILTIN, PromptSetError, load_prompt_set

DEFAULT_URL = "http://127.0.0.1:8000"


def parse_k_range(text: str) -> list[int]:
    """`0:8` (both ends included), `2:8:2`, or a list `1,3,5`."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            step = parts[2] if len(parts) == 3 else 1
            values = list(range(parts[0], parts[1] + 1, step))
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:END[:STEP] or a list like 1,3,5") from None
    if not values or any(not 0 <= value <= 64 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: draft lengths must be between 0 and 64")
    return values


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(target).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        print(f"bench: wrote {target}", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench import report
    from app.bench.results import analyze
    from app.bench.runner import BenchConfig, Runner

    try:
        prompts = load_prompt_set(args.prompts).limited(args.limit)
        config = BenchConfig(
            url=normalize_url(args.url),
            prompts=prompts,
            profiles=[name for group in args.profiles or [] for name in _names(group)] or None,
            baseline=args.baseline,
            repetitions=args.repetitions,
            warmup=args.warmup,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            sweep_k=args.sweep_k,
            timeout=args.timeout,
        )
        result = analyze(Runner(config).run())
        if args.plot:
            from app.bench.plot import write_plot

            write_plot(result, Path(args.plot))
            print(f"bench: wrote {args.plot}", file=sys.stderr)
    except (BenchError, PromptSetError) as error:
        print(f"specgate bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specgate bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        _write(args.json, report.json_report(result))
    if args.markdown:
        _write(args.markdown, report.markdown_report(result))
    if "-" not in (args.json, args.markdown):
        print(report.text_report(result))
    return 0


def _add_main_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"gateway or OpenAI-compatible URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--profiles",
        action="append",
        metavar="A,B",
        help="profiles to measure (default: every speculative profile present); baseline twins are added",
    )
    parser.add_argument("--baseline", help="compare with this profile instead of each profile's twin")
    parser.add_argument(
        "--prompts",
        default="coding",
        help=f"built-in set ({', '.join(BUILTIN)}), a JSONL/JSON file, or several joined by commas (default coding)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N prompts of the set")
    parser.add_argument("-n", "--repetitions", type=int, default=2, help="measured runs of each prompt (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per arm first (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, so outputs can be compared")
    parser.add_argument(
        "--sweep-k",
        type=parse_k_range,
        metavar="START:END",
        help="also send num_draft_tokens = each k (e.g. 0:8, both ends included) and name the best",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per request (default 1800)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write JSON (no FILE or -: stdout)")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE", help="write a Markdown report")
    parser.add_argument("--plot", metavar="FILE.png", help="write a plot (needs matplotlib: the bench extra)")


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure speculative profiles against their baselines, the gateway's overhead, tool decisions",
        description="Measure decode speed, time to first token, acceptance and greedy equality of speculative "
        "profiles against their baseline twins, through a running gateway (or any OpenAI-compatible URL). "
        "Sub-commands: overhead, discrimination, prompt-cache.",
    )
    _add_main_options(bench)
    bench.set_defaults(func=cmd_bench)
    commands = bench.add_subparsers(dest="bench_command", metavar="{overhead,discrimination,prompt-cache}")
    from app.bench import discrimination, overhead, prompt_cache

    overhead.register(commands)
    discrimination.register(commands)
    prompt_cache.register(commands)
