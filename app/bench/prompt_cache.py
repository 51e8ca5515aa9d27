"""`specgate bench prompt-cache`: an OpenCode first turn cold, cached in memory, and after a restart (disk).

The request is a real one: OpenCode 1.18.33's first request of a session (its system prompt, ~10 tool
definitions and the user's question; `data/opencode-first-turn.json`, captured through the gateway), about
7,200 prompt tokens on the Qwen2.5 tokenizer. The bench starts its own gateway on the user's profiles
and model store, with an empty prompt-cache directory of its own (so the first turn is cold and nothing of
the user's cache is read or written), and sends:

1. `cold`: session A's first turn, nothing cached;
2. `memory`: session B's first turn (another question: a new session shares the system prompt and tools);
3. the gateway and its backend are stopped and started again;
4. `disk`: session B's first turn once more, its shared prefix restored from disk.

`disk` against `cold` is issue 16's goal (at most 10 %). `disk` must answer exactly what `memory` did
(greedy); with `--cold-check`, a fifth request sends session B to a backend with an empty cache, whose
answer both must equal (another cold prompt: minutes on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from app.bench import machine
from app.bench.arguments import write_output
from app.bench.client import BenchError, Sample, backend_blas, stream_chat
from app.bench.local import serve
from app.bench.runner import stderr_progress

DEFAULT_PROFILE = "speculative/qwen2.5-coder-1.5b-balanced"
QUESTIONS = {
    "A": "Read hello.py and tell me what it prints",
    "B": "List the Python files in this project and say what each one does",
}
Progress = Callable[[str], None]


def opencode_first_turn(question: str, profile: str, max_tokens: int) -> dict[str, Any]:
    """OpenCode's first request of a session asking `question` (quoted, as `opencode run` sends it)."""
    text = resources.files("app.bench").joinpath("data/opencode-first-turn.json").read_text(encoding="utf-8")
    body: dict[str, Any] = copy.deepcopy(json.loads(text))
    body["messages"][-1]["content"] = json.dumps(question)
    body["model"] = profile
    body["max_tokens"] = max_tokens
    body["temperature"] = 0.0
    return body


@dataclass
class Phase:
    """One measured request."""

    name: str
    session: str
    sample: Sample
    load: list[float] = field(default_factory=machine.load_average)
    # The backend's own disk-tier figures after the request (`GET /specgate/stats`); None if it has none.
    disk: dict[str, Any] | None = None

    @property
    def disk_tokens(self) -> int:
        return int((self.sample.timings or {}).get("cache_disk_n") or 0)

    @property
    def prompt_seconds(self) -> float | None:
        """The backend's time from taking the request to its first token: restore + prefill."""
        prompt_ms = (self.sample.timings or {}).get("prompt_ms")
        return prompt_ms / 1000.0 if isinstance(prompt_ms, int | float) else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.name,
            "session": self.session,
            "prompt_tokens": self.sample.prompt_tokens,
            "cached_tokens": self.sample.cached_tokens,
            "disk_tokens": self.disk_tokens,
            "backend_prompt_s": self.prompt_seconds,
            "client_ttft_s": self.sample.ttft,
            "e2e_s": self.sample.e2e,
            "load_average": self.load,
            "backend_disk_tier": self.disk,
            "output": self.sample.output,
        }


@dataclass
class PromptCacheConfig:
    profile: str = DEFAULT_PROFILE
    profiles_dir: Path = Path("profiles")
    max_tokens: int = 16
    timeout: float = 3600.0
    cold_check: bool = False


@dataclass
class PromptCacheResult:
    profile: str
    phases: list[Phase]
    machine: dict[str, Any]

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def ratio(self) -> float | None:
        cold, disk = self.phase("cold"), self.phase("disk")
        if cold is None or disk is None or not cold.prompt_seconds or disk.prompt_seconds is None:
            return None
        return disk.prompt_seconds / cold.prompt_seconds

    def equal_outputs(self) -> dict[str, bool]:
        """Session B's answers, pairwise: a restored cache must not change a greedy answer."""
        b = {p.name: p.sample.output for p in self.phases if p.session == "B"}
        pairs = [("memory", "disk"), ("cold-check", "memory"), ("cold-check", "disk")]
        return {f"{x} = {y}": b[x] == b[y] for x, y in pairs if x in b and y in b}

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "phases": [p.as_dict() for p in self.phases],
            "disk_over_cold": self.ratio(),
            "equal_outputs": self.equal_outputs(),
            "machine": self.machine,
        }


def _request(url: str, config: PromptCacheConfig, session: str, name: str, progress: Progress) -> Phase:
    body = opencode_first_turn(QUESTIONS[session], config.profile, config.max_tokens)
    progress(f"bench prompt-cache: {name}: session {session}'s first turn ...")
    with httpx.Client(trust_env=False) as http:
        sample = stream_chat(http, url, body, Sample(name, config.profile, session, 0, None), config.timeout)
    if sample.error is not None:
        raise BenchError(f"{name} request failed: {sample.error}")
    phase = Phase(name, session, sample, disk=_disk_figures(url, config.profile, saved=name == "cold"))
    progress(
        f"  {sample.prompt_tokens} prompt tokens, {sample.cached_tokens} cached ({phase.disk_tokens} from disk), "
        f"backend {phase.prompt_seconds}s to the first token"
    )
    return phase


