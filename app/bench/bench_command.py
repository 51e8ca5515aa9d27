"""`specgate bench`: the command line. The work lives in the other modules of this package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.bench import capacity_command, discrimination, overhead, prompt_cache
from app.bench.arguments import DEFAULT_URL, parse_k_range, profile_names, write_output
from app.bench.client import BenchError, normalize_url
from app.bench.prompts import BUILTIN, PromptSetError, load_prompt_set


def cmd_bench(args: argparse.Namespace) -> int:
    from app.bench import report
    from app.bench.results import analyze
    from app.bench.runner import BenchConfig, Runner

    try:
        prompts = load_prompt_set(args.prompts).limited(args.limit)
        config = BenchConfig(
            url=normalize_url(args.url),
            prompts=prompts,
            profiles=profile_names(args.profiles),
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
        write_output(args.json, report.json_report(result))
    if args.markdown:
        write_output(args.markdown, report.markdown_report(result))
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
        "Sub-commands: overhead, discrimination, prompt-cache, capacity.",
    )
    _add_main_options(bench)
    bench.set_defaults(func=cmd_bench)
    commands = bench.add_subparsers(dest="bench_command", metavar="{overhead,discrimination,prompt-cache,capacity}")
    overhead.register(commands)
    discrimination.register(commands)
    prompt_cache.register(commands)
    capacity_command.register(commands)
