"""Admission (app/scheduler.py) under random schedules of arrivals, cancellations and releases.

Each client is a real asyncio task doing what the request handler does: `admit`, `wait_turn`, hold the slot,
`release` in `finally` (once). A schedule is a seeded random sequence of batches; the operations of a batch run
back to back with no await between them, so a release that hands the slot to a waiter can be followed, before
that waiter resumes, by the cancellation of the same waiter (a client that leaves just as its turn comes: the
interleaving behind issue 19 item 17, where `running` went negative). Between batches the loop runs a random
number of steps, so tasks are caught at every point of their life.

After every settle the counts must be exact: `running` is the number of clients holding a slot, never above
the concurrency, no slot idle while a live client waits, `waiting` is the number of clients still waiting, the
per-profile counts are admissions minus releases, and slots go out in arrival order.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from app.errors import QueueFull
from app.scheduler import Admission, Ticket

PROFILES = ("a", "b", "c")


@dataclass
class Client:
    """One request: its arrival order, its task, and where it is now."""

    number: int
    ticket: Ticket
    task: asyncio.Task[None] | None = None
    phase: str = "arriving"  # arriving -> waiting -> holding -> done
    held: bool = False  # it saw its turn come
    leave: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingAdmission(Admission):
    """Admission that notes each ticket at the moment it is given a slot (the order slots go out)."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.grants: list[Ticket] = []

    def _take(self, ticket: Ticket) -> None:
        super()._take(ticket)
        self.grants.append(ticket)


@dataclass
class World:
    admission: RecordingAdmission
    limit: int
    clients: list[Client] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def granted(self) -> list[int]:
        """Client numbers in the order their slots were given (clients arrive in number order)."""
        number = {id(client.ticket): client.number for client in self.clients}
        return [number[id(ticket)] for ticket in self.admission.grants]

    def in_phase(self, phase: str) -> list[Client]:
        return [client for client in self.clients if client.phase == phase]


async def run_client(world: World, client: Client) -> None:
    """The handler's shape: wait for a turn, then hold the slot until told to leave."""
    client.phase = "waiting"
    try:
        await world.admission.wait_turn(client.ticket)
        client.phase = "holding"
        client.held = True
        await client.leave.wait()
    except asyncio.CancelledError:
        pass
    except BaseException as error:  # a bug in the admission code: ValueError, AssertionError, ...
        world.errors.append(error)


def release_once(world: World, client: Client) -> None:
    """The handler releases after its task ends, whichever way (even cancelled before it started)."""
    client.phase = "done"
    world.admission.release(client.ticket)


def arrive(world: World, rng: random.Random) -> None:
    profile = rng.choice(PROFILES)
    try:
        ticket = world.admission.admit(profile, world.limit)
    except QueueFull:
        return
    client = Client(len(world.clients), ticket)
    world.clients.append(client)
    client.task = asyncio.ensure_future(run_client(world, client))
    client.task.add_done_callback(lambda _: release_once(world, client))


def act(world: World, rng: random.Random) -> None:
    """One operation: an arrival, a cancellation (of any live client), or a holder finishing."""
    live = [client for client in world.clients if client.phase != "done" and client.task is not None]
    choice = rng.random()
    if choice < 0.4 or not live:
        arrive(world, rng)
    elif choice < 0.7:
        # The client leaves: waiting, holding, or just handed its slot (its task not yet resumed).
        target = rng.choice(live)
        assert target.task is not None
        target.task.cancel()
    else:
        holders = [client for client in live if client.phase == "holding"]
        if holders:
            rng.choice(holders).leave.set()
        else:
            arrive(world, rng)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def check_counts(world: World) -> None:
    admission = world.admission
    holding = world.in_phase("holding")
    waiting = world.in_phase("waiting")
    assert not world.errors, world.errors
    assert admission.running == len(holding), (admission.running, len(holding))
    assert 0 <= admission.running <= admission.concurrency
    assert admission.waiting == len(waiting)
    if admission.running < admission.concurrency:
        assert not waiting, "a slot is free while a client waits"
    for profile in PROFILES:
        live = sum(1 for client in world.clients if client.phase != "done" and client.ticket.profile == profile)
        assert admission.profile_count(profile) == live
        assert admission.waiting_for(profile) == sum(1 for client in waiting if client.ticket.profile == profile)
    # First come, first served: a later arrival never got its turn before an earlier one.
    granted = world.granted()
    assert granted == sorted(granted)


async def run_schedule(seed: int, steps: int) -> World:
    rng = random.Random(seed)
    world = World(RecordingAdmission(concurrency=rng.randint(1, 4)), limit=rng.randint(2, 12))
    for _ in range(steps):
        for _ in range(rng.randint(1, 6)):  # a batch: no await between these operations
            act(world, rng)
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        if rng.random() < 0.3:
            await settle()
            check_counts(world)
    await settle()
    check_counts(world)
    # Everyone leaves: the counts return to zero exactly.
    for client in world.clients:
        if client.task is not None and client.phase != "done":
            client.task.cancel() if rng.random() < 0.5 else client.leave.set()
    await asyncio.gather(*(client.task for client in world.clients if client.task is not None), return_exceptions=True)
    await settle()
    check_counts(world)
    assert (world.admission.running, world.admission.waiting, world.admission.active) == (0, 0, 0)
    assert all(world.admission.profile_count(profile) == 0 for profile in PROFILES)
    return world


@pytest.mark.parametrize("seed_block", range(8))
async def test_counts_stay_exact_under_random_schedules(seed_block: int) -> None:
    handed_then_cancelled = 0
    for seed in range(seed_block * 50, seed_block * 50 + 50):
        world = await run_schedule(seed, steps=150)
        held = {client.number for client in world.clients if client.held}
        handed_then_cancelled += sum(1 for number in world.granted() if number not in held)
    # The schedules do reach the interleaving that matters: a slot handed to a client that was cancelled
    # before it resumed (given a slot, the client never saw its turn).
    assert handed_then_cancelled > 0


async def test_a_waiter_cancelled_as_its_turn_comes_passes_the_slot_once() -> None:
    """The interleaving of item 17, spelled out: release hands the slot to B, B is cancelled before it resumes."""
    admission = Admission(concurrency=1)
    tickets = [admission.admit("p", 10) for _ in range(3)]
    await admission.wait_turn(tickets[0])
    second = asyncio.ensure_future(admission.wait_turn(tickets[1]))
    third = asyncio.ensure_future(admission.wait_turn(tickets[2]))
    await settle()
    admission.release(tickets[0])  # hands the slot to the second ...
    second.cancel()  # ... whose client leaves before its task resumes
    await settle()
    assert second.cancelled()
    admission.release(tickets[1])  # the handler's `finally`: must not hand the slot over again
    assert third.done()
    assert not third.cancelled()
    assert (admission.running, admission.waiting) == (1, 0)
    admission.release(tickets[2])
    assert (admission.running, admission.waiting, admission.profile_count("p")) == (0, 0, 0)


async def test_a_waiter_cancelled_then_skipped_by_a_release_leaves_no_error() -> None:
    """Cancelled while queued, and popped (skipped) by a release before its task resumed: no ValueError."""
    admission = Admission(concurrency=1)
    tickets = [admission.admit("p", 10) for _ in range(2)]
    await admission.wait_turn(tickets[0])
    waiter = asyncio.ensure_future(admission.wait_turn(tickets[1]))
    await settle()
    waiter.cancel()
    admission.release(tickets[0])
    await settle()
    assert waiter.cancelled()
    admission.release(tickets[1])
    assert (admission.running, admission.waiting, admission.profile_count("p")) == (0, 0, 0)
