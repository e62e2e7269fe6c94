"""The live shell and the simulator drive the same core: the same arrivals, call outcomes
and settings changes give the same commands, in the same order.

The live side is a real ``WarmPool`` over a fake backend, driven through its own seams
(``arrive``, ``wait``, ``release``, ``wake``, ``reconfigure``) by ``LiveDriver``, which
orders what happens as the simulator's event heap does, in zero time: starts, stops and
finished calls run in the order the core asked for them (not depth-first, as an inline
executor would), the timer ticks just past the core's next wake-up, and a request's
deadline expires it. Calls fail
as the simulator's do (``Profile.failure_rate`` with the same seeded draws), so the
core's retries are compared too.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import random
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import pytest

from scheduler.calls import _Waiter
from scheduler.core import CoreConfig
from scheduler.errors import CapacityExhausted, WorkerCrashed
from scheduler.events import Command, Event, Fail, Grant, LoadWorker, Retry, SpawnWorker, StopWorker
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
from scheduler.sim import Profile, Simulator
from scheduler.traces import ModelProfile, Trace
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

QUEUE_S = 5.0  # every request's wait for a worker, each try


def normalise(commands: list[Command]) -> list[tuple[Any, ...]]:
    """Commands without what the two shells name differently (worker ids, their
    start-up breakdowns, the text of a simulated crash)."""
    names: dict[str, str] = {}

    def name(worker_id: str) -> str:
        return names.setdefault(worker_id, f"worker{len(names) + 1}")

    shaped: list[tuple[Any, ...]] = []
    for c in commands:
        if isinstance(c, SpawnWorker):
            shaped.append(("spawn", name(c.worker_id), c.model, tuple(name(v) for v in c.evict), c.request_id))
        elif isinstance(c, StopWorker):
            shaped.append(("stop", name(c.worker_id), c.model, c.reason, c.idle_s))
        elif isinstance(c, LoadWorker):
            shaped.append(("load", name(c.worker_id), c.model, c.request_id))
        elif isinstance(c, Grant):
            worker = name(c.worker_id)
            shaped.append(
                ("grant", c.request_id, worker, c.model, c.cold_start, c.queue_ms, c.start, c.batch, c.attempt)
            )
        elif isinstance(c, Retry):
            shaped.append(("retry", c.request_id, c.attempt, round(c.deadline, 6), type(c.error).__name__))
        elif isinstance(c, Fail):
            text = "" if isinstance(c.error, WorkerCrashed) else str(c.error)
            shaped.append(("fail", c.request_id, type(c.error).__name__, text))
    return shaped


class Slots(Executor):
    """Work submitted runs when the driver reaches it: each job fills the next slot the
    driver reserved, in order, for the command it carries out."""

    def __init__(self) -> None:
        self.reserved: collections.deque[list[Callable[[], None]]] = collections.deque()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        self.reserved.popleft().append(lambda: fn(*args, **kwargs))
        return None


class LiveDriver:
    """Runs arrivals (and settings changes) through a live pool as the simulator runs a
    trace with zero start, stop and inference times (module doc): one heap of what
    happens next, ordered by time and then by when it was scheduled, arrivals first at a
    tie, exactly as ``Simulator.run`` orders its events."""

    def __init__(self, pool: WarmPool, clock: FakeClock, slots: Slots, failure_rate: float, seed: int = 0) -> None:
        self.pool, self.clock, self.slots = pool, clock, slots
        self.failure_rate, self.rng = failure_rate, random.Random(seed)
        self.waiters: dict[int, _Waiter] = {}
        self.heap: list[tuple[float, int, str, Any]] = []  # (time, seq, kind, payload)
        self.seq = 0
        self.next_tick = math.inf
        self.commands: list[Command] = []
        pool.recorder = self.record

    def record(self, event: Event, commands: list[Command]) -> None:
        """What the simulator's ``_carry_out`` schedules, scheduled in the same order."""
        self.commands += commands
        now = self.clock.t
        for command in commands:
            if isinstance(command, Grant):
                if not command.batch or command.request_id == command.batch[0]:  # one call per batch
                    self.push(now, "done", command)
            elif isinstance(command, Retry):
                self.push(command.deadline, "expire", (command.request_id, command.attempt))
            elif isinstance(command, SpawnWorker | LoadWorker | StopWorker):
                slot: list[Callable[[], None]] = []
                self.slots.reserved.append(slot)
                self.push(now, "job", slot)

    def push(self, at: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, payload))

    def run(self, arrivals: list[tuple[float, str]], changes: list[tuple[float, Settings]]) -> None:
        for at, settings in changes:
            self.push(at, "change", settings)
        self.pool.start(background=False)
        pending = collections.deque(arrivals)
        while pending or self.heap:
            if pending and (not self.heap or pending[0][0] <= self.heap[0][0]):
                self.clock.t, model = pending.popleft()
                waiter = self.pool.arrive(model, self.clock.t + QUEUE_S)
                self.waiters[waiter.request_id] = waiter
                if not waiter.event.is_set():
                    self.push(waiter.deadline, "expire", (waiter.request_id, 1))
            else:
                self.clock.t, _, kind, payload = heapq.heappop(self.heap)
                self.step(kind, payload)
            self.schedule_tick()

    def step(self, kind: str, payload: Any) -> None:
        if kind == "job":
            (job,) = payload
            job()
        elif kind == "done":
            self.finish(payload)
        elif kind == "expire":
            self.expire(*payload)
        elif kind == "change":
            self.pool.reconfigure(payload)
        elif self.clock.t >= self.next_tick:  # a tick a later schedule did not make stale
            self.next_tick = math.inf
            self.pool.wake()

    def schedule_tick(self) -> None:
        """The timer's next tick: just past the core's next wake-up (keep-alive ends are strict)."""
        wake = self.pool.core.next_wakeup()
        if wake is None:
            return
        wake = max(wake, self.clock.t) + 1e-6
        if wake < self.next_tick:
            self.next_tick = wake
            self.push(wake, "tick", None)

    def finish(self, grant: Grant) -> None:
        """The call ``grant`` began ends: it fails as the simulator's would (same draws), or succeeds."""
        lease = self.waiters[grant.request_id].lease
        assert lease is not None and lease.worker_id == grant.worker_id
        if self.failure_rate > 0 and self.rng.random() < self.failure_rate:
            crash = WorkerCrashed(f"worker {grant.worker_id} crashed (simulated)", grant.worker_id)
            self.pool.release(lease, ok=False, reason="crashed", error=crash)
        else:
            self.pool.release(lease)

    def expire(self, request_id: int, attempt: int) -> None:
        """The request's deadline for ``attempt``: the live shell's own expiry (in ``wait``)."""
        waiter = self.waiters[request_id]
        if waiter.event.is_set() or waiter.attempt != attempt:
            return  # served, failed, or sent round again since: the simulator's core ignores it too
        with pytest.raises(CapacityExhausted):
            self.pool.wait(waiter)


