"""A worker's life as a table (``scheduler.workers``), walked as h11's tests walk its
``_state.py``: every move the table lists works and keeps the indexes true, every move
it does not list is refused and changes nothing, and the real core, fed events, makes
every move in the table (and no other)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import events as ev
from scheduler.core import CoreConfig, Fail, Grant, LoadWorker, PoolCore, SpawnWorker, StopWorker
from scheduler.errors import WorkerStartError
from scheduler.workers import GONE, MARKS, MOVES, STEM, IllegalMove, State, Worker, Workers
from tests.unit.test_core_capacity import EVENTS as CORE_EVENTS
from tests.unit.test_core_capacity import Event as CoreEvent
from tests.unit.test_core_capacity import Shell

Move = tuple[State | None, State | None]

SOURCES: tuple[State | None, ...] = (GONE, *State)
TARGETS: tuple[State | None, ...] = (*State, GONE)
LEGAL: list[Move] = [(s, t) for s in SOURCES for t in TARGETS if t in MOVES[s]]
ILLEGAL: list[Move] = [(s, t) for s in SOURCES for t in TARGETS if t not in MOVES[s]]
MODELS = ("a", "b", STEM)
PATH: dict[State, tuple[State, ...]] = {  # from STARTING, the legal moves that reach each state
    State.STARTING: (),
    State.IDLE: (State.IDLE,),
    State.BUSY: (State.IDLE, State.BUSY),
    State.STOPPING: (State.STOPPING,),
}


def name(move: Move) -> str:
    return "->".join("gone" if s is None else s.value for s in move)


def key(worker: Worker) -> tuple[bool, float, str]:
    """Eviction order, written out: stem cells first, then least recently used, then id."""
    return (worker.model != STEM, worker.last_used, worker.id)


def ids(workers: Iterable[Worker]) -> list[str]:
    return [w.id for w in workers]


# -- the brute-force check -----------------------------------------------------------------


def check_indexes(workers: Workers, heap: bool = True) -> None:
    """Every index of ``workers`` against a recomputation from its values. ``heap``: also
    ask ``oldest_idle`` (which prunes the heap as it reads: off, stale entries pile up)."""
    everyone = list(workers.values())
    listed = list(workers)
    assert len(workers) == len(listed) == len(set(listed)) == len(everyone)
    for worker in everyone:
        assert worker.id in workers and workers[worker.id] is worker
    assert "nobody" not in workers and workers.get("nobody") is None
    models = {w.model for w in everyone} | set(MODELS)
    for state in State:
        members = [w for w in everyone if w.state is state]
        in_state = list(workers.in_state(state))
        assert sorted(ids(in_state)) == sorted(ids(members))
        assert all(w is workers[w.id] for w in in_state)
        for model in models:
            expected = [w for w in members if w.model == model]
            got = list(workers.of(model, state))
            assert sorted(ids(got)) == sorted(ids(expected)), (model, state)
            assert ids(got) == [w.id for w in in_state if w.model == model]  # the same order of entry
            assert workers.has(model, state) is bool(expected)
    for r in range(len(State) + 1):
        for states in itertools.combinations(State, r):
            assert workers.counting(*states) == sum(1 for w in everyone if w.state in states)
    for model in models:
        assert workers.live_of(model) is any(w.model == model and w.state is not State.STOPPING for w in everyone)
    idle = sorted((w for w in everyone if w.state is State.IDLE), key=key)
    skips = [frozenset(), *(frozenset({w.id}) for w in idle), frozenset(ids(idle[::2])), frozenset(ids(idle))]
    for skip in skips:
        rest = [w for w in idle if w.id not in skip]
        assert ids(workers.idle_lru(skip)) == ids(rest), skip
        if heap:
            oldest = workers.oldest_idle(skip)
            assert (oldest.id if oldest else None) == (rest[0].id if rest else None), skip
    assert ids(workers.idle_lru()) == ids(idle)


def observe(workers: Workers, marks: bool = True) -> object:
    """Everything a reader can see of ``workers`` (to show that a refused move changed
    nothing); ``marks``: the workers' marks too."""
    oldest = workers.oldest_idle()
    return (
        {w.id: (w.model, w.state, w.last_used, *((w.dead, w.retired) if marks else ())) for w in workers.values()},
        {(m, s): ids(workers.of(m, s)) for m in MODELS for s in State},
        {s: ids(workers.in_state(s)) for s in State},
        {(m, s): workers.has(m, s) for m in MODELS for s in State},
        {m: workers.live_of(m) for m in MODELS},
        ids(workers.idle_lru()),
        oldest.id if oldest else None,
        len(workers),
    )


