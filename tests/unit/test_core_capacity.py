"""N is a promise: a lowered capacity stops the surplus as soon as it is idle, whether
it was idle, busy or starting when N changed (stem cells first, then least recently
used). The core alone, driven by a small shell that carries out its commands."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import events as ev
from scheduler.core import Command, CoreConfig, Fail, Grant, LoadWorker, PoolCore, Retry, SpawnWorker, StopWorker
from scheduler.errors import WorkerStartError
from scheduler.policy import STEM, State

CONFIG = CoreConfig(capacity=3, default_ttl_s=30, stem_cells=1, queue_max=8)


class Shell:
    """Carries out the core's commands as a backend would; the test says which start
    comes up, which request finishes and when time passes."""

    def __init__(self, config: CoreConfig) -> None:
        self.core = PoolCore(config, id_prefix="w")
        self.now = 0.0
        self.waiting: dict[int, float] = {}  # request id -> deadline
        self.stops: list[StopWorker] = []
        self.spawns: list[SpawnWorker] = []
        self.loads: list[LoadWorker] = []
        self._ids = itertools.count(1)
        self.carry_out(self.core.handle(ev.Tick(self.now)))  # as the live pool's start: stem cells begin

    def carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Grant | Fail):
                self.waiting.pop(command.request_id, None)
            elif isinstance(command, StopWorker):
                self.stops.append(command)
            elif isinstance(command, SpawnWorker):
                self.spawns.append(command)
            elif isinstance(command, LoadWorker):
                self.loads.append(command)
            elif isinstance(command, Retry):  # its worker failed it: it waits again, until a new deadline
                self.waiting[command.request_id] = command.deadline
        if any(isinstance(c, SpawnWorker) for c in commands):
            assert self.live() <= self.core.config.capacity, "a start took the pool over N"

    def ids(self, *states: State) -> list[str]:
        return sorted(w.id for w in self.core.workers.values() if w.state in states)

    def live(self) -> int:
        """Workers not stopping: what N promises."""
        return len(self.ids(State.STARTING, State.IDLE, State.BUSY))

    # -- events ----------------------------------------------------------------------

    def arrive(self, model: str, wait_s: float = 60.0) -> int:
        request_id = next(self._ids)
        self.waiting[request_id] = self.now + wait_s
        self.carry_out(self.core.handle(ev.Arrive(request_id, model, self.now, self.now + wait_s)))
        return request_id

    def ready(self, worker_id: str) -> None:
        self.carry_out(self.core.handle(ev.Ready(worker_id, self.now, 100.0)))

    def release(self, worker_id: str, ok: bool = True) -> None:
        self.carry_out(self.core.handle(ev.Released(worker_id, self.now, ok=ok)))

    def configure(self, capacity: int, stem_cells: int) -> None:
        config = replace(self.core.config, capacity=capacity, stem_cells=stem_cells)
        self.carry_out(self.core.handle(ev.Configure(config, self.now)))

    def advance(self, seconds: float) -> None:
        """Time passes: waiters past their deadline expire, then a tick."""
        self.now += seconds
        for request_id, deadline in sorted(self.waiting.items(), key=lambda item: item[1]):
            if deadline <= self.now:
                self.waiting.pop(request_id)
                self.carry_out(self.core.handle(ev.Expire(request_id, self.now)))
        self.carry_out(self.core.handle(ev.Tick(self.now)))

    def drain(self) -> None:
        """Bring every start up, finish every request and every stop, until nothing is
        queued or in flight. A start/stop loop never settles: that fails."""
        for _ in range(2000):
            starting, busy = self.ids(State.STARTING), self.ids(State.BUSY)
            stopping = self.ids(State.STOPPING)
            if starting:
                self.ready(starting[0])
            elif busy:
                self.release(busy[0])
            elif stopping:
                self.carry_out(self.core.handle(ev.Stopped(stopping[0], self.now)))
            elif self.waiting:  # a held batch, or a waiter nothing can serve yet
                due = min(self.waiting.values())
                wake = self.core.next_wakeup()
                self.advance(max(0.0, min(due, math.inf if wake is None else wake) - self.now) + 1e-6)
            else:
                return
        raise AssertionError(f"the pool never settled: {self.core.workers}")


# -- examples ----------------------------------------------------------------------------


def issue_scenario() -> tuple[Shell, str, str, str]:
    """N=3 and one stem cell: a request takes the stem cell, five more arrive while its
    replacement and a container for the second one start. Returns the shell and the
    busy worker, the starting stem cell and the starting container."""
    shell = Shell(CONFIG)
    (stem,) = shell.spawns
    shell.now = 1.0
    shell.ready(stem.worker_id)
    shell.now = 2.0
    shell.arrive("demo-shapes")
    shell.now = 2.5
    shell.ready(stem.worker_id)  # the stem cell loaded the model and serves request 1
    shell.now = 3.0
    for _ in range(5):
        shell.arrive("demo-shapes")
    replacement = next(s.worker_id for s in shell.spawns if s.model == STEM and s.worker_id != stem.worker_id)
    container = next(s.worker_id for s in shell.spawns if s.model == "demo-shapes")
    assert shell.ids(State.BUSY) == [stem.worker_id]
    assert shell.ids(State.STARTING) == sorted([replacement, container])  # two workers starting
    assert len(shell.waiting) == 5
    return shell, stem.worker_id, replacement, container


def test_lowering_n_while_workers_start_and_serve_stops_each_surplus_worker_once_idle() -> None:
    shell, busy, stem, container = issue_scenario()
    shell.now = 4.0
    shell.configure(capacity=1, stem_cells=1)
    assert shell.stops == []  # nothing idle yet: busy and starting workers finish first

    shell.now = 5.0
    shell.ready(stem)  # the replacement stem cell comes up over N: it stops, no request takes it
    assert [(s.worker_id, s.reason) for s in shell.stops] == [(stem, "evicted")]
    assert shell.loads == [LoadWorker(busy, "demo-shapes", 1)]  # only the first load, before N changed

    shell.now = 6.0
    shell.ready(container)  # it was started for request 2, which has waited for it: it serves it
    assert shell.ids(State.BUSY) == sorted([busy, container])

    shell.now = 7.0
    shell.release(busy)  # idle first (least recently used): still over N, so it stops
    assert [s.worker_id for s in shell.stops] == [stem, busy]
    assert len(shell.waiting) == 4  # the waiters wait for the one worker N allows

    shell.now = 8.0
    shell.release(container)  # the pool is at N now: the next waiter gets it
    assert shell.ids(State.BUSY) == [container] and len(shell.stops) == 2

    shell.drain()
    shell.advance(10.0)
    assert shell.live() == 1 and shell.ids(State.IDLE) == [container]
    assert [s.worker_id for s in shell.stops] == [stem, busy] and len(shell.spawns) == 3  # nothing refilled
    assert shell.core.counters["warm_hits"] == 4  # requests 3 to 6, one after another on the one worker


def test_ten_more_requests_after_the_change_never_grow_the_pool_back() -> None:
    shell, *_ = issue_scenario()
    shell.now = 4.0
    shell.configure(capacity=1, stem_cells=1)
    shell.drain()
    for _ in range(10):
        shell.arrive("demo-shapes")
        shell.drain()
        assert shell.live() <= 1
    shell.advance(10.0)
    assert shell.live() == 1 and len(shell.core.workers) == 1  # the stopped ones are gone, none refilled


def test_surplus_stem_cells_go_first_then_the_least_recently_used_and_busy_ones_once_released() -> None:
    shell = Shell(replace(CONFIG, capacity=5, stem_cells=1))
    (first,) = shell.spawns
    shell.ready(first.worker_id)
    for model in ("a", "b", "c", "d"):  # a takes the stem cell, a new one starts, b, c, d get containers
        shell.arrive(model)
    for worker_id in shell.ids(State.STARTING):
        shell.ready(worker_id)
    workers = {w.model: w.id for w in shell.core.workers.values()}
    assert set(workers) == {STEM, "a", "b", "c", "d"} and not shell.waiting
    shell.now = 1.0
    shell.release(workers["a"])
    shell.now = 2.0
    shell.release(workers["b"])  # idle: the stem cell, a (since 1), b (since 2); busy: c and d
    shell.now = 3.0
    shell.configure(capacity=3, stem_cells=1)  # two over: the stem cell, then a
    assert [s.worker_id for s in shell.stops] == [workers[STEM], workers["a"]]
    shell.now = 4.0
    shell.configure(capacity=1, stem_cells=1)  # two over, one idle: b now, c or d once idle
    assert [s.worker_id for s in shell.stops][2:] == [workers["b"]]
    shell.now = 5.0
    shell.release(workers["c"])  # over N when it is idle: it stops instead of staying warm
    assert [s.worker_id for s in shell.stops][3:] == [workers["c"]]
    shell.now = 6.0
    shell.release(workers["d"])  # the last one is within N: kept
    assert len(shell.stops) == 4 and shell.live() == 1 and shell.ids(State.IDLE) == [workers["d"]]


def test_a_stem_cell_starting_when_fewer_are_wanted_stops_once_up() -> None:
    shell = Shell(replace(CONFIG, capacity=3, stem_cells=2))
    first, second = shell.spawns
    shell.ready(first.worker_id)
    shell.configure(capacity=3, stem_cells=0)
    assert [s.worker_id for s in shell.stops] == [first.worker_id]
    shell.ready(second.worker_id)
    assert [s.worker_id for s in shell.stops] == [first.worker_id, second.worker_id]
    shell.drain()
    shell.advance(1.0)
    assert shell.core.workers == {} and len(shell.spawns) == 2  # no refill: none wanted


def test_fewer_stem_cells_while_one_starts_leaves_the_wanted_count_without_a_loop() -> None:
    shell = Shell(replace(CONFIG, capacity=4, stem_cells=2))
    first, second = shell.spawns
    shell.ready(first.worker_id)
    shell.configure(capacity=4, stem_cells=1)
    assert shell.stops == []  # the ready one is kept; the one starting is one too many once it is up
    shell.now = 1.0
    shell.ready(second.worker_id)
    assert [(s.worker_id, s.reason) for s in shell.stops] == [(second.worker_id, "evicted")]
    shell.drain()
    shell.advance(1.0)
    stems = [w for w in shell.core.workers.values() if w.stem]
    assert len(stems) == 1 and stems[0].state is State.IDLE and len(shell.spawns) == 2


# -- the property ------------------------------------------------------------------------

MODELS = ("a", "b", "c")


@dataclass(frozen=True)
class Arrive:
    model: str
    wait_s: float

    def apply(self, shell: Shell) -> None:
        shell.arrive(self.model, self.wait_s)


@dataclass(frozen=True)
class Configure:
    capacity: int
    stem_cells: int

    def apply(self, shell: Shell) -> None:
        shell.configure(self.capacity, self.stem_cells)


@dataclass(frozen=True)
class Tick:
    seconds: float

    def apply(self, shell: Shell) -> None:
        shell.advance(self.seconds)


@dataclass(frozen=True)
class OnWorker:
    """An event about one of the workers in a state it can happen in (picked by index)."""

    kind: str  # ready, start_failed, release, crash, stopped
    index: int
    ok: bool = True  # for release: False, the worker failed the request

    STATES: ClassVar[dict[str, tuple[State, ...]]] = {
        "ready": (State.STARTING,),
        "start_failed": (State.STARTING,),
        "release": (State.BUSY,),
        "crash": (State.STARTING, State.IDLE, State.BUSY, State.STOPPING),
        "stopped": (State.STOPPING,),
    }

    def apply(self, shell: Shell) -> None:
        ids = shell.ids(*self.STATES[self.kind])
        if not ids:
            return
        worker_id, core, now = ids[self.index % len(ids)], shell.core, shell.now
        if self.kind == "ready":
            shell.ready(worker_id)
        elif self.kind == "start_failed":
            shell.carry_out(
                core.handle(ev.StartFailed(worker_id, now, WorkerStartError(f"worker {worker_id} exited with 1")))
            )
        elif self.kind == "release":
            shell.release(worker_id, ok=self.ok)
        elif self.kind == "crash":
            shell.carry_out(core.handle(ev.Died(worker_id, now, "exit 137")))
        else:
            shell.carry_out(core.handle(ev.Stopped(worker_id, now)))


Event = Arrive | Configure | Tick | OnWorker
ARRIVE = st.builds(Arrive, st.sampled_from(MODELS), st.floats(0.5, 20))
READY = st.builds(OnWorker, st.just("ready"), st.integers(0, 7))
EVENTS: st.SearchStrategy[Event] = st.one_of(
    ARRIVE,
    ARRIVE,  # twice as likely: a pool with work in flight when N changes is the case to find
    READY,
    READY,
    st.builds(OnWorker, st.sampled_from(("start_failed", "crash", "stopped")), st.integers(0, 7)),
    st.builds(OnWorker, st.just("release"), st.integers(0, 7), st.booleans()),
    st.builds(Configure, st.integers(1, 4), st.integers(0, 2)),
    st.builds(Tick, st.floats(0, 40)),
)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(2, 4),  # configure lowers it to 1 at times
    stem_cells=st.integers(0, 2),
    events=st.lists(EVENTS, max_size=60),
)
def test_once_nothing_is_queued_or_in_flight_the_pool_is_within_n(
    capacity: int, stem_cells: int, events: list[Event]
) -> None:
    config = CoreConfig(
        capacity=capacity, default_ttl_s=30, stem_cells=stem_cells, queue_max=8, batching={"b": (4, 0.01)}
    )
    shell = Shell(config)
    for event in events:
        event.apply(shell)
    shell.drain()
    shell.advance(0.0)
    assert shell.live() <= shell.core.config.capacity, shell.core.workers
    stems = [w for w in shell.core.workers.values() if w.stem and w.state is not State.STOPPING]
    assert len(stems) <= shell.core.config.stem_cells, shell.core.workers
