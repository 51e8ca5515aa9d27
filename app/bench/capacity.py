"""A scale model on paper: how many nodes, and what queue limit, a team of N OpenCode users needs.

Pure arithmetic, no I/O: `specgate bench capacity` (app/bench/capacity_command.py) feeds it measured figures.

A **node** serves one stream at a time: a speculative backend (or any profile at `max_concurrency = 1`)
takes one request, and the others wait in the gateway's FIFO queue. So the model is a multi-server queue
with c servers (nodes) and one queue in front of them:

- **service time** of one OpenCode turn on a node: a fixed part (cache lookup or restore, the first
  speculative round, measured as a cached turn's time to first token less its new tokens' prefill), the
  prompt tokens after the cached prefix at the node's prefill rate, the answer's tokens at its decode rate;
- **arrivals**: each user sends a turn, waits for the answer, thinks (reads, runs a tool, types) for a mean
  `think_seconds`, sends the next;
- **open model (M/M/c, Erlang C)**: turns arrive as a Poisson stream at the team's rate N / (think + service),
  service times are exponential, the queue is unbounded and FIFO. It overstates the wait of a small team (a
  user with a turn in the queue sends no other), so it sizes on the safe side;
- **closed model (M/M/c//N, finite source)**: the same with exactly N users, each at most one turn in the
  system; exact for exponential times, and for one user it says what is true: a user alone never waits.

Where both break: service times of agent turns are long-tailed (a turn whose prefix is not cached costs
minutes on a CPU, ~50x a cached one), and a long tail makes waits longer than these exponential models say;
a gateway that routes each request to a node on arrival (shortest queue) rather than holding one queue in
front of all of them waits more than M/M/c, less than a random split (`random_split_*`: c independent
M/M/1 queues, each at 1/c of the load).

Queue limit: a profile's `max_queue` counts its requests running plus waiting; a request that finds it full
is refused with 429. The limit asked for is the smallest with at most `refusal` of turns refused (computed on
the unbounded queue, which a limit that rarely bites leaves nearly unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

# Where a search for a node count gives up: far beyond any team this is meant for.
MAX_NODES = 100_000


class CapacityError(ValueError):
    """Inputs that describe no possible system (a negative rate, a quantile outside (0, 1), ...)."""


# ----- a turn and a node ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpeed:
    """What one node does, measured: tokens per second at the context length of the turns served."""

    prefill_tps: float
    decode_tps: float
    # Seconds a turn costs beyond its tokens (see the module docstring).
    turn_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.prefill_tps > 0 and self.decode_tps > 0 and self.turn_overhead_s >= 0):
            raise CapacityError(f"node speeds must be positive and the overhead not negative: {self}")


@dataclass(frozen=True)
class TurnShape:
    """One OpenCode turn: its whole prompt, the part after the cached prefix, its answer."""

    prompt_tokens: int
    new_tokens: int
    output_tokens: int
    # Share of turns whose cached prefix is not on the node that serves them (another node has it, or it
    # was evicted): those process the whole prompt.
    prefix_miss: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.new_tokens <= self.prompt_tokens or self.output_tokens < 0:
            raise CapacityError(f"a turn needs 0 <= new tokens <= prompt tokens and output >= 0: {self}")
        if not 0.0 <= self.prefix_miss <= 1.0:
            raise CapacityError(f"prefix_miss is a share, 0 to 1: {self.prefix_miss}")

    @property
    def computed_tokens(self) -> float:
        """Prompt tokens a node processes per turn, on average."""
        return self.new_tokens + self.prefix_miss * (self.prompt_tokens - self.new_tokens)


def service_seconds(node: NodeSpeed, turn: TurnShape) -> float:
    """Mean time one node is busy with one turn."""
    return node.turn_overhead_s + turn.computed_tokens / node.prefill_tps + turn.output_tokens / node.decode_tps


def service_cv2(node: NodeSpeed, turn: TurnShape) -> float:
    """The squared coefficient of variation of a turn's service time: 1 for the exponential times the models
    assume; with prefix misses, that of a mix of two exponentials (hits, and misses that process the whole
    prompt), which is what a miss costing ~50x a hit does to the spread."""
    if turn.prefix_miss == 0.0:
        return 1.0
    hit = service_seconds(node, TurnShape(turn.prompt_tokens, turn.new_tokens, turn.output_tokens))
    miss = service_seconds(node, TurnShape(turn.prompt_tokens, turn.prompt_tokens, turn.output_tokens))
    share = turn.prefix_miss
    mean = (1.0 - share) * hit + share * miss
    second_moment = 2.0 * ((1.0 - share) * hit**2 + share * miss**2)
    return second_moment / mean**2 - 1.0


# ----- the open model: M/M/c (Erlang C) -------------------------------------------------------------------


def erlang_b(servers: int, offered: float) -> float:
    """Erlang B: the share of arrivals that find all `servers` busy when none may wait (`offered` Erlangs)."""
    if servers < 0 or offered < 0:
        raise CapacityError("servers and offered load must not be negative")
    blocked = 1.0
    # The standard recursion: stable for any size, no factorials.
    for k in range(1, servers + 1):
        blocked = offered * blocked / (k + offered * blocked)
    return blocked


def erlang_c(servers: int, offered: float) -> float:
    """Erlang C: the probability that a turn has to wait, M/M/c with `offered` = arrival rate x service time
    (Erlangs). 1.0 when offered >= servers: the queue grows without bound."""
    if servers < 1:
        raise CapacityError("at least one server")
    if offered >= servers:
        return 1.0
    blocked = erlang_b(servers, offered)
    return servers * blocked / (servers - offered * (1.0 - blocked))


@dataclass(frozen=True)
class Queue:
    """M/M/c: `servers` nodes, turns at `arrival_rate` per second, mean service `service_s` seconds."""

    servers: int
    arrival_rate: float
    service_s: float
    # Squared coefficient of variation of the service time; 1: exponential (M/M/c). Otherwise the waits are
    # scaled by (1 + cv2) / 2, the Allen-Cunneen approximation for M/G/c (P(wait) and the queue-length
    # figures stay M/M/c's).
    service_cv2: float = 1.0

    def __post_init__(self) -> None:
        if self.servers < 1 or self.arrival_rate < 0 or self.service_s <= 0 or self.service_cv2 < 0:
            raise CapacityError(f"a queue needs servers >= 1, arrivals >= 0, service > 0, cv2 >= 0: {self}")

    @property
    def offered(self) -> float:
        """Offered load in Erlangs: how many nodes the turns keep busy on average."""
        return self.arrival_rate * self.service_s

    @property
    def utilisation(self) -> float:
        return self.offered / self.servers

    @property
    def stable(self) -> bool:
        return self.offered < self.servers

    @property
    def p_wait(self) -> float:
        return erlang_c(self.servers, self.offered)

    def _drain_rate(self) -> float:
        """Rate at which the queue ahead of a waiting turn empties, net of arrivals: (c - a) / S (scaled down
        for a service time more spread than exponential)."""
        return (self.servers - self.offered) / self.service_s / ((1.0 + self.service_cv2) / 2.0)

    @property
    def mean_wait_s(self) -> float:
        return self.p_wait / self._drain_rate() if self.stable else math.inf

    def wait_exceeds(self, seconds: float) -> float:
        """P(wait > seconds): Erlang C times an exponential tail."""
        if not self.stable:
            return 1.0
        return self.p_wait * math.exp(-self._drain_rate() * seconds)

    def wait_quantile(self, q: float) -> float:
        """The wait that a share `q` of turns stay within (0.9: the p90 wait)."""
        _check_share(q, "quantile")
        if not self.stable:
            return math.inf
        if self.p_wait <= 1.0 - q:
            return 0.0
        return math.log(self.p_wait / (1.0 - q)) / self._drain_rate()

    def p_at_least(self, k: int) -> float:
        """P(an arriving turn finds k or more turns running or waiting): the share refused by max_queue = k."""
        if k <= 0 or not self.stable:
            return 1.0
        if self.offered == 0:
            return 0.0
        c, rho, wait = self.servers, self.utilisation, self.p_wait
        if k >= c:
            return wait * rho ** (k - c)
        # Below c: P(N >= c) plus the states k..c-1, from p_c = C (1 - rho) downwards (p_{n-1} = p_n n / a).
        total, p_n = wait, wait * (1.0 - rho)
        for n in range(c, k, -1):
            p_n = p_n * n / self.offered
            total += p_n
        return min(1.0, total)

    def queue_limit(self, refusal: float) -> int | None:
        """The smallest max_queue that refuses at most a share `refusal` of turns; None if unstable."""
        _check_share(refusal, "refusal")
        if not self.stable:
            return None
        if self.p_at_least(self.servers) > refusal and self.utilisation > 0:
            # Above c the tail is geometric: C rho^(k - c) <= refusal.
            k = self.servers + math.ceil(math.log(refusal / self.p_wait) / math.log(self.utilisation))
            while k > self.servers and self.p_at_least(k - 1) <= refusal:  # rounding of the logarithms
                k -= 1
            while self.p_at_least(k) > refusal:
                k += 1
            return k
        k = 1
        while self.p_at_least(k) > refusal:
            k += 1
        return k


def random_split(servers: int, arrival_rate: float, service_s: float, service_cv2: float = 1.0) -> Queue:
    """One node's queue when turns are split among `servers` nodes at random: an M/M/1 at 1/c of the load.
    A router that picks the shortest queue does better than this and worse than one shared queue (M/M/c)."""
    return Queue(1, arrival_rate / servers, service_s, service_cv2)


# ----- the closed model: N users, M/M/c//N ----------------------------------------------------------------


@dataclass(frozen=True)
class ClosedTeam:
    """`users` users, each thinking a mean `think_s` between an answer and their next turn; `servers` nodes.

    Exact for exponential think and service times (the machine-repair model); by the arrival theorem a turn
    finds the system as it stands with one user fewer."""

    servers: int
    users: int
    think_s: float
    service_s: float

    def __post_init__(self) -> None:
        if self.servers < 1 or self.users < 1 or self.think_s < 0 or self.service_s <= 0:
            raise CapacityError(f"a team needs servers >= 1, users >= 1, think >= 0, service > 0: {self}")

    def distribution(self, users: int) -> list[float]:
        """P(n turns running or waiting), n = 0..users, with `users` users."""
        if self.think_s == 0:
            # Nobody thinks: every user always has a turn in the system.
            return [0.0] * users + [1.0]
        log_ratio = math.log(self.service_s / self.think_s)
        # In logarithms: for a large team the weights overflow a float long before they are normalised.
        logs = [0.0]
        for n in range(1, users + 1):
            logs.append(logs[-1] + math.log(users - n + 1) + log_ratio - math.log(min(n, self.servers)))
        top = max(logs)
        weights = [math.exp(value - top) for value in logs]
        total = sum(weights)
        return [w / total for w in weights]

    @cached_property
    def _seen(self) -> tuple[float, ...]:
        return tuple(self.distribution(self.users - 1))

    @property
    def p_wait(self) -> float:
        return sum(self._seen[self.servers :])

    def wait_exceeds(self, seconds: float) -> float:
        """P(wait > seconds): a turn finding k >= c in the system waits for k - c + 1 departures, each at
        rate c / S while all nodes are busy (an Erlang distribution)."""
        mean = self.servers * seconds / self.service_s
        total = 0.0
        cdf = 0.0
        # P(Poisson(mean) <= k - c), built up one term per k (in logarithms: the terms underflow otherwise).
        for k, p in enumerate(self._seen[self.servers :], start=self.servers):
            i = k - self.servers
            cdf = min(1.0, cdf + _poisson_term(i, mean))
            total += p * cdf
        return total

    def wait_quantile(self, q: float) -> float:
        _check_share(q, "quantile")
        if self.p_wait <= 1.0 - q:
            return 0.0
        low, high = 0.0, self.service_s
        while self.wait_exceeds(high) > 1.0 - q:
            high *= 2.0
        for _ in range(100):
            middle = (low + high) / 2.0
            if self.wait_exceeds(middle) > 1.0 - q:
                low = middle
            else:
                high = middle
        return high

    @property
    def mean_wait_s(self) -> float:
        # Each turn finding k >= c waits (k - c + 1) S / c on average.
        seen = self._seen
        return sum(p * (k - self.servers + 1) for k, p in enumerate(seen) if k >= self.servers) * (
            self.service_s / self.servers
        )

    @property
    def throughput(self) -> float:
        """Turns per second the team gets through."""
        dist = self.distribution(self.users)
        if self.think_s == 0:
            return min(self.users, self.servers) / self.service_s
        in_system = sum(n * p for n, p in enumerate(dist))
        return (self.users - in_system) / self.think_s

    @property
    def utilisation(self) -> float:
        return self.throughput * self.service_s / self.servers

    def p_at_least(self, k: int) -> float:
        return sum(self._seen[max(k, 0) :])

    def queue_limit(self, refusal: float) -> int:
        """The smallest max_queue that refuses at most `refusal` of turns (never above N: N users hold at
        most N turns)."""
        _check_share(refusal, "refusal")
        k = 1
        while k < self.users and self.p_at_least(k) > refusal:
            k += 1
        return k


def _poisson_term(i: int, mean: float) -> float:
    """P(Poisson(mean) = i). Summed over i <= k: P(an Erlang(k + 1) time exceeds the one in which `mean`
    events are expected), the chance that fewer than k + 1 departures free a node in that time."""
    if mean == 0:
        return 1.0 if i == 0 else 0.0
    return math.exp(-mean + i * math.log(mean) - math.lgamma(i + 1))


def _check_share(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise CapacityError(f"{name} must be between 0 and 1 (exclusive): {value}")


# ----- sizing ---------------------------------------------------------------------------------------------


def smallest_nodes(meets: Callable[[int], bool], start: int = 1, limit: int = MAX_NODES) -> int | None:
    """The smallest node count from `start` for which `meets` holds (it must stay true once true)."""
    for servers in range(max(1, start), limit + 1):
        if meets(servers):
            return servers
    return None


@dataclass(frozen=True)
class Target:
    """What a team asks of the service: a share `quantile` of turns wait at most `wait_s` in the queue, and
    at most `refusal` of turns are refused by the queue limit."""

    wait_s: float
    quantile: float = 0.9
    refusal: float = 0.01

    def __post_init__(self) -> None:
        if self.wait_s < 0:
            raise CapacityError("the target wait must not be negative")
        _check_share(self.quantile, "quantile")
        _check_share(self.refusal, "refusal")


@dataclass(frozen=True)
class GatewayCost:
    """The gateway's own CPU per request and per streamed token (`specgate bench overhead`)."""

    ms_per_request: float
    ms_per_token: float

    def ms_per_turn(self, turn: TurnShape) -> float:
        return self.ms_per_request + self.ms_per_token * turn.output_tokens