# -- building workers with the table's own moves -----------------------------------------


def put(workers: Workers, worker_id: str, state: State, model: str = "a", at: float = 0.0) -> Worker:
    """A worker added and moved into ``state`` by legal moves, checking after each one."""
    worker = Worker(worker_id, model, State.STARTING, at, at)
    workers.add(worker)
    check_indexes(workers)
    for step in PATH[state]:
        workers.move(worker, step, at=at)
        check_indexes(workers)
    return worker


def crowd() -> Workers:
    """A table with a worker in every state beside the one under test, so that each
    index has something to get wrong."""
    workers = Workers()
    put(workers, "s1", State.IDLE, STEM, at=3.0)
    put(workers, "a1", State.IDLE, "a", at=1.0)
    put(workers, "b1", State.IDLE, "b", at=2.0)
    put(workers, "a2", State.BUSY, "a")
    put(workers, "b2", State.STARTING, "b")
    put(workers, "a3", State.STOPPING, "a")
    return workers


# -- 1. every move in the table ----------------------------------------------------------


def test_the_table_has_a_row_for_every_state_and_for_a_new_worker() -> None:
    assert set(MOVES) == set(SOURCES)
    assert all(set(row) <= set(TARGETS) for row in MOVES.values())
    assert set(MARKS) == {"dead", "retired"}


@pytest.mark.parametrize("move", LEGAL, ids=[name(m) for m in LEGAL])
def test_every_move_in_the_table_works_and_keeps_the_indexes_true(move: Move) -> None:
    source, to = move
    workers = crowd()
    before = len(workers)
    if source is GONE:
        worker = Worker("w", "a", State.STARTING, 5.0, 5.0)
        workers.add(worker)
    else:
        worker = put(workers, "w", source, at=4.0)
        workers.move(worker, to, at=5.0)
    check_indexes(workers)
    if to is GONE:
        assert "w" not in workers and len(workers) == before
        return
    assert workers["w"] is worker and worker.state is to and worker.last_used == 5.0
    assert len(workers) == before + 1
    assert ids(workers.of("a", to))[-1] == "w"  # it entered last


def test_a_move_without_a_time_keeps_the_last_use() -> None:
    workers = Workers()
    worker = put(workers, "w", State.IDLE, at=2.0)
    workers.move(worker, State.BUSY)
    assert worker.last_used == 2.0
    check_indexes(workers)


# -- 2. every move not in the table ------------------------------------------------------


@pytest.mark.parametrize("move", ILLEGAL, ids=[name(m) for m in ILLEGAL])
def test_every_move_not_in_the_table_is_refused_and_changes_nothing(move: Move) -> None:
    source, to = move
    workers = crowd()
    if source is GONE:  # a new worker that would arrive in any state but STARTING
        worker = Worker("w", "a", cast(State, to), 5.0, 5.0)
        before = observe(workers)
        with pytest.raises(IllegalMove, match="cannot go from gone to"):
            workers.add(worker)
        assert "w" not in workers
    else:
        worker = put(workers, "w", source, at=4.0)
        before = observe(workers)
        with pytest.raises(IllegalMove, match=f"worker w \\(a\\) cannot go from {source.value} to"):
            workers.move(worker, to, at=9.0)
        assert worker.state is source and worker.last_used == 4.0
    assert observe(workers) == before
    check_indexes(workers)


# -- 3. marks ----------------------------------------------------------------------------

MARKINGS = [(mark, state) for mark in sorted(MARKS) for state in State]