def _disk_figures(url: str, profile: str, saved: bool) -> dict[str, Any] | None:
    """The backend's disk tier figures, read from the backend itself (its port is in /v1/models); with
    `saved`, once the prompt just served is written (the writer works after the answer)."""
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        port = http.get(f"{url}/v1/models/{profile}").json()["backend"]["port"]

        def stores() -> list[dict[str, Any]]:
            section = http.get(f"http://127.0.0.1:{port}/specgate/stats").json().get("prompt_cache_disk") or {}
            return list(section.get("stores") or [])

        deadline = time.monotonic() + 120.0
        found = stores()
        while saved and not any(store.get("saved") for store in found) and time.monotonic() < deadline:
            time.sleep(0.5)
            found = stores()
    # The directory is the bench's scratch copy, gone when it ends.
    return {key: value for key, value in found[0].items() if key != "directory"} if found else None


def _load_backend(url: str, profile: str, timeout: float, progress: Progress) -> None:
    """A one-token request, so that loading the weights is not counted in a measured request."""
    started = time.perf_counter()
    # A text completion: it shares no prefix with a chat prompt, so the cold turn stays cold.
    body = {"model": profile, "prompt": "hi", "max_tokens": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout, trust_env=False)
    if response.status_code != 200:
        raise BenchError(f"profile {profile} did not answer: HTTP {response.status_code} {response.text[:500]}")
    progress(f"bench prompt-cache: backend of {profile} ready in {time.perf_counter() - started:.1f}s")


def run_prompt_cache(config: PromptCacheConfig, progress: Progress) -> PromptCacheResult:
    phases: list[Phase] = []
    blas: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="specgate-prompt-cache-") as scratch:
        root = Path(scratch)
        env = {
            "SPECGATE_MAX_BACKENDS": "1",
            "SPECGATE_FIRST_TOKEN_TIMEOUT": str(config.timeout),
            "SPECGATE_PROMPT_CACHE_DIR": str(root / "prompt-cache"),
        }
        log = root / "gateway.log"
        try:
            with serve(config.profiles_dir, log, env) as url:
                _load_backend(url, config.profile, config.timeout, progress)
                with httpx.Client(trust_env=False) as http:
                    blas = backend_blas(http, url, [config.profile])
                phases.append(_request(url, config, "A", "cold", progress))
                phases.append(_request(url, config, "B", "memory", progress))
            progress("bench prompt-cache: gateway and backend stopped; starting again on the same cache directory")
            with serve(config.profiles_dir, log, env) as url:
                _load_backend(url, config.profile, config.timeout, progress)
                phases.append(_request(url, config, "B", "disk", progress))
            if config.cold_check:
                env["SPECGATE_PROMPT_CACHE_DIR"] = str(root / "empty-prompt-cache")
                with serve(config.profiles_dir, log, env) as url:
                    _load_backend(url, config.profile, config.timeout, progress)
                    phases.append(_request(url, config, "B", "cold-check", progress))
        except BenchError as error:
            raise BenchError(f"{error}\ngateway log (last lines):\n{log.read_text(errors='replace')[-3000:]}") from None
    return PromptCacheResult(config.profile, phases, machine.describe(blas))


def text_report(result: PromptCacheResult) -> str:
    lines = [
        f"OpenCode first turn on {result.profile}",
        f"{'phase':<11} {'session':>7} {'prompt':>7} {'cached':>7} {'disk':>7} {'backend TTFT s':>15} "
        f"{'client TTFT s':>14} {'load 1m':>8}",
    ]
    for p in result.phases:
        lines.append(
            f"{p.name:<11} {p.session:>7} {p.sample.prompt_tokens:>7} {p.sample.cached_tokens:>7} {p.disk_tokens:>7} "
            f"{_fmt(p.prompt_seconds):>15} {_fmt(p.sample.ttft):>14} {p.load[0] if p.load else '-':>8}"
        )
    for p in result.phases:
        disk = p.disk or {}
        if p.name == "cold" and disk.get("saved"):
            lines.append(
                f"saved after the cold turn: {disk['saved_bytes'] / 1e6:.0f} MB; generation thread paused "
                f"{disk['last_save_pause_seconds']}s to take views of the KV, written in "
                f"{disk['last_save_seconds']}s (background)"
            )
        if p.name == "disk" and disk.get("restored"):
            lines.append(f"restored {disk['restored_tokens']} tokens from disk in {disk['last_restore_seconds']}s")
    ratio = result.ratio()
    if ratio is not None:
        verdict = "goal met" if ratio <= 0.10 else "goal NOT met"
        lines.append(f"disk / cold time to first token (backend): {ratio:.3f} ({verdict}: <= 0.10)")
    for pair, equal in result.equal_outputs().items():
        lines.append(f"greedy output {pair}: {'identical' if equal else 'DIFFERENT'}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def cmd_prompt_cache(args: argparse.Namespace) -> int:
    config = PromptCacheConfig(
        profile=args.profile,
        profiles_dir=args.profiles_dir,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        cold_check=args.cold_check,
    )

    try:
        result = run_prompt_cache(config, stderr_progress)
    except BenchError as error:
        print(f"specgate bench prompt-cache: {error}", file=sys.stderr)
        return 1
    if args.json:
        write_output(args.json, json.dumps(result.as_dict(), indent=2))
    if args.json != "-":
        print(text_report(result))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "prompt-cache",
        help="an OpenCode first turn cold, cached in memory, and after a restart (the prompt cache on disk)",
        description="Starts its own gateway (your profiles and model store, an empty prompt-cache directory of "
        "its own) and times OpenCode's real first request: cold, a new session with the prefix in memory, and "
        "the same after the gateway and backend restart (prefix from disk).",
    )
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help=f"profile to measure (default {DEFAULT_PROFILE})")
    parser.add_argument("--profiles-dir", type=Path, default=Path("profiles"), help="default: ./profiles")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    parser.add_argument(
        "--cold-check",
        action="store_true",
        help="also send session B to a backend with an empty cache and compare answers (one more cold prompt)",
    )
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write JSON (no FILE or -: stdout)")
    parser.set_defaults(func=cmd_prompt_cache)
