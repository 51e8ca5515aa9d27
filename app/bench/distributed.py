"""`python -m app.bench.distributed MAIN DRAFT [options]`: does speculation pay on a distributed model?

Starts, one after the other (never two at once: they would compete for the same cores), the launcher

1. as one process, without a draft (the reference);
2. as N ranks on this host under `mlx.launch --backend ring` (main model sharded), without a draft;
3. the same with DRAFT loaded whole on every rank;
4. the same with prompt lookup;
5. 2-4 again under the gateway's runner of mlx.launch (app/backends/mlx_launch.py, what a distributed
   profile runs), and with each rank started directly (what mlx.launch would start);

and sends each the same requests at temperature 0: a coding question, and an edit of given code (where
prompt lookup finds its drafts). Each request's decode speed is its `generation_tokens` over its
`generation_seconds` (the launcher's own figures: prompt processing excluded); the medians are printed,
with each configuration's ratio to the no-draft run started the same way, measured in the same run. The outputs
of all configurations are compared too (greedy: they should be equal, or the first difference is shown).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.blas import plan as blas_plan
from app.blas import validate_value as validate_blas

EDIT_CODE = """def parse_line(line):
    parts = line.strip().split(",")
    name = parts[0]
    age = int(parts[1])
    city = parts[2]
    return {"name": name, "age": age, "city": city}


def read_people(path):
    people = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                people.append(parse_line(line))
    return people
"""
PROMPTS = {
    "edit": "Rename the function parse_line to parse_person everywhere in this code and reply with the whole "
    f"code only:\n\n{EDIT_CODE}",
    "code": "Write a Python function that checks whether a string is a palindrome. Reply with code only.",
}


@dataclass
class Config:
    name: str
    ranks: int  # 1: one process
    flags: list[str]
    # Ranks started by this script (MLX_RANK, MLX_HOSTFILE: what mlx.launch sets for the ring backend)
    # instead of `mlx.launch`, whose output relay polls without sleeping (see docs/distributed.md).
    direct: bool = False
    # Under the gateway's own runner of mlx.launch (app/backends/mlx_launch.py: mlx.launch without its busy
    # loop), which is what a distributed profile runs.
    gateway_launcher: bool = False
    speeds: list[float] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    accepted: list[tuple[int, int]] = field(default_factory=list)


def _free_port(pair: bool = False) -> int:
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if not pair:
                return port
            with contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return port
    raise RuntimeError("no free port")


def _command(config: Config, main: str, port: int, mode: str) -> list[str]:
    launcher = [sys.executable, "-m", "app.launcher", "--model", main, "--single-stream", *config.flags]
    launcher += ["--host", "127.0.0.1", "--port", str(port)]
    if config.ranks > 1 and mode == "pipeline":
        launcher.append("--pipeline")
    if config.ranks == 1 or config.direct:
        return launcher
    mlx_launch: list[str] = [str(Path(sys.executable).with_name("mlx.launch"))]
    if config.gateway_launcher:
        mlx_launch = [sys.executable, "-m", "app.backends.mlx_launch"]
    ring = ["--backend", "ring", "--hosts", "127.0.0.1", "-n", str(config.ranks)]
    ring += ["--starting-port", str(_free_port(pair=True))]
    return [*mlx_launch, *ring, "--", *launcher]


def _start(config: Config, command: list[str], env: dict[str, str], log_dir: Path) -> list[subprocess.Popen[bytes]]:
    """The backend's processes: one (a process, or mlx.launch), or one per rank when started directly."""
    if not config.direct:
        log = (log_dir / f"{config.name}.log").open("wb")
        with log:
            return [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)]
    first = _free_port(pair=True)
    hostfile = log_dir / f"{config.name}.hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first + rank}"] for rank in range(config.ranks)]))
    processes = []
    for rank in range(config.ranks):
        rank_env = {**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        with (log_dir / f"{config.name}.rank{rank}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=rank_env,
                    start_new_session=True,
                )
            )
    return processes