@pytest.mark.parametrize(("mark", "state"), MARKINGS, ids=[f"{m}-{s.value}" for m, s in MARKINGS])
def test_a_mark_is_set_only_in_the_states_the_table_allows(mark: str, state: State) -> None:
    workers = crowd()
    worker = put(workers, "w", state)
    value: str | bool = "exit 137" if mark == "dead" else True
    allowed = state in MARKS[mark]
    before = observe(workers, marks=not allowed)
    if allowed:
        workers.mark(worker, mark, value)
        assert getattr(worker, mark) == value
    else:
        with pytest.raises(IllegalMove, match=f"cannot be marked {mark} while {state.value}"):
            workers.mark(worker, mark, value)
        assert worker.dead is None and worker.retired is False
    assert worker.state is state
    assert observe(workers, marks=not allowed) == before  # the mark is the only change
    check_indexes(workers)


# -- 4. eviction order -------------------------------------------------------------------


def test_stem_cells_go_first_then_the_least_recently_used_then_by_id() -> None:
    workers = Workers()
    put(workers, "c", State.IDLE, "a", at=1.0)
    put(workers, "b", State.IDLE, "b", at=1.0)  # the same time as c: b by id
    put(workers, "s2", State.IDLE, STEM, at=9.0)
    put(workers, "s1", State.IDLE, STEM, at=9.0)
    put(workers, "a", State.IDLE, "a", at=0.5)
    put(workers, "x", State.BUSY, "a", at=0.0)  # busy: never evicted
    assert ids(workers.idle_lru()) == ["s1", "s2", "a", "b", "c"]
    assert ids(workers.idle_lru(frozenset({"s1", "a"}))) == ["s2", "b", "c"]
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "s1"
    assert (oldest := workers.oldest_idle(frozenset({"s1", "s2"}))) is not None and oldest.id == "a"
    assert workers.oldest_idle(frozenset({"s1", "s2", "a", "b", "c"})) is None


def test_a_worker_reused_since_it_went_idle_is_not_taken_for_its_old_place() -> None:
    workers = Workers()
    a = put(workers, "a", State.IDLE, at=1.0)
    put(workers, "b", State.IDLE, at=2.0)
    workers.move(a, State.BUSY)
    check_indexes(workers, heap=False)  # the stale entry stays on top of the heap
    workers.move(a, State.IDLE, at=3.0)
    assert ids(workers.idle_lru()) == ["b", "a"]
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "b"
    check_indexes(workers)


def test_a_worker_idle_twice_at_the_same_time_leaves_no_entry_once_busy() -> None:
    workers = Workers()
    a = put(workers, "a", State.IDLE, at=1.0)
    workers.move(a, State.BUSY)
    workers.move(a, State.IDLE, at=1.0)  # two heap entries for the same place
    workers.move(a, State.BUSY)
    assert workers.oldest_idle() is None and workers.idle_lru() == []
    check_indexes(workers)


@pytest.mark.parametrize(
    "via", [(GONE,), (State.STOPPING,), (State.STOPPING, GONE)], ids=["evicted", "stopping", "stopped"]
)
def test_a_dropped_or_stopping_worker_never_comes_back(via: tuple[State | None, ...]) -> None:
    workers = Workers()
    a = put(workers, "a", State.IDLE, at=1.0)
    put(workers, "b", State.IDLE, at=2.0)
    for to in via:
        workers.move(a, to)
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "b"
    assert ids(workers.idle_lru()) == ["b"]
    check_indexes(workers)


def test_a_stem_cell_renamed_while_idle_loses_its_place_at_the_front() -> None:
    workers = Workers()
    put(workers, "a", State.IDLE, "a", at=1.0)
    s = put(workers, "s", State.IDLE, STEM, at=5.0)
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "s"
    workers.rename(s, "b")  # still idle: now an ordinary worker, last used at 5
    check_indexes(workers, heap=False)
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "a"
    assert ids(workers.idle_lru()) == ["a", "s"]
    workers.move(s, State.STARTING, at=6.0)  # as the core adopts it
    assert ids(workers.idle_lru()) == ["a"] and not workers.has(STEM, State.IDLE)
    check_indexes(workers)


