"""`specgate bench` against a real gateway on tiny models, its statistics, and the overhead command at a
tiny scale. No timed assertions: speed is what the commands report, never what a test demands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bench import sample_stats
from app.bench.arguments import parse_k_range
from app.bench.client import BenchError, Sample
from app.bench.discrimination import analyze_decisions, decide
from app.bench.overhead import OverheadConfig, run_overhead, text_report
from app.bench.prompts import PromptSetError, load_prompt_set, parse_prompt_file
from app.bench.results import SweepPoint, SweepResult, analyze, chosen_draft_lengths, first_difference
from app.bench.runner import BenchConfig, Runner
from app.proxy.upstream import _Dechunker
from app.testing.tiny_model import write_model
from tests.conftest import TinyPair
from tests.harness import PYTHON, ROOT, GatewayProcess, free_port, running_gateway

SPEC = "speculative/tiny"
TWIN = "baseline/tiny"
OTHER = "baseline/other"
MISSING = "speculative/not-pulled"


def _quiet(_: str) -> None:
    pass


# ----- pure functions ----------------------------------------------------------------------------------


def test_percentile_and_median_interpolate_like_numpy() -> None:
    assert sample_stats.median([3.0, 1.0, 2.0]) == 2.0
    assert sample_stats.median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert sample_stats.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 25) == 2.0
    assert sample_stats.percentile([10.0, 20.0], 99) == pytest.approx(19.9)
    assert sample_stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        sample_stats.median([])


def test_summary_spread_is_the_relative_interquartile_range() -> None:
    summary = sample_stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0, None])
    assert summary is not None
    assert (summary.n, summary.median, summary.p25, summary.p75) == (5, 3.0, 2.0, 4.0)
    assert summary.spread == pytest.approx(2.0 / 3.0)
    assert sample_stats.summarize([None, None]) is None


def test_speedup_and_paired_speedup() -> None:
    assert sample_stats.speedup(3.0, 2.0) == 1.5
    assert sample_stats.speedup(None, 2.0) is None
    assert sample_stats.speedup(1.0, 0.0) is None
    # Per-pair ratios 0.5, 1.0, 2.0 (and an incomplete pair, ignored): their median.
    assert sample_stats.paired_speedup([(1.0, 2.0), (2.0, 2.0), (4.0, 2.0), (1.0, None)]) == 1.0
    assert sample_stats.paired_speedup([]) is None


def test_first_difference() -> None:
    assert first_difference("abc", "abc") is None
    assert first_difference("abcd", "abXd") == 2
    assert first_difference("abc", "abcdef") == 3


def test_chosen_draft_lengths_count_the_gateways_choices() -> None:
    def sample(spec: dict[str, object] | None) -> Sample:
        result = Sample("auto", "speculative/auto", "coding/x", 0, None)
        result.spec = spec
        return result

    samples = [
        sample({"num_speculative_tokens": 0, "num_speculative_tokens_reason": "model"}),
        sample({"num_speculative_tokens": 2, "num_speculative_tokens_reason": "warmup"}),
        sample({"num_speculative_tokens": 0, "num_speculative_tokens_reason": "model"}),
        sample({"num_draft_tokens": 6}),  # a fixed-k profile: the gateway chose nothing
        sample(None),
    ]
    assert chosen_draft_lengths(samples) == {"0 (model)": 2, "2 (warmup)": 1}


def test_sweep_names_the_best_k_or_says_no_draft_pays() -> None:
    points = [SweepPoint(0, "k=0", 9.0, None, 0.9), SweepPoint(3, "k=3", 12.0, 0.8, 1.2)]
    paying = SweepResult("spec", "base", 10.0, points)
    assert paying.best is not None
    assert paying.best.k == 3
    assert paying.verdict.startswith("best k = 3")
    losing = SweepResult("spec", "base", 20.0, points)
    assert "no draft length pays" in losing.verdict


def test_speedups_are_also_given_against_the_fastest_plain_decoding() -> None:
    """A k = 0 arm on the speculative backend that decodes faster than the baseline profile becomes the
    reference: a speed-up against a slower plain path would flatter speculation."""
    from app.bench.runner import Arm, BenchRun

    arms = [
        Arm("base", "base", None, "baseline"),
        Arm("spec", "spec", None, "speculative", baseline="base", profile_k=4),
        Arm("spec k=0", "spec", 0, "sweep", baseline="base"),
    ]
    rates = {"base": [10.0, 10.0], "spec": [15.0, 18.0], "spec k=0": [12.0, 12.0]}
    samples = []
    for label, values in rates.items():
        for rep, rate in enumerate(values):
            sample = Sample(label, label.split()[0], "p", rep, None, ok=True, completion_tokens=13)
            sample.decode_seconds = 12 / rate
            samples.append(sample)
    config = BenchConfig(url="http://127.0.0.1:1", prompts=load_prompt_set("coding").limited(1))
    result = analyze(BenchRun(config, arms, samples, {}, [], [], 0.0, 1.0))
    spec = result.arm("spec")
    assert spec is not None
    assert spec.paired_speedup == pytest.approx(1.65)  # against the baseline profile: 1.5x and 1.8x
    assert spec.fastest_plain == "spec k=0"
    assert spec.speedup_vs_fastest_plain == pytest.approx(1.375)  # 1.25x and 1.5x
    report = text_report_of(result)
    assert "fastest plain decoding measured: spec k=0, faster than the baseline; against it: spec 1.38x" in report


def text_report_of(result: object) -> str:
    from app.bench.report import text_report as bench_text_report

    return bench_text_report(result)  # type: ignore[arg-type]


def test_k_range_parsing() -> None:
    assert parse_k_range("0:3") == [0, 1, 2, 3]
    assert parse_k_range("2:8:3") == [2, 5, 8]
    assert parse_k_range("1,3,5") == [1, 3, 5]
    for bad in ("x", "0:65", "1:2:3:4"):
        with pytest.raises(Exception, match=r"expected|between"):
            parse_k_range(bad)


def test_prompt_files_jsonl_and_json(tmp_path: Path) -> None:
    message = {"id": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    jsonl = '{"prompt": "hi"}\n# a comment\n' + json.dumps(message) + "\n"
    prompts = parse_prompt_file(jsonl, "mine").prompts
    assert [p.id for p in prompts] == ["mine/1", "m"]
    assert prompts[1].max_tokens == 4
    document = tmp_path / "set.json"
    document.write_text(json.dumps({"prompts": [{"prompt": "a", "expect": "tool"}]}))
    loaded = load_prompt_set(str(document))
    assert loaded.name == "set"
    assert loaded.prompts[0].expect == "tool"
    with pytest.raises(PromptSetError, match="needs 'prompt'"):
        parse_prompt_file('{"text": "no"}', "bad")
    with pytest.raises(PromptSetError, match="neither a built-in"):
        load_prompt_set("no-such-set")
    assert len(load_prompt_set("queries").prompts) == 5
    joined = load_prompt_set(f"chat,{document}")
    assert joined.name == "chat+set"
    assert [p.id.split("/")[0] for p in joined.prompts] == ["chat"] * 4 + ["set"]


def test_decisions_from_answers() -> None:
    def sample(**fields: object) -> Sample:
        base = Sample(arm="a", profile="a", prompt_id="q", rep=0, k=None, ok=True)
        for name, value in fields.items():
            setattr(base, name, value)
        return base

    call = {"type": "function", "function": {"name": "search_code", "arguments": '{"pattern": "View"}'}}
    assert decide(sample(tool_calls=[call]), "tool").correct
    assert decide(sample(text='<tool_call>{"name": "read_file"'), "tool").note == "unparsed"
    assert decide(sample(text="", finish_reason="length"), "tool").note == "truncated"
    answer = decide(sample(text="Dependency injection is ..."), "tool")
    assert (answer.decided, answer.correct) == ("answer", False)
    assert decide(sample(error="HTTP 503"), "answer").decided == "error"
    # A call to a tool that does not exist, written as JSON, is neither an answer nor a call.
    invented = decide(sample(text='```json\n{\n  "name": "UserSerializer",\n  "arguments": {}}\n```'), "answer")
    assert (invented.decided, invented.correct) == ("invented-tool", False)
    assert "UserSerializer" in invented.note
    definition = decide(sample(text='<tools>\n{"name": "compare_orm", "description": "Compare"}'), "answer")
    assert definition.decided == "invented-tool"
    assert decide(sample(text='```json\n{"name": "search_code", "arguments": {}}```'), "tool").correct


def test_dechunker_reassembles_split_chunks() -> None:
    raw = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"
    for step in (1, 2, 7, len(raw)):
        dechunker = _Dechunker()
        out = b"".join(dechunker.feed(raw[i : i + step]) for i in range(0, len(raw), step))
        assert out == b"helloabc"
        assert dechunker.finished


# ----- against a real gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_gateway(tiny_pair: TinyPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A speculative profile, its twin, a baseline on another model, and a profile whose model is absent."""
    other = write_model(tmp_path_factory.mktemp("other") / "main", seed=7)
    profiles = f"""
[profiles."{SPEC}"]
model = "{tiny_pair.main}"
draft_model = "{tiny_pair.draft}"
num_draft_tokens = 3

[profiles."{TWIN}"]
model = "{tiny_pair.main}"

[profiles."{OTHER}"]
model = "{other}"

[profiles."{MISSING}"]
model = "catalog:smollm2-135m-instruct"
draft_model = "catalog:smollm2-135m-instruct"
"""
    # No pulling at start-up: the catalog profile must stay "not_present".
    env = {"SPECGATE_PREPARE_MODELS": "0"}
    with running_gateway(tmp_path_factory.mktemp("bench-gateway"), profiles, env) as gateway:
        yield gateway