@dataclass(frozen=True)
class Row:
    """One team size: what it offers, the nodes and queue limit it needs, and how that fleet behaves."""

    users: int
    service_s: float
    turns_per_hour: float  # the team's, at no waiting
    offered: float  # Erlangs: nodes kept busy
    nodes: int | None  # the nodes evaluated: sized (open model) or given
    needed_open: int | None  # nodes the open model needs for the target
    needed_closed: int | None  # nodes the closed model needs for the target
    open_queue: Queue | None  # the open model at `nodes` (None when `nodes` is None)
    closed_team: ClosedTeam | None  # the closed model at the nodes given, else at `needed_closed`
    queue_limit: int | None  # max_queue for the target's refusal share (open model), None if unstable
    closed_queue_limit: int | None  # the same in the closed model (at most N)
    gateway_core_share: float | None  # share of one CPU core the gateway spends on the team's turns

    @property
    def keeps_up(self) -> bool:
        return self.open_queue is not None and self.open_queue.stable


def plan_team(
    users: int,
    node: NodeSpeed,
    turn: TurnShape,
    think_s: float,
    target: Target,
    nodes: int | None = None,
    gateway: GatewayCost | None = None,
    random_routing: bool = False,
) -> Row:
    """Size (or, with `nodes`, evaluate) the fleet for `users` users."""
    if users < 1:
        raise CapacityError("at least one user")
    if think_s < 0:
        raise CapacityError("think time must not be negative")
    service = service_seconds(node, turn)
    cv2 = service_cv2(node, turn)
    rate = users / (think_s + service)

    def open_queue(c: int) -> Queue:
        return random_split(c, rate, service, cv2) if random_routing else Queue(c, rate, service, cv2)

    def open_meets(c: int) -> bool:
        q = open_queue(c)
        return q.stable and q.wait_quantile(target.quantile) <= target.wait_s

    def closed_meets(c: int) -> bool:
        return ClosedTeam(c, users, think_s, service).wait_quantile(target.quantile) <= target.wait_s

    needed_open = smallest_nodes(open_meets, start=math.floor(rate * service) + 1)
    # N nodes for N users: nobody ever waits, so the closed search ends there.
    needed_closed = smallest_nodes(closed_meets, limit=users)
    chosen = nodes if nodes is not None else needed_open
    queue = open_queue(chosen) if chosen is not None else None
    closed_nodes = nodes if nodes is not None else needed_closed
    team = ClosedTeam(closed_nodes, users, think_s, service) if closed_nodes is not None else None
    limit = None
    if queue is not None and queue.stable:
        # One queue in front of all nodes (the gateway's): the limit is the profile's max_queue. With a random
        # split each node's gateway holds its own queue: the limit is per node.
        limit = queue.queue_limit(target.refusal)
    share = None if gateway is None else rate * gateway.ms_per_turn(turn) / 1000.0
    return Row(
        users=users,
        service_s=service,
        turns_per_hour=rate * 3600.0,
        offered=rate * service,
        nodes=chosen,
        needed_open=needed_open,
        needed_closed=needed_closed,
        open_queue=queue,
        closed_team=team,
        queue_limit=limit,
        closed_queue_limit=team.queue_limit(target.refusal) if team is not None else None,
        gateway_core_share=share,
    )