def test_a_worker_renamed_to_a_stem_cell_goes_to_the_front() -> None:
    workers = Workers()
    put(workers, "a", State.IDLE, "a", at=1.0)
    b = put(workers, "b", State.IDLE, "b", at=5.0)
    workers.rename(b, STEM)
    assert (oldest := workers.oldest_idle()) is not None and oldest.id == "b"
    check_indexes(workers)


# The property: random sequences of moves (and refused ones), checked after every step.

KINDS = ("add", "add", "move", "move", "move", "serve", "adopt", "rename", "illegal", "mark", "query")
STEPS = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(0, 31),  # which worker (or model, for add)
        st.integers(0, 31),  # which target, model, mark or skip set
        st.sampled_from((0.0, 0.0, 0.5, 1.0)),  # time passing: often none, for ties
        st.booleans(),  # a move with a time (else the last use stays)
        st.booleans(),  # ask oldest_idle after the step (it prunes the heap: else stale entries pile up)
    ),
    max_size=50,
)
Step = tuple[str, int, int, float, bool, bool]


class Recount:
    """Random steps on a ``Workers`` table, with the order each worker last entered its
    (model, state) kept aside to check ``of``'s order."""

    def __init__(self) -> None:
        self.workers = Workers()
        self.entered: dict[str, int] = {}
        self.clock, self.numbers = 0.0, itertools.count()

    def step(self, kind: str, i: int, j: int, timed: bool) -> None:
        workers, present = self.workers, sorted(self.workers)
        worker = workers[present[i % len(present)]] if present else None
        at = self.clock if timed else None
        if kind == "add" or worker is None:
            kind = "add"
            worker = Worker(f"w{next(self.numbers):02d}", MODELS[i % len(MODELS)], State.STARTING, self.clock, 0.0)
            workers.add(worker)
        elif kind == "move":
            targets = sorted(MOVES[worker.state], key=lambda s: "gone" if s is None else s.value)
            workers.move(worker, targets[j % len(targets)], at=at)
        elif kind == "serve":  # reused, then idle again
            if worker.state is not State.IDLE:
                return
            workers.move(worker, State.BUSY)
            workers.move(worker, State.IDLE, at=at)
        elif kind in ("adopt", "rename"):  # a model for it; adopt: then load it, as the core does
            workers.rename(worker, MODELS[j % len(MODELS)])
            if kind == "adopt" and worker.state is State.IDLE:
                workers.move(worker, State.STARTING, at=at)
        elif kind == "illegal":
            refused = [t for t in TARGETS if t not in MOVES[worker.state]]
            before = observe(workers)
            with pytest.raises(IllegalMove):
                workers.move(worker, refused[j % len(refused)], at=self.clock)
            assert observe(workers) == before
        elif kind == "mark":
            mark = sorted(MARKS)[j % len(MARKS)]
            if worker.state in MARKS[mark]:
                workers.mark(worker, mark, True)
            else:
                with pytest.raises(IllegalMove):
                    workers.mark(worker, mark, True)
        elif kind == "query":
            idle = sorted((w for w in workers.values() if w.state is State.IDLE), key=key)
            skip = frozenset(w.id for n, w in enumerate(idle) if j >> n & 1)
            rest = [w for w in idle if w.id not in skip]
            assert workers.oldest_idle(skip) is (rest[0] if rest else None)
            assert ids(workers.idle_lru(skip)) == ids(rest)
        if kind in ("add", "move", "serve", "adopt", "rename") and worker.id in workers:
            self.entered[worker.id] = next(self.numbers)  # it entered a (model, state) last

    def check_order(self) -> None:
        for model in MODELS:
            for state in State:
                these = (w.id for w in self.workers.values() if (w.model, w.state) == (model, state))
                assert ids(self.workers.of(model, state)) == sorted(these, key=self.entered.__getitem__)


@settings(max_examples=300, deadline=None)
@given(steps=STEPS)
def test_random_moves_keep_every_index_equal_to_a_recount(steps: list[Step]) -> None:
    run = Recount()
    for kind, i, j, dt, timed, probe in steps:
        run.clock += dt
        run.step(kind, i, j, timed)
        check_indexes(run.workers, heap=probe)
        run.check_order()