def test_bench_json_report_against_the_twin(bench_gateway: GatewayProcess, tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    command = [PYTHON, "-m", "app.cli", "bench", "--url", bench_gateway.url + "/v1", "--profiles", SPEC]
    command += ["--prompts", "coding", "--limit", "2", "-n", "2", "--max-tokens", "12", "--sweep-k", "0:2"]
    command += ["--json", "--markdown", str(tmp_path / "bench.md")]
    pytest.importorskip("matplotlib")
    command += ["--plot", str(plot)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/" in done.stderr  # progress, one line per request
    report = json.loads(done.stdout)
    arms = {arm["label"]: arm for arm in report["arms"]}
    assert list(arms) == [TWIN, SPEC, f"{SPEC} k=0", f"{SPEC} k=1", f"{SPEC} k=2"]
    assert arms[TWIN]["role"] == "baseline"
    spec = arms[SPEC]
    assert spec["baseline"] == TWIN
    assert spec["requests"] == 4
    assert spec["failed"] == 0
    for figure in ("decode_tokens_per_second", "ttft_s", "e2e_s"):
        assert spec[figure]["n"] == 4
        assert spec[figure]["median"] > 0
    assert 0.0 <= spec["acceptance_rate"] <= 1.0
    assert spec["mean_acceptance_length"] >= 1.0
    assert len(spec["acceptance_by_position"]) == 3
    assert spec["speedup"] > 0
    assert spec["paired_speedup"] > 0
    # The launcher's fixes make a speculative profile's greedy output its baseline's, token for token.
    assert spec["greedy_equal_to_baseline"] == {
        "compared": 4,
        "equal": 4,
        "identical": True,
        "first_divergence": None,
    }
    assert arms[f"{SPEC} k=0"]["acceptance_rate"] is None
    (sweep,) = report["sweeps"]
    assert [point["k"] for point in sweep["points"]] == [0, 1, 2]
    # The best k is the fastest point measured, and the verdict names it.
    measured = [point for point in sweep["points"] if point["decode_tps"] is not None]
    assert len(measured) == 3
    fastest = max(measured, key=lambda point: point["decode_tps"])
    assert sweep["best_k"] == fastest["k"]
    assert re.search(rf"k ?= ?{fastest['k']}\b", sweep["verdict"]), sweep["verdict"]
    assert len(report["samples"]) == 5 * 2 * 2
    assert report["load_average_before"]
    assert report["machine"]["cpus"] >= 1
    assert "| ARM |" in (tmp_path / "bench.md").read_text()
    assert plot.stat().st_size > 1000


def test_a_different_model_is_flagged_as_diverging(bench_gateway: GatewayProcess) -> None:
    config = BenchConfig(
        url=bench_gateway.url,
        prompts=load_prompt_set("chat").limited(1),
        profiles=[SPEC],
        baseline=OTHER,
        repetitions=1,
        warmup=0,
        max_tokens=12,
    )
    result = analyze(Runner(config, _quiet).run())
    spec = result.arm(SPEC)
    assert spec is not None
    assert spec.arm.baseline == OTHER
    assert spec.equality is not None
    assert not spec.equality.identical
    divergence = spec.equality.first_divergence
    assert divergence is not None
    assert divergence.prompt_id == "chat/di"
    assert divergence.position >= 0
    assert divergence.baseline != divergence.candidate


def test_discrimination_decides_as_the_baseline(bench_gateway: GatewayProcess) -> None:
    from app.bench.prompts import five_queries

    config = BenchConfig(
        url=bench_gateway.url, prompts=five_queries(with_tools=True), profiles=[SPEC], repetitions=1, max_tokens=8
    )
    results = {result.arm.profile: result for result in analyze_decisions(Runner(config, _quiet).run())}
    assert set(results) == {SPEC, TWIN}
    # Random tiny weights decide nothing sensible; what matters is that the draft changes no decision.
    assert results[SPEC].same_as_baseline is True
    assert len(results[SPEC].decisions) == 5
    assert 0 <= results[SPEC].correct <= 5


def test_errors_say_what_to_do(bench_gateway: GatewayProcess) -> None:
    def run(url: str, profiles: list[str]) -> None:
        config = BenchConfig(url=url, prompts=load_prompt_set("chat"), profiles=profiles, warmup=0)
        Runner(config, _quiet).run()

    with pytest.raises(BenchError, match="specgate models pull"):
        run(bench_gateway.url, [MISSING])
    with pytest.raises(BenchError, match="not served here; available: "):
        run(bench_gateway.url, ["nope"])
    with pytest.raises(BenchError, match="specgate serve"):
        run(f"http://127.0.0.1:{free_port()}", [SPEC])


def test_overhead_runs_at_a_tiny_scale() -> None:
    # 32 tokens, not fewer: the tiny model makes ~1000 tok/s (more with MKL), and a stream whose tokens all
    # arrive in one read has no decode window; with 8 tokens a loaded machine did that to every request.
    config = OverheadConfig(requests=3, tokens=32, instant_requests=8, instant_tokens=4, concurrency=[1, 2], rounds=2)
    result = run_overhead(config, _quiet)
    assert [(c.phase, c.concurrency) for c in result.comparisons] == [("tiny", 1), ("instant", 1), ("instant", 2)]
    for comparison in result.comparisons:
        assert comparison.direct.errors == 0, comparison.direct.first_error
        assert comparison.gateway.errors == 0, comparison.gateway.first_error
        # The bare relay (the floor) carried every request of every phase, byte for byte.
        assert comparison.relay is not None
        assert comparison.relay.errors == 0, comparison.relay.first_error
        assert len(comparison.relay.e2e) == len(comparison.direct.e2e)
        assert comparison.added_ms("e2e", 50) is not None
        assert comparison.added_ms("e2e", 50, "relay") is not None
    tiny = result.comparisons[0]
    assert tiny.throughput_ratio is not None
    assert tiny.ratio("decode") is not None
    assert tiny.ratio("throughput", "relay") is not None
    assert len(tiny.direct.ttft) == 3
    # Every relayed answer ended with its usage chunk, so each has a token rate.
    assert tiny.relay is not None
    assert len(tiny.relay.throughput) == 3
    goals = result.goals()
    assert len(goals) == 3
    assert len(result.floors()) == 2  # concurrency 16 was not measured here
    document = result.as_dict()
    assert document["comparisons"][1]["added_e2e_ms"]["p50"] is not None
    assert document["comparisons"][0]["relay"]["throughput_ratio"] is not None
    assert "bare relay" in text_report(result)
    # The gateway's CPU is charged to the gateway path only, and split into per request and per token.
    if sys.platform == "linux":
        assert tiny.gateway.cpu_seconds is not None
        assert tiny.gateway.cpu_seconds >= 0
        assert tiny.direct.cpu_seconds is None
        assert tiny.gateway.tokens == tiny.direct.tokens == 3 * 32
        cpu = document["gateway_cpu"]
        assert cpu is not None
        assert cpu["ms_per_request"] >= 0
        assert cpu["ms_per_token"] >= 0
        assert cpu["tiny_model_tokens_per_request"] == 32
        assert "gateway CPU (its process)" in text_report(result)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_process_cpu_seconds_counts_this_process_only() -> None:
    from app.bench.machine import process_cpu_seconds

    before = process_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = process_cpu_seconds(os.getpid())
    assert before is not None
    assert after is not None
    # The clock ticks in 10 ms steps; 0.2 s of spinning shows as at least 0.1 s.
    assert after - before >= 0.1
    assert process_cpu_seconds(2**22 + 1) is None  # above Linux's pid limit: no such process


def test_overhead_real_model_phase(tmp_path: Path) -> None:
    """`--real-model` takes any model value a profile could name; a directory needs no store or download."""
    from app.testing.tiny_model import write_model

    model = write_model(tmp_path / "real-model")
    config = OverheadConfig(
        requests=2,
        tokens=8,
        instant_requests=4,
        instant_tokens=4,
        concurrency=[1],
        rounds=1,
        real_model=str(model),
        real_requests=2,
        real_tokens=8,
        relay=False,
    )
    result = run_overhead(config, _quiet)
    assert [(c.phase, c.concurrency) for c in result.comparisons] == [("tiny", 1), ("instant", 1), ("real", 1)]
    real = result.comparisons[-1]
    assert real.direct.errors == 0, real.direct.first_error
    assert real.gateway.errors == 0, real.gateway.first_error
    assert real.relay is None
    assert real.throughput_ratio is not None
    assert len(result.goals()) == 4
    assert str(model) in result.goals()[-1][0]
    assert result.floors() == []


def test_overhead_real_model_missing_says_so(tmp_path: Path) -> None:
    """A `--real-model` the store does not hold stops the run with the gateway's reason, not a hang."""
    missing = tmp_path / "no-such-model"
    config = OverheadConfig(requests=1, tokens=4, instant_requests=2, instant_tokens=2, concurrency=[1], rounds=1)
    config.real_model = str(missing)
    with pytest.raises(BenchError, match="does not exist"):
        run_overhead(config, _quiet)