def _run(config: Config, main: str, mode: str, max_tokens: int, repeats: int, k: int, log_dir: Path) -> None:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    blas_plan(validate_blas(os.environ.get("SPECGATE_BLAS", "auto"))).apply(env)
    command = _command(config, main, port, mode)
    print(f"# {config.name}: {' '.join(command)}{' (each rank started directly)' if config.direct else ''}")
    processes = _start(config, command, env, log_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, processes, log_dir / f"{config.name}.log")
        with httpx.Client(base_url=base, timeout=1800.0) as client:
            for name, prompt in PROMPTS.items():
                body = {
                    "model": "default_model",
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "num_draft_tokens": k,
                }
                for repeat in range(repeats):
                    reply = client.post("/v1/chat/completions", json=body)
                    reply.raise_for_status()
                    payload: dict[str, Any] = reply.json()
                    figures = payload["specgate"]
                    speed = figures["generation_tokens"] / max(figures["generation_seconds"], 1e-9)
                    config.speeds.append(speed)
                    config.accepted.append((figures["num_accepted_tokens"], figures["num_draft_tokens"]))
                    config.outputs.setdefault(name, payload["choices"][0]["message"]["content"])
                    print(
                        f"  {name} #{repeat}: {figures['generation_tokens']} tokens, {speed:.2f} tok/s, "
                        f"accepted {figures['num_accepted_tokens']}/{figures['num_draft_tokens']}",
                        flush=True,
                    )
    finally:
        for process in processes:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_ready(base: str, processes: list[subprocess.Popen[bytes]], log: Path, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    probe = {"model": "default_model", "prompt": "hi", "max_tokens": 1}
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise RuntimeError(f"a backend process exited; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.post(f"{base}/v1/completions", json=probe, timeout=600.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout} s; see {log}")


def _first_difference(a: str, b: str) -> str:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"differs at character {index}: {a[index : index + 20]!r} vs {b[index : index + 20]!r}"
    return "equal" if len(a) == len(b) else f"one is a prefix of the other ({len(a)} vs {len(b)} characters)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("main", help="main model directory")
    parser.add_argument("draft", help="draft model directory")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mode", choices=("tensor", "pipeline"), default="tensor")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="requests per prompt and configuration")
    parser.add_argument("-k", "--num-draft-tokens", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="the launcher's --dtype (default float32)")
    parser.add_argument("--only", help="comma-separated configuration names to run")
    args = parser.parse_args(argv)
    dtype = ["--dtype", args.dtype]
    configs = [
        Config("one-process", 1, dtype),
        Config("dist-no-draft", args.ranks, dtype),
        Config("dist-draft", args.ranks, [*dtype, "--draft-model", args.draft]),
        Config("dist-lookup", args.ranks, [*dtype, "--prompt-lookup"]),
        Config("gw-no-draft", args.ranks, dtype, gateway_launcher=True),
        Config("gw-draft", args.ranks, [*dtype, "--draft-model", args.draft], gateway_launcher=True),
        Config("gw-lookup", args.ranks, [*dtype, "--prompt-lookup"], gateway_launcher=True),
        Config("direct-no-draft", args.ranks, dtype, direct=True),
        Config("direct-draft", args.ranks, [*dtype, "--draft-model", args.draft], direct=True),
        Config("direct-lookup", args.ranks, [*dtype, "--prompt-lookup"], direct=True),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        configs = [config for config in configs if config.name in wanted]
    log_dir = Path(tempfile.mkdtemp(prefix="specgate-bench-distributed-"))
    print(f"# {args.ranks} ranks, {args.mode} parallel, k={args.num_draft_tokens}, logs in {log_dir}", flush=True)
    for config in configs:
        _run(config, args.main, args.mode, args.max_tokens, args.repeats, args.num_draft_tokens, log_dir)
    # Each configuration against the no-draft run started the same way (dist-, gw-, direct-) in this run.
    baselines = {
        c.name.split("-")[0]: statistics.median(c.speeds) for c in configs if c.name.endswith("-no-draft") and c.speeds
    }
    print(f"\n{'configuration':<15} {'median tok/s':>12} {'vs no-draft':>17} {'accepted/drafted':>17}")
    for config in configs:
        speed = statistics.median(config.speeds)
        base_speed = baselines.get(config.name.split("-")[0])
        ratio = f"{speed / base_speed:.2f}x" if base_speed else "-"
        accepted = sum(a for a, _ in config.accepted)
        drafted = sum(d for _, d in config.accepted)
        print(f"{config.name:<15} {speed:>12.2f} {ratio:>17} {f'{accepted}/{drafted}':>17}")
    reference = configs[0]
    for config in configs[1:]:
        for name, text in config.outputs.items():
            other = reference.outputs.get(name)
            if other is not None:
                print(f"output {name}, {config.name} vs {reference.name}: {_first_difference(text, other)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