# -- 5. the real core makes every move ---------------------------------------------------

CONFIG = CoreConfig(capacity=2, default_ttl_s=30, queue_max=8)


class Run:
    """A core whose workers record each move (from, to) and are checked after each event."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, digests: dict[str, str] | None = None, **changes: object
    ) -> None:
        self.core = PoolCore(replace(CONFIG, **changes), id_prefix="w", digests=digests)  # type: ignore[arg-type]
        self.moves: list[Move] = []
        workers = self.core.workers
        move, add = workers.move, workers.add

        def recording_move(worker: Worker, to: State | None, at: float | None = None) -> None:
            self.moves.append((worker.state, to))
            move(worker, to, at)

        def recording_add(worker: Worker) -> None:
            self.moves.append((GONE, worker.state))
            add(worker)

        monkeypatch.setattr(workers, "move", recording_move)
        monkeypatch.setattr(workers, "add", recording_add)

    def on(self, event: ev.Event) -> list[ev.Command]:
        commands = self.core.handle(event)
        check_indexes(self.core.workers)
        return commands

    def serve(self, request_id: int, model: str, now: float) -> str:
        """A request that starts a worker and gets it (busy); returns the worker id."""
        (spawn,) = self.on(ev.Arrive(request_id, model, now, now + 10))
        assert isinstance(spawn, SpawnWorker)
        (grant,) = self.on(ev.Ready(spawn.worker_id, now, 100.0))
        assert isinstance(grant, Grant) and grant.worker_id == spawn.worker_id
        return spawn.worker_id

    def state(self, worker_id: str) -> State | None:
        worker = self.core.workers.get(worker_id)
        return None if worker is None else worker.state


def spawn_ready_grant_release(run: Run) -> None:
    w = run.serve(1, "a", 0.0)
    assert run.on(ev.Released(w, 1.0)) == [] and run.state(w) is State.IDLE
    (grant,) = run.on(ev.Arrive(2, "a", 2.0, 12.0))  # warm
    assert isinstance(grant, Grant) and grant.worker_id == w and run.state(w) is State.BUSY


def release_failed_then_stopped(run: Run) -> None:
    w = run.serve(1, "a", 0.0)
    stop, retry, spawn = run.on(ev.Released(w, 1.0, ok=False, reason="crashed"))
    assert stop == StopWorker(w, "a", "crashed") and isinstance(retry, ev.Retry) and isinstance(spawn, SpawnWorker)
    assert run.on(ev.Stopped(w, 2.0)) == [] and run.state(w) is None


def adopt_a_stem_cell(run: Run) -> None:
    (stem,) = run.on(ev.Tick(0.0))
    assert isinstance(stem, SpawnWorker) and stem.model == STEM
    run.on(ev.Ready(stem.worker_id, 1.0, 100.0))
    load, refill = run.on(ev.Arrive(1, "a", 2.0, 12.0))
    assert load == LoadWorker(stem.worker_id, "a", 1) and isinstance(refill, SpawnWorker)
    assert run.state(stem.worker_id) is State.STARTING
    (grant,) = run.on(ev.Ready(stem.worker_id, 3.0, 50.0))
    assert isinstance(grant, Grant) and grant.start == "stem"


def a_stem_load_fails(run: Run) -> None:
    (stem,) = run.on(ev.Tick(0.0))
    assert isinstance(stem, SpawnWorker)
    run.on(ev.Ready(stem.worker_id, 1.0, 100.0))
    run.on(ev.Arrive(1, "a", 2.0, 12.0))
    stop, container = run.on(ev.StartFailed(stem.worker_id, 3.0, WorkerStartError("no such model")))
    assert stop == StopWorker(stem.worker_id, "a", "load_failed") and run.state(stem.worker_id) is State.STOPPING
    assert isinstance(container, SpawnWorker) and (container.model, container.request_id) == ("a", 1)


def evicted_for_a_spawn_on_a_full_pool(run: Run) -> None:
    a = run.serve(1, "a", 0.0)
    run.on(ev.Released(a, 1.0))
    (spawn,) = run.on(ev.Arrive(2, "b", 2.0, 12.0))
    assert isinstance(spawn, SpawnWorker) and spawn.evict == (a,) and run.state(a) is None


def reaped_by_ttl(run: Run) -> None:
    a = run.serve(1, "a", 0.0)
    run.on(ev.Released(a, 0.0))
    assert run.on(ev.Tick(29.0)) == []
    assert run.on(ev.Tick(31.0)) == [StopWorker(a, "a", "ttl", 31.0)] and run.state(a) is State.STOPPING


def a_container_fails_to_start(run: Run) -> None:
    (spawn,) = run.on(ev.Arrive(1, "a", 0.0, 10.0))
    assert isinstance(spawn, SpawnWorker)
    (fail,) = run.on(ev.StartFailed(spawn.worker_id, 1.0, WorkerStartError("exit 1")))
    assert isinstance(fail, Fail) and run.state(spawn.worker_id) is None


def retired_by_new_digests(run: Run) -> None:
    busy = run.serve(1, "a", 0.0)
    (starting,) = run.on(ev.Arrive(2, "a", 1.0, 30.0))
    assert isinstance(starting, SpawnWorker)
    assert run.on(ev.Configure(run.core.config, 2.0, digests={"a": "2"})) == []
    assert run.core.workers[busy].retired and run.core.workers[starting.worker_id].retired
    assert run.on(ev.Ready(starting.worker_id, 3.0, 100.0)) == [StopWorker(starting.worker_id, "a", "replaced")]
    assert run.on(ev.Released(busy, 4.0)) == [StopWorker(busy, "a", "replaced")]
    assert run.state(busy) is State.STOPPING and run.state(starting.worker_id) is State.STOPPING


def retired_while_idle(run: Run) -> None:
    a = run.serve(1, "a", 0.0)
    run.on(ev.Released(a, 1.0))
    assert run.on(ev.Retire("a", 2.0)) == [StopWorker(a, "a", "replaced", 1.0)]


def shut_down_while_starting(run: Run) -> None:
    (spawn,) = run.on(ev.Arrive(1, "a", 0.0, 10.0))
    assert isinstance(spawn, SpawnWorker)
    assert run.on(ev.Close(1.0)) == []  # its start is under way: it waits for the grace period
    stop, fail = run.on(ev.StopAll(2.0))
    assert stop == StopWorker(spawn.worker_id, "a", "shutdown") and isinstance(fail, Fail)
    late = run.on(ev.Ready(spawn.worker_id, 3.0, 100.0))  # it came up after all: stopped again
    assert late == [StopWorker(spawn.worker_id, "a", "shutdown")] and run.state(spawn.worker_id) is State.STOPPING
    assert run.on(ev.Stopped(spawn.worker_id, 4.0)) == [] and run.state(spawn.worker_id) is None
    assert run.on(ev.Stopped(spawn.worker_id, 5.0)) == []  # the second stop's report


Scenario = Callable[[Run], None]
SCENARIOS: list[tuple[Scenario, dict[str, object], set[Move]]] = [
    (
        spawn_ready_grant_release,
        {},
        {(GONE, State.STARTING), (State.STARTING, State.IDLE), (State.IDLE, State.BUSY), (State.BUSY, State.IDLE)},
    ),
    (release_failed_then_stopped, {}, {(State.BUSY, State.STOPPING), (State.STOPPING, GONE)}),
    (adopt_a_stem_cell, {"stem_cells": 1}, {(State.IDLE, State.STARTING)}),
    (a_stem_load_fails, {"capacity": 3, "stem_cells": 1}, {(State.STARTING, State.STOPPING)}),
    (evicted_for_a_spawn_on_a_full_pool, {"capacity": 1}, {(State.IDLE, GONE)}),
    (reaped_by_ttl, {}, {(State.IDLE, State.STOPPING)}),
    (a_container_fails_to_start, {}, {(State.STARTING, GONE)}),
    (retired_by_new_digests, {"digests": {"a": "1"}}, {(State.STARTING, State.STOPPING), (State.BUSY, State.STOPPING)}),
    (retired_while_idle, {}, {(State.IDLE, State.STOPPING)}),
    (
        shut_down_while_starting,
        {},
        {(State.STARTING, State.STOPPING), (State.STOPPING, State.STOPPING), (State.STOPPING, GONE)},
    ),
]


def run_scenario(monkeypatch: pytest.MonkeyPatch, scenario: Scenario, changes: dict[str, object]) -> Run:
    changes = dict(changes)
    digests = cast("dict[str, str] | None", changes.pop("digests", None))
    run = Run(monkeypatch, digests, **changes)
    scenario(run)
    return run


@pytest.mark.parametrize(("scenario", "changes", "reaches"), SCENARIOS, ids=[s.__name__ for s, _, _ in SCENARIOS])
def test_each_scenario_makes_its_moves_through_the_core(
    monkeypatch: pytest.MonkeyPatch, scenario: Scenario, changes: dict[str, object], reaches: set[Move]
) -> None:
    run = run_scenario(monkeypatch, scenario, changes)
    assert reaches <= set(run.moves), sorted(map(name, set(run.moves)))
    assert set(run.moves) <= set(LEGAL)


def test_the_core_makes_every_move_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    made: set[Move] = set()
    for scenario, changes, _ in SCENARIOS:
        made |= set(run_scenario(monkeypatch, scenario, changes).moves)
    assert sorted(map(name, made)) == sorted(map(name, LEGAL))


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 3), stem_cells=st.integers(0, 2), events=st.lists(CORE_EVENTS, max_size=40))
def test_the_core_keeps_the_indexes_true_through_random_events(
    capacity: int, stem_cells: int, events: list[CoreEvent]
) -> None:
    """test_core_capacity's random events, with the indexes recounted after each one."""
    shell = Shell(CoreConfig(capacity=capacity, default_ttl_s=30, stem_cells=stem_cells, queue_max=8))
    core, handle = shell.core, shell.core.handle

    def checked(event: ev.Event) -> list[ev.Command]:
        commands = handle(event)
        check_indexes(core.workers, heap=len(core.workers) % 2 == 0)
        return commands

    core.handle = checked  # type: ignore[method-assign]
    for event in events:
        event.apply(shell)
    shell.drain()
    check_indexes(core.workers)