def nodes_to_keep_up(row: Row) -> int:
    """The fewest nodes on which the queue stops growing: more than the offered load."""
    return math.floor(row.offered) + 1


def think_for_turns_per_hour(turns_per_hour: float, service_s: float) -> float:
    """The think time that makes a user who never waits send `turns_per_hour` turns an hour."""
    if turns_per_hour <= 0:
        raise CapacityError("turns per hour must be positive")
    think = 3600.0 / turns_per_hour - service_s
    if think < 0:
        raise CapacityError(
            f"a user cannot send {turns_per_hour:g} turns an hour: one turn takes {service_s:.1f} s on one node "
            f"(at most {3600.0 / service_s:.0f} an hour)"
        )
    return think


def gateway_limits(gateway: GatewayCost, node: NodeSpeed, turn: TurnShape) -> dict[str, float]:
    """When would the gateway itself be the bottleneck? Its event loop is one CPU core."""
    service = service_seconds(node, turn)
    per_turn = gateway.ms_per_turn(turn)
    token_ms = 1000.0 / node.decode_tps
    return {
        "gateway_ms_per_turn": per_turn,
        # Of a node's time on a turn, the share the gateway's CPU costs: small means far from a bottleneck.
        "gateway_over_service": per_turn / (service * 1000.0),
        "backend_ms_per_token": token_ms,
        "gateway_ms_per_token": gateway.ms_per_token,
        "gateway_over_token": gateway.ms_per_token / token_ms,
        # Busy nodes one gateway core keeps up with, each finishing a turn every `service` seconds.
        "nodes_per_gateway_core": service * 1000.0 / per_turn if per_turn > 0 else math.inf,
        # Streams at the node's decode pace one core relays, on the per-token cost alone.
        "streams_per_gateway_core": token_ms / gateway.ms_per_token if gateway.ms_per_token > 0 else math.inf,
    }
