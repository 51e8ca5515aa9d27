"""The scale model (app/bench/capacity.py) against textbook queueing values and hand-solved cases, and
`specgate bench capacity` reading the other bench commands' JSON."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from app.bench.capacity import (
    CapacityError,
    ClosedTeam,
    GatewayCost,
    NodeSpeed,
    Queue,
    Target,
    TurnShape,
    erlang_b,
    erlang_c,
    gateway_limits,
    nodes_to_keep_up,
    plan_team,
    random_split,
    service_cv2,
    service_seconds,
    think_for_turns_per_hour,
)
from app.cli import main

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


# ----- Erlang B and C: textbook values ------------------------------------------------------------------


def test_erlang_b_matches_the_tables() -> None:
    # Erlang B tables: 10 Erlangs on 10 lines block 21.46 %, on 11 lines 16.32 %; one line: a / (1 + a).
    assert erlang_b(10, 10.0) == pytest.approx(0.2146, abs=5e-5)
    assert erlang_b(11, 10.0) == pytest.approx(0.1632, abs=5e-5)
    assert erlang_b(1, 0.5) == pytest.approx(0.5 / 1.5)
    assert erlang_b(0, 3.0) == 1.0


def test_erlang_c_matches_closed_forms_and_tables() -> None:
    # M/M/1: a turn waits with probability rho.
    for rho in (0.1, 0.5, 0.9):
        assert erlang_c(1, rho) == pytest.approx(rho)
    # M/M/2: 2 rho^2 / (1 + rho), rho = a / 2.
    for a in (0.4, 1.0, 1.8):
        rho = a / 2
        assert erlang_c(2, a) == pytest.approx(2 * rho**2 / (1 + rho))
    # a = 2 Erlangs on 3 servers: 4/9 (the textbook example); 10 Erlangs on 11 agents: 0.6821 (call-centre
    # tables).
    assert erlang_c(3, 2.0) == pytest.approx(4 / 9)
    assert erlang_c(11, 10.0) == pytest.approx(0.6821, abs=5e-5)


def _mmc_distribution(c: int, a: Fraction, terms: int) -> list[Fraction]:
    """P(n in system) of M/M/c by the balance equations, exactly, truncated far out (rho^terms is tiny)."""
    weights = [Fraction(1)]
    for n in range(1, terms):
        weights.append(weights[-1] * a / min(n, c))
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize(("c", "a"), [(1, Fraction(1, 2)), (3, Fraction(2)), (5, Fraction(17, 4)), (8, Fraction(3))])
def test_queue_figures_agree_with_the_balance_equations(c: int, a: Fraction) -> None:
    exact = _mmc_distribution(c, a, 400)
    queue = Queue(c, float(a) / 20.0, 20.0)  # any split of a into rate x service time
    assert queue.offered == pytest.approx(float(a))
    assert queue.p_wait == pytest.approx(float(sum(exact[c:])), rel=1e-9)
    for k in range(0, c + 6):
        assert queue.p_at_least(k) == pytest.approx(float(sum(exact[k:])), rel=1e-9, abs=1e-15), k
    # Little's law on the exact distribution: mean queue length = arrival rate x mean wait.
    waiting = sum((n - c) * p for n, p in enumerate(exact) if n > c)
    assert queue.mean_wait_s * queue.arrival_rate == pytest.approx(float(waiting), rel=1e-9)


def test_wait_quantile_of_an_m_m_1() -> None:
    # M/M/1, rho = 0.8, S = 10 s: P(W > t) = 0.8 exp(-(1 - 0.8) t / 10).
    queue = Queue(1, 0.08, 10.0)
    assert queue.wait_exceeds(25.0) == pytest.approx(0.8 * math.exp(-0.02 * 25.0))
    assert queue.wait_quantile(0.9) == pytest.approx(math.log(0.8 / 0.1) / 0.02)
    # Only 20 % wait at all at rho = 0.2: the p75 wait is zero, the p85 is not.
    light = Queue(1, 0.02, 10.0)
    assert light.wait_quantile(0.75) == 0.0
    assert light.wait_quantile(0.85) > 0.0


def test_a_spread_service_time_scales_the_waits_allen_cunneen() -> None:
    exponential = Queue(3, 0.1, 20.0)
    spread = Queue(3, 0.1, 20.0, service_cv2=3.0)  # (1 + 3) / 2: twice the waits
    assert spread.p_wait == exponential.p_wait
    assert spread.mean_wait_s == pytest.approx(2 * exponential.mean_wait_s)
    assert spread.wait_quantile(0.9) == pytest.approx(2 * exponential.wait_quantile(0.9))
    assert Queue(3, 0.1, 20.0, service_cv2=0.0).mean_wait_s == pytest.approx(exponential.mean_wait_s / 2)  # M/D/c


def test_prefix_misses_make_the_service_time_hyperexponential() -> None:
    node = NodeSpeed(prefill_tps=10.0, decode_tps=5.0, turn_overhead_s=4.0)
    assert service_cv2(node, TurnShape(7000, 100, 50)) == 1.0
    # Hits take 24 s, misses 714 s; one turn in ten misses.
    hit, miss, share = 24.0, 714.0, 0.1
    mean = 0.9 * hit + share * miss
    expected = 2 * (0.9 * hit**2 + share * miss**2) / mean**2 - 1
    assert service_cv2(node, TurnShape(7000, 100, 50, prefix_miss=0.1)) == pytest.approx(expected)
    assert expected > 5  # so the waits are several times the exponential model's
    row = plan_team(10, node, TurnShape(7000, 100, 50, prefix_miss=0.1), 60.0, Target(60.0))
    assert row.open_queue is not None
    assert row.open_queue.service_cv2 == pytest.approx(expected)


def test_queue_limit_is_the_smallest_that_refuses_at_most_the_share() -> None:
    for queue in (Queue(1, 0.08, 10.0), Queue(4, 0.3, 10.0), Queue(10, 0.05, 10.0), Queue(3, 0.299, 10.0)):
        for refusal in (0.05, 0.01, 0.001):
            limit = queue.queue_limit(refusal)
            assert limit is not None
            assert queue.p_at_least(limit) <= refusal
            assert limit == 1 or queue.p_at_least(limit - 1) > refusal


def test_an_overloaded_queue_says_it_cannot_keep_up() -> None:
    for queue in (Queue(2, 0.2, 10.0), Queue(2, 0.25, 10.0)):  # utilisation exactly 1, then above
        assert not queue.stable
        assert queue.p_wait == 1.0
        assert queue.wait_quantile(0.9) == math.inf
        assert queue.mean_wait_s == math.inf
        assert queue.queue_limit(0.01) is None
    assert erlang_c(4, 4.0) == 1.0


# ----- the closed team ----------------------------------------------------------------------------------


def test_one_user_never_waits() -> None:
    team = ClosedTeam(1, 1, 60.0, 30.0)
    assert team.p_wait == 0.0
    assert team.wait_quantile(0.99) == 0.0
    assert team.queue_limit(0.001) == 1
    # The user alternates 60 s of thinking and 30 s of service: a node busy a third of the time.
    assert team.utilisation == pytest.approx(1 / 3)


def test_two_users_on_one_node_by_hand() -> None:
    # The other user is in the system with probability r / (1 + r), r = S / Z; a turn that finds them waits
    # for their remaining service, exponential with mean S.
    think, service = 40.0, 30.0
    r = service / think
    team = ClosedTeam(1, 2, think, service)
    assert team.p_wait == pytest.approx(r / (1 + r))
    assert team.wait_exceeds(20.0) == pytest.approx(r / (1 + r) * math.exp(-20.0 / service))
    q = 0.9
    assert team.wait_quantile(q) == pytest.approx(service * math.log(r / (1 + r) / (1 - q)), rel=1e-6)
    assert team.mean_wait_s == pytest.approx(r / (1 + r) * service)
    assert team.queue_limit(0.01) == 2


def test_a_large_team_of_light_users_approaches_erlang_c() -> None:
    service, rate = 20.0, 0.2  # 4 Erlangs on 5 nodes
    users = 5000
    team = ClosedTeam(5, users, users / rate - service, service)
    queue = Queue(5, rate, service)
    assert team.p_wait == pytest.approx(queue.p_wait, rel=0.01)
    assert team.wait_quantile(0.9) == pytest.approx(queue.wait_quantile(0.9), rel=0.02)


def test_nobody_thinking_keeps_every_user_in_the_system() -> None:
    team = ClosedTeam(2, 3, 0.0, 10.0)
    assert team.p_wait == 1.0  # a turn always finds the other two users' turns
    assert team.throughput == pytest.approx(2 / 10.0)


# ----- turns, sizing, the gateway -----------------------------------------------------------------------


def test_service_time_of_a_turn() -> None:
    node = NodeSpeed(prefill_tps=10.0, decode_tps=5.0, turn_overhead_s=4.0)
    assert service_seconds(node, TurnShape(7000, 100, 50)) == pytest.approx(4.0 + 10.0 + 10.0)
    # A fifth of turns miss the prefix: they process the other 6,900 tokens too.
    missed = TurnShape(7000, 100, 50, prefix_miss=0.2)
    assert service_seconds(node, missed) == pytest.approx(24.0 + 0.2 * 6900 / 10.0)


def test_sizing_meets_the_target_with_the_fewest_nodes() -> None:
    node = NodeSpeed(10.0, 5.0, 4.0)
    turn = TurnShape(7000, 100, 50)
    target = Target(wait_s=30.0, quantile=0.9)
    for users in (1, 2, 5, 10, 20, 50):
        row = plan_team(users, node, turn, 60.0, target)
        assert row.keeps_up
        assert row.nodes == row.needed_open
        assert row.nodes is not None
        assert row.open_queue is not None
        assert row.open_queue.wait_quantile(0.9) <= 30.0
        fewer = Queue(row.nodes - 1, row.open_queue.arrival_rate, row.service_s) if row.nodes > 1 else None
        assert fewer is None or not fewer.stable or fewer.wait_quantile(0.9) > 30.0
        assert row.needed_closed is not None
        assert row.needed_closed <= row.nodes
        assert row.closed_team is not None
        assert row.closed_team.wait_quantile(0.9) <= 30.0
        assert row.closed_queue_limit is not None
        assert row.closed_queue_limit <= users
    # Twice the team on the same nodes: the rows grow with it.
    assert plan_team(50, node, turn, 60.0, target).nodes > plan_team(20, node, turn, 60.0, target).nodes  # type: ignore[operator]


def test_too_few_nodes_names_how_many_it_would_need() -> None:
    node = NodeSpeed(10.0, 5.0, 4.0)
    turn = TurnShape(7000, 100, 50)  # 24 s a turn
    row = plan_team(20, node, turn, 36.0, Target(60.0), nodes=3)  # 20 / 60 s x 24 s = 8 Erlangs
    assert row.offered == pytest.approx(8.0)
    assert not row.keeps_up
    assert row.queue_limit is None
    assert nodes_to_keep_up(row) == 9  # exactly 8 nodes would never catch up
    assert row.needed_open is not None
    assert row.needed_open >= 9
    enough = plan_team(20, node, turn, 36.0, Target(60.0), nodes=row.needed_open)
    assert enough.keeps_up


def test_random_routing_needs_at_least_as_many_nodes_as_one_queue() -> None:
    node, turn, target = NodeSpeed(10.0, 5.0, 4.0), TurnShape(7000, 100, 50), Target(30.0)
    for users in (5, 20, 50):
        central = plan_team(users, node, turn, 60.0, target)
        split = plan_team(users, node, turn, 60.0, target, random_routing=True)
        assert split.nodes is not None
        assert central.nodes is not None
        assert split.nodes >= central.nodes
    assert random_split(4, 0.1, 20.0).utilisation == pytest.approx(0.5)


def test_think_time_from_turns_per_hour() -> None:
    assert think_for_turns_per_hour(60, 20.0) == pytest.approx(40.0)
    with pytest.raises(CapacityError, match=r"one turn takes 80\.0 s"):
        think_for_turns_per_hour(60, 80.0)


def test_gateway_limits() -> None:
    node = NodeSpeed(10.0, 5.0, 4.0)  # 200 ms a token
    turn = TurnShape(7000, 100, 50)  # 24 s a turn
    limits = gateway_limits(GatewayCost(ms_per_request=2.0, ms_per_token=0.2), node, turn)
    assert limits["gateway_ms_per_turn"] == pytest.approx(12.0)
    assert limits["gateway_over_token"] == pytest.approx(0.001)
    assert limits["nodes_per_gateway_core"] == pytest.approx(24000 / 12.0)
    assert limits["streams_per_gateway_core"] == pytest.approx(1000.0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: NodeSpeed(0.0, 5.0),
        lambda: TurnShape(100, 200, 10),
        lambda: TurnShape(100, 50, 10, prefix_miss=1.5),
        lambda: Queue(0, 1.0, 1.0),
        lambda: Target(10.0, quantile=1.0),
        lambda: ClosedTeam(1, 0, 10.0, 10.0),
    ],
)
def test_impossible_inputs_are_refused(build: object) -> None:
    with pytest.raises(CapacityError):
        build()  # type: ignore[operator]


# ----- the command --------------------------------------------------------------------------------------


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "capacity", *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_the_command_prints_a_row_per_team_size(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run([], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("USERS")
    assert [line.split()[0] for line in lines[1:7]] == ["1", "2", "5", "10", "20", "50"]
    assert "Erlangs" in out
    assert "one gateway core keeps up with" in out


def test_the_command_reads_the_other_benches_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overhead = tmp_path / "overhead.json"
    overhead.write_text(json.dumps({"gateway_cpu": {"ms_per_request": 2.5, "ms_per_token": 0.25}}))
    args = [
        *("--from-bench", str(RESULTS / "cpu-coding.json"), "--profile", "speculative/qwen2.5-coder-1.5b-balanced"),
        *("--from-prompt-cache", str(RESULTS / "cpu-prompt-cache.json")),
        *("--from-overhead", str(overhead), "--users", "3", "--json", "-"),
    ]
    code, out, _ = _run(args, capsys)
    assert code == 0
    document = json.loads(out)
    coding = json.loads((RESULTS / "cpu-coding.json").read_text())
    balanced = next(a for a in coding["arms"] if a["label"] == "speculative/qwen2.5-coder-1.5b-balanced")
    assert document["inputs"]["decode_tps"] == pytest.approx(balanced["decode_tokens_per_second"]["median"])
    cache = json.loads((RESULTS / "cpu-prompt-cache.json").read_text())
    cold = next(p for p in cache["phases"] if p["phase"] == "cold")
    assert document["inputs"]["prefill_tps"] == pytest.approx(cold["prompt_tokens"] / cold["backend_prompt_s"])
    assert document["inputs"]["gateway_ms_per_request"] == 2.5
    assert "cpu-prompt-cache.json" in document["sources"]["prefill_tps"]
    assert [row["users"] for row in document["rows"]] == [3]


def test_the_command_says_when_a_fleet_cannot_keep_up(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--nodes", "1", "--users", "1,20", "--json", "-"], capsys)
    assert code == 0
    one, twenty = json.loads(out)["rows"]
    assert one["keeps_up"]
    assert not twenty["keeps_up"]
    assert twenty["wait_quantile_s"] is None
    assert twenty["max_queue"] is None
    assert twenty["nodes_to_keep_up"] > 1
    assert twenty["nodes_for_target_open"] >= twenty["nodes_to_keep_up"]
    code, out, _ = _run(["--nodes", "1", "--users", "20"], capsys)
    assert f"1: CANNOT KEEP UP (needs {twenty['nodes_to_keep_up']};" in out


def test_the_command_refuses_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["--turns-per-hour", "1000"], capsys)
    assert code == 2
    assert "cannot send 1000 turns an hour" in err
    # An overhead file of an older version has no gateway CPU figures.
    code, _, err = _run(["--from-overhead", str(RESULTS / "cpu-overhead.json")], capsys)
    assert code == 2
    assert "no gateway_cpu" in err
    code, _, err = _run(["--from-bench", str(RESULTS / "cpu-coding.json"), "--profile", "nope"], capsys)
    assert code == 2
    assert "no arm 'nope'" in err
    code, _, err = _run(["--new-tokens", "9000"], capsys)
    assert code == 2
    assert "new tokens <= prompt tokens" in err


def test_the_command_writes_markdown_for_a_random_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--routing", "random", "--users", "5", "--markdown", "-"], capsys)
    assert code == 0
    assert out.startswith("| USERS |")
    assert "each node an M/M/1 with its own queue" in out
    assert "- MAX_QUEUE with a random split is per node" in out
    assert "  - decode_tps = " in out  # the inputs, one nested item each, with their source