def trace(arrivals: list[tuple[float, str]]) -> Trace:
    profiles = {m: ModelProfile(m, 1024.0, ((50.0, 0.0),)) for _, m in arrivals}
    return Trace(tuple(arrivals), profiles, max(t for t, _ in arrivals), "test")


SCHEDULE = [(0, "a"), (1, "b"), (2, "a"), (3, "c"), (5, "c"), (40, "b"), (41, "a"), (43, "c"), (80, "b")]
# Long enough for adaptive windows: a every 10 s, b now and then.
PERIODIC = sorted([(t, "a") for t in range(0, 250, 10)] + [(t, "b") for t in (7, 33, 95, 96, 183)])
# Bursts of a batching model (s), several at one instant while its worker serves the first.
BURSTS = sorted(
    [(t, "s") for t in (0, 0, 0, 0, 0, 20, 20, 20, 61, 61, 61, 61, 61, 61, 90)]
    + [(t, m) for t, m in ((1, "a"), (2, "b"), (21, "c"), (45, "a"), (62, "b"), (63, "c"), (91, "a"))]
)
BATCHING = {"max_batch_size": 4, "max_wait_ms": 500}


@dataclasses.dataclass(frozen=True)
class Case:
    keepalive: str
    schedule: list[tuple[int, str]]
    ttl: float
    stems: int = 0
    failure_rate: float = 0.0
    changes: tuple[tuple[float, int, float], ...] = ()  # (time, N, TTL) an operator sets


