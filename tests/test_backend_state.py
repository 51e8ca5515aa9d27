"""The backend's state machine: one table of transitions (app/backends/process.py), one method that writes the
state, and every other change refused and logged."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from app.backends.process import TRANSITIONS, Backend, BackendState, BackendTiming
from app.models.sources import SourceStatus
from app.profiles import parse_profiles

PROCESS_PY = Path(__file__).resolve().parent.parent / "app" / "backends" / "process.py"


def make_backend() -> Backend:
    (profile,) = parse_profiles('[profiles.p]\nmodel = "some/model"\n')

    def resolve(value: str) -> SourceStatus:
        raise AssertionError("no start in these tests")

    return Backend("b1-test", profile.backend_spec, BackendTiming(), resolve, httpx.AsyncClient())


ALL_PAIRS = [(old, new) for old in BackendState for new in BackendState]


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=[f"{o.value}-{n.value}" for o, n in ALL_PAIRS])
def test_every_change_is_allowed_exactly_when_the_table_holds_it(
    old: BackendState, new: BackendState, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend()
    backend._state = old  # the test sets the start point; the code under test is `_become`
    with caplog.at_level(logging.ERROR, logger="specgate.backend"):
        allowed = backend._become(new)
    refusal = f"refused state change {old.value} -> {new.value}"
    if new in TRANSITIONS[old]:
        assert allowed
        assert backend.state is new
        assert refusal not in caplog.text
    else:
        assert not allowed
        assert backend.state is old, "a refused change must leave the state as it was"
        assert refusal in caplog.text
        assert refusal in "\n".join(line.text for line in backend.log.tail(10))


def test_the_table_holds_the_lifecycle_and_nothing_that_skips_a_step() -> None:
    s = BackendState
    # The paths of the module docstring's diagram.
    for old, new in [
        (s.STOPPED, s.STARTING), (s.STARTING, s.READY), (s.STARTING, s.FAILED), (s.STARTING, s.STOPPED),
        (s.READY, s.FAILED), (s.READY, s.STOPPING), (s.STOPPING, s.STOPPED), (s.FAILED, s.STARTING),
        (s.FAILED, s.STOPPING), (s.STOPPING, s.FAILED),
    ]:  # fmt: skip
        assert new in TRANSITIONS[old], f"{old.value} -> {new.value}"
    # A process is never ready without a start, never dropped without a stop, and no state "changes" to itself.
    assert s.READY not in TRANSITIONS[s.STOPPED] | TRANSITIONS[s.FAILED] | TRANSITIONS[s.STOPPING]
    assert s.STOPPED not in TRANSITIONS[s.READY]
    assert all(state not in TRANSITIONS[state] for state in BackendState)


def test_the_state_has_one_writer() -> None:
    """Only `_become` (and the constructor's initial value) assigns the state attribute."""
    tree = ast.parse(PROCESS_PY.read_text())
    writers = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("state", "_state"):
                    writers.append(function.name)
    assert sorted(writers) == ["__init__", "_become"]


def test_the_state_cannot_be_assigned_from_outside() -> None:
    backend = make_backend()
    with pytest.raises(AttributeError):
        backend.state = BackendState.READY  # type: ignore[misc]
    assert backend.state is BackendState.STOPPED


def test_a_crash_noticed_while_stopping_changes_nothing() -> None:
    """An exit during a stop is expected; the stop's own path, not the exit watcher, ends in STOPPED."""

    async def scenario() -> None:
        backend = make_backend()
        backend._state = BackendState.STOPPING
        backend._expected_exit = True
        process = await asyncio.create_subprocess_exec("true")
        backend.process = process
        backend._on_exit(process, await process.wait())
        assert backend.state is BackendState.STOPPING

    asyncio.run(scenario())