# -- found while walking the table -------------------------------------------------------


def test_the_idle_heap_does_not_grow_with_the_requests_a_pool_with_room_serves() -> None:
    """``Workers._lru`` gains an entry each time a worker goes idle and is pruned only by
    ``oldest_idle``, which the core asks only when the pool is full: a pool with room
    keeps one entry per request it ever served."""
    core = PoolCore(CONFIG, id_prefix="w")
    (spawn,) = core.handle(ev.Arrive(0, "a", 0.0, 10.0))
    assert isinstance(spawn, SpawnWorker)
    core.handle(ev.Ready(spawn.worker_id, 0.0, 100.0))
    core.handle(ev.Released(spawn.worker_id, 0.0))
    for request_id in range(1, 1001):
        now = float(request_id)
        (grant,) = core.handle(ev.Arrive(request_id, "a", now, now + 10))
        assert isinstance(grant, Grant) and not grant.cold_start
        core.handle(ev.Released(spawn.worker_id, now))
        core.handle(ev.Tick(now))
    assert len(core.workers) == 1
    # Rebuilt once mostly stale (more than twice the idle workers and 64): bounded, not one per request.
    assert len(core.workers._lru) <= 2 * len(core.workers) + 65, "one heap entry per request served"
    assert len(core._expiry) <= 2 * len(core.workers) + 65, "one keep-alive entry per request served"


def test_a_second_worker_with_the_same_id_is_refused() -> None:
    """The core's ids come from a counter, so it never does this; were it to, the first
    worker's index entries would stay behind and ``idle_lru`` would hand out a worker
    the mapping no longer holds: ``add`` refuses it and changes nothing."""
    workers = Workers()
    put(workers, "x", State.IDLE, "a")
    with pytest.raises(IllegalMove, match="already"):
        workers.add(Worker("x", "b", State.STARTING, 1.0, 1.0))
    check_indexes(workers)
    assert workers["x"].model == "a"
