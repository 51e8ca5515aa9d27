"""`specgate bench discrimination`: does the model call a tool when it should, and answer when it should?

The project's five queries go through the gateway with two tools (code search, file reader) in OpenAI's
`tools` format. Three want a tool call, two a direct answer. Per profile: correct/5, what it decided for
each query, and for speculative profiles whether every decision (and the output itself) equals the
baseline twin's: a draft model must never change what the model does.

mlx_lm.server parses Qwen2.5's `<tool_call>` blocks into OpenAI `tool_calls`, and the gateway parses calls
written as text (fenced or bare JSON, app/proxy/toolcalls.py); both arrive as the stream's `tool_calls`,
which is what is counted. A `<tool_call>` block cut off by `max_tokens` fails mlx's parser and is dropped,
leaving an empty answer: counted as a tool call and marked `truncated` (raise `--max-tokens`). A call the
gateway left in the text (malformed JSON, cut off) is marked `unparsed`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from app.bench.arguments import DEFAULT_URL, profile_names, write_output
from app.bench.client import BenchError, Sample, normalize_url
from app.bench.prompts import five_queries
from app.bench.runner import Arm, BenchConfig, BenchRun, Runner

_TOOL_NAMES = ("search_code", "read_file")


@dataclass(frozen=True)
class Decision:
    prompt_id: str
    expected: str
    decided: str  # "tool" | "answer" | "invented-tool" | "error"
    note: str  # "", "truncated", "unparsed", or the error
    detail: str  # the call (name + arguments) or the start of the answer

    @property
    def correct(self) -> bool:
        return self.decided == self.expected

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "correct": self.correct}


# A function call (or a made-up tool definition) written as JSON text: `{"name": "...", "arguments": ...}`.
# Small models put these in a code fence or in `<tools>` instead of `<tool_call>`.
_WRITTEN_CALL = re.compile(r'\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"(?:arguments|parameters|description)"\s*:')


def decide(sample: Sample, expected: str) -> Decision:
    if sample.error is not None:
        return Decision(sample.prompt_id, expected, "error", sample.error, "")
    if sample.tool_calls:
        calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in sample.tool_calls]
        return Decision(sample.prompt_id, expected, "tool", "", "; ".join(calls))
    text = sample.text.strip()
    if "<tool_call>" in text or any(f'"name": "{name}"' in text for name in _TOOL_NAMES):
        return Decision(sample.prompt_id, expected, "tool", "unparsed", text[:120])
    invented = _WRITTEN_CALL.search(text)
    if invented is not None:
        # Neither a direct answer nor a usable call: wrong whatever was expected.
        note = f"calls {invented.group(1)!r}, which is not one of the tools"
        return Decision(sample.prompt_id, expected, "invented-tool", note, text[:120].replace("\n", " "))
    if not text and sample.finish_reason == "length":
        return Decision(sample.prompt_id, expected, "tool", "truncated", "")
    return Decision(sample.prompt_id, expected, "answer", "", text[:120].replace("\n", " "))


@dataclass
class ProfileDecisions:
    arm: Arm
    decisions: list[Decision]
    same_as_baseline: bool | None  # None for baselines and profiles without one
    differences: list[str]

    @property
    def correct(self) -> int:
        return sum(decision.correct for decision in self.decisions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.arm.profile,
            "baseline": self.arm.baseline,
            "correct": self.correct,
            "total": len(self.decisions),
            "decides_as_baseline": self.same_as_baseline,
            "differences": self.differences,
            "decisions": [decision.as_dict() for decision in self.decisions],
        }


def analyze_decisions(run: BenchRun) -> list[ProfileDecisions]:
    expected = {prompt.id: prompt.expect or "answer" for prompt in run.config.prompts.prompts}
    samples: dict[str, dict[str, Sample]] = defaultdict(dict)
    for sample in run.samples:
        samples[sample.arm].setdefault(sample.prompt_id, sample)
    results = []
    for arm in run.arms:
        mine = samples[arm.label]
        decisions = [decide(mine[pid], expected[pid]) for pid in expected if pid in mine]
        same: bool | None = None
        differences: list[str] = []
        if arm.baseline is not None:
            theirs = samples[arm.baseline]
            for pid in expected:
                if pid in mine and pid in theirs:
                    differences += _differences(pid, mine[pid], theirs[pid], expected[pid])
            same = not differences
        results.append(ProfileDecisions(arm, decisions, same, differences))
    return results


def _differences(pid: str, mine: Sample, theirs: Sample, expected: str) -> list[str]:
    ours, base = decide(mine, expected), decide(theirs, expected)
    if ours.decided != base.decided:
        return [f"{pid}: decided {ours.decided}, the baseline {base.decided}"]
    if mine.output != theirs.output:
        return [f"{pid}: same decision ({ours.decided}) but different output"]
    return []


def text_report(results: list[ProfileDecisions]) -> str:
    lines = []
    for result in results:
        verdict = ""
        if result.same_as_baseline is not None:
            verdict = (
                f"; decides exactly as {result.arm.baseline}"
                if result.same_as_baseline
                else f"; DIFFERS from {result.arm.baseline}"
            )
        lines.append(f"{result.arm.profile}: {result.correct}/{len(result.decisions)} correct{verdict}")
        for decision in result.decisions:
            mark = "ok " if decision.correct else "XX "
            note = f" [{decision.note}]" if decision.note else ""
            lines.append(
                f"  {mark}{decision.prompt_id}: wanted {decision.expected}, got {decision.decided}{note}: "
                f"{decision.detail[:90]}"
            )
        lines += [f"  difference: {difference}" for difference in result.differences]
    return "\n".join(lines)


def markdown_report(results: list[ProfileDecisions]) -> str:
    queries = [decision.prompt_id.split("/", 1)[-1] for decision in results[0].decisions] if results else []
    header = ["profile", "correct", *queries, "same as baseline"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [f"{d.decided}{'' if d.correct else ' ✗'}{f' ({d.note})' if d.note else ''}" for d in result.decisions]
        same = "-" if result.same_as_baseline is None else ("yes" if result.same_as_baseline else "**no**")
        rows.append(
            "| " + " | ".join([result.arm.profile, f"{result.correct}/{len(result.decisions)}", *cells, same]) + " |"
        )
    return "\n".join(rows) + "\n"


def cmd_discrimination(args: argparse.Namespace) -> int:
    from app.bench.runner import stderr_progress

    config = BenchConfig(
        url=normalize_url(args.url),
        prompts=five_queries(with_tools=True),
        profiles=profile_names(args.profiles),
        baseline=args.baseline,
        repetitions=1,
        warmup=1,
        max_tokens=args.max_tokens,
        temperature=0.0,
        timeout=args.timeout,
    )
    try:
        run = Runner(config, stderr_progress).run()
    except BenchError as error:
        print(f"specgate bench discrimination: {error}", file=sys.stderr)
        return 1
    results = analyze_decisions(run)
    if args.json:
        document = {
            "load_average_before": run.load_before,
            "load_average_after": run.load_after,
            "machine": run.machine,
            "max_tokens": config.max_tokens,
            "profiles": [result.as_dict() for result in results],
            "samples": [sample.as_dict() for sample in run.samples],
        }
        write_output(args.json, json.dumps(document, indent=2))
    if args.markdown:
        write_output(args.markdown, markdown_report(results))
    if "-" not in (args.json, args.markdown):
        print(text_report(results))
        print(f"load average before {run.load_before}, after {run.load_after}")
    target = all(r.correct == len(r.decisions) and r.same_as_baseline is not False for r in results)
    return 0 if target else 3


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "discrimination",
        aliases=["tools"],
        help="the five-query check: tool call or direct answer, per profile, against the baseline",
        description="Sends the five queries with a code-search and a file-reading tool through the gateway. "
        "Exit status 3 when a profile is not 5/5 or decides differently from its baseline.",
    )
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--profiles", action="append", metavar="A,B", help="default: every speculative profile")
    parser.add_argument("--baseline", help="compare with this profile instead of each profile's twin")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per answer (default 96: a whole call)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="FILE")
    parser.set_defaults(func=cmd_discrimination)