CASES = {
    "fixed": Case("fixed", SCHEDULE, 30),
    "adaptive": Case("adaptive", PERIODIC, 2),
    "stem-cells": Case("fixed", SCHEDULE, 30, stems=1),
    "adaptive-stem-cells": Case("adaptive", PERIODIC, 2, stems=1),
    "retries": Case("fixed", PERIODIC, 30, failure_rate=0.3),
    "batches": Case("fixed", BURSTS, 30),
    "batches-retries-stems": Case("fixed", BURSTS, 30, stems=1, failure_rate=0.3),
    # N lowered under a full pool (the surplus is trimmed when idle), raised again, TTL changed.
    "settings": Case("fixed", BURSTS, 30, changes=((20.75, 1, 30), (60.25, 3, 5), (85.75, 2, 60))),
    "settings-adaptive": Case("adaptive", PERIODIC, 2, stems=1, failure_rate=0.3, changes=((96.75, 1, 2),)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_same_arrivals_give_the_same_commands_live_and_simulated(tmp_path: Path, case: Case) -> None:
    for model in ("a", "b", "c"):
        make_bundle(tmp_path, model)
    make_bundle(tmp_path, "s", batching=BATCHING)
    clock, slots = FakeClock(start=0.0), Slots()
    capacity = 2

    def settings(n: int, ttl: float) -> Settings:
        return Settings(
            models_dir=tmp_path,
            max_workers=n,
            idle_ttl_s=ttl,
            queue_timeout_s=QUEUE_S,
            keepalive=case.keepalive,
            stem_cells=case.stems,
        )

    pool = WarmPool(
        FakeBackend(), ModelCatalog(tmp_path, clock=clock), settings(capacity, case.ttl), clock, GpuMonitor(()), slots
    )
    # Requests come half-way between whole seconds: their deadlines never tie with a change.
    arrivals = [(t + 0.5, m) for t, m in case.schedule]
    driver = LiveDriver(pool, clock, slots, case.failure_rate)
    driver.run(arrivals, [(at, settings(n, ttl)) for at, n, ttl in case.changes])
    pool.shutdown(grace_s=0)

    def config(n: int, ttl: float) -> CoreConfig:  # the pool's own way: the same settings, the same catalog
        return CoreConfig.from_settings(settings(n, ttl), pool.catalog.all())

    simulator = Simulator(
        trace(arrivals),
        config(capacity, case.ttl),
        Profile(spawn_ms=0, stop_ms=0, infer_ms=0, load_ms=0, failure_rate=case.failure_rate),
        queue_timeout_s=QUEUE_S,
        changes=[(at, config(n, ttl)) for at, n, ttl in case.changes],
    )
    simulator.log = []
    result = simulator.run()
    simulated = [c for _, commands in simulator.log for c in commands]

    expected = normalise(driver.commands)[: len(simulated)]  # live goes on to its shutdown
    assert normalise(simulated) == expected
    kinds = collections.Counter(c[0] for c in expected)
    served = {c[1] for c in expected if c[0] == "grant"}
    failed = {c[1] for c in expected if c[0] == "fail"}
    assert served | failed == set(range(1, len(arrivals) + 1))  # every request was answered, one way or the other
    assert kinds["stop"] >= 3 and any(c[0] == "stop" and c[3] == "ttl" for c in expected)
    if case.failure_rate:  # the core sent failed calls round again, and the simulator counted them
        assert kinds["retry"] >= 2 and result.retries == kinds["retry"]
        assert any(c[0] == "grant" and c[8] == 2 for c in expected)
    if case.schedule is BURSTS:
        assert any(c[0] == "grant" and len(c[7]) >= 2 for c in expected)  # dynamic batches formed
    if case.stems:
        assert any(c[0] == "grant" and c[6] == "stem" for c in expected)  # a stem cell served a miss
    if case.changes and case.changes[0][1] < capacity:
        assert any(c[0] == "stop" and c[3] == "evicted" for c in expected)  # the lowered N was trimmed
