"""The trace simulator: the pool core driven in virtual time.

The same ``PoolCore`` the live pool runs gets the same events, in an order an event
heap gives them: requests from a trace arrive, spawns take the profile's start-up time,
inferences the profile's inference time (or, without one, the trace's own durations),
stops the profile's stop time. Nothing sleeps, so a day of traffic replays in seconds.
Profiles live in ``scheduler.profiles`` (re-exported here): ``GENERAL_PROFILE`` is the
default model as measured; ``bundle_profile`` makes one from a bundle's own check.

    result = simulate(trace, CoreConfig(capacity=4, default_ttl_s=60), GENERAL_PROFILE)
    result.metrics()   # cold_rate, reject_rate, p50_ms, p99_ms, idle_worker_s, idle_gb_h

What it counts: a request is cold when it waited for a worker started for it; its
latency is queueing + start-up + inference. Idle cost is the time workers sit idle
(and pre-warmed workers spend starting) times their model's memory; the simulation
runs past the trace's end until the last worker is reaped, so a long TTL pays for the
tail it keeps.

GPUs (``Profile.gpus``, device -> total MB) are optional: with them the core places
workers by memory, from readings the simulator computes out of the workers it runs
(each holds its model's memory), and a model in ``CoreConfig.cpu_fallback`` that no
GPU has room for gets a CPU worker; its inferences take ``Profile.cpu_slowdown`` times
as long and hold no GPU memory (``fallback_serves`` counts the requests they served).
Without GPUs nothing is placed and nothing falls back, as on a CPU pool.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import heapq
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, assert_never

from .core import CoreConfig, PoolCore
from .errors import WorkerCrashed
from .events import (
    Arrive,
    Command,
    Configure,
    Event,
    Expire,
    Fail,
    Grant,
    LoadWorker,
    Ready,
    Released,
    RemoveStray,
    Retry,
    SpawnWorker,
    Stopped,
    StopWorker,
    Tick,
)
from .policy import STEM, GpuReading, State

# The profile moved to scheduler.profiles; its names are importable from here as before.
from .profiles import GENERAL_PROFILE as GENERAL_PROFILE
from .profiles import Profile as Profile
from .profiles import bundle_profile as bundle_profile
from .profiles import load_bundle_profile as load_bundle_profile
from .profiles import resolve_profile as resolve_profile
from .traces import Trace
from .tuning import Point

_READY, _DONE, _STOPPED, _EXPIRE, _TICK, _CONFIGURE = range(6)


@dataclass
class SimResult:
    requests: int = 0
    served: int = 0
    cold_starts: int = 0
    stem_starts: int = 0  # cold starts a stem cell served
    fallback_serves: int = 0  # requests served by CPU fallback workers
    rejected: int = 0
    retries: int = 0  # requests a failed call sent round to another worker
    failed: int = 0  # requests that failed on a worker every try
    prewarms: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    idle_worker_s: float = 0.0
    idle_mb_s: float = 0.0
    peak_workers: int = 0
    wall_s: float = 0.0
    events: int = 0

    def metrics(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "cold_starts": self.cold_starts,
            "stem_starts": self.stem_starts,
            "fallback_serves": self.fallback_serves,
            "fallback_rate": self.fallback_serves / self.requests if self.requests else 0.0,
            "cold_rate": self.cold_starts / self.requests if self.requests else 0.0,
            "reject_rate": self.rejected / self.requests if self.requests else 0.0,
            "retries": self.retries,
            "failure_rate": self.failed / self.requests if self.requests else 0.0,
            "p50_ms": percentile(ordered, 0.50),
            "p99_ms": percentile(ordered, 0.99),
            "idle_worker_s": self.idle_worker_s,
            "idle_gb_h": self.idle_mb_s / 1024 / 3600,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Simulator:
    """One run of ``trace`` through a ``PoolCore`` (module doc). ``tick_s``: ticks come
    only on multiples of it (keep-alive ends are noticed at the next one); None: at
    once, as the live pool's timer ticks. ``changes``: settings an operator changes
    during the run, as (time, config) pairs (``wanwu pool set`` on the live pool)."""

    def __init__(
        self,
        trace: Trace,
        config: CoreConfig,
        profile: Profile,
        queue_timeout_s: float = 10.0,
        tick_s: float | None = None,
        seed: int = 0,
        changes: Sequence[tuple[float, CoreConfig]] = (),
    ) -> None:
        self.trace, self.profile = trace, profile
        config = replace(config, tick_s=tick_s or 0.0)
        if profile.gpus:  # placement needs every model's memory: the trace's, unless the config says
            known = {m: self._memory_mb(m) for m in (*trace.profiles, STEM)}
            config = replace(config, estimates_mb={**known, **config.estimates_mb})
        self.core = PoolCore(config, id_prefix="sim")
        self.queue_timeout_s = queue_timeout_s
        self.tick_s = tick_s
        self._rng = random.Random(seed)
        self._heap: list[tuple[float, int, int, Any]] = []
        # Deadlines, in the order they come due: every request waits the same queue_timeout_s
        # from when it (re)enters the queue, so they are pushed in time order and need no heap.
        self._deadlines: collections.deque[tuple[float, int, int, Any]] = collections.deque()
        self._seq = 0
        self._arrived: dict[int, float] = {}
        self._idle_since: dict[str, tuple[float, str]] = {}  # worker -> (idle since, model)
        self._call_ms: dict[str, float] = {}  # worker -> how long its current call takes
        self._calls: dict[str, tuple[int, ...]] = {}  # worker -> the requests its current call carries
        self._latency: dict[int, float] = {}  # request -> its latency, once its call succeeds
        self._cpu: set[str] = set()  # CPU fallback workers (no GPU memory, slower inference)
        self._next_tick = math.inf
        self.result = SimResult()
        for at, change in changes:
            estimates = {**config.estimates_mb, **change.estimates_mb}
            self._push(at, _CONFIGURE, replace(change, tick_s=config.tick_s, estimates_mb=estimates))
        self.log: list[tuple[Event, list[Command]]] | None = None  # (event, commands) if kept

    def run(self) -> SimResult:
        # The cyclic collector would walk every live record (more, the more models the
        # pool holds) again and again; a run makes no cycles, so it is off for the run.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> SimResult:
        started = time.perf_counter()
        arrivals = self.trace.arrivals
        heap, deadlines, result = self._heap, self._deadlines, self.result
        i, now = 0, 0.0
        self._carry_out(self._feed(Tick(now)), now)  # as the live pool's start: stem cells begin
        while i < len(arrivals) or heap or deadlines:
            # The next event: the heap's or the first deadline's, whichever comes first (then was pushed first).
            nxt = deadlines[0] if deadlines and (not heap or deadlines[0] < heap[0]) else heap[0] if heap else None
            if i < len(arrivals) and (nxt is None or arrivals[i][0] <= nxt[0]):
                now, model = arrivals[i]
                i += 1
                request_id = result.requests = i
                self._arrived[request_id] = now
                deadline = now + self.queue_timeout_s
                commands = self._feed(Arrive(request_id, model, now, deadline))
                if not any(isinstance(c, Grant | Fail) and c.request_id == request_id for c in commands):
                    self._push(deadline, _EXPIRE, (request_id, 1))  # still waiting: it may time out
            else:
                now, _, kind, payload = (
                    deadlines.popleft() if deadlines and nxt is deadlines[0] else heapq.heappop(heap)
                )
                commands = self._event(kind, payload, now)
            self._carry_out(commands, now)
            self._schedule_tick(now)
            result.events += 1
        for worker_id, (since, model) in self._idle_since.items():  # workers kept for ever (an infinite keep-alive)
            self._add_idle(model, since, now, worker_id in self._cpu)
        result.wall_s = time.perf_counter() - started
        return result

    # -- events ----------------------------------------------------------------------

    def _event(self, kind: int, payload: Any, now: float) -> list[Command]:
        if kind == _TICK:
            if now < self._next_tick:
                return []  # a tick that a later schedule made stale
            self._next_tick = math.inf
            return self._feed(Tick(now))
        if kind == _READY:
            worker_id, spawn_ms = payload
            return self._feed(Ready(worker_id, now, spawn_ms))
        if kind == _DONE:
            return self._done(payload, now)
        if kind == _CONFIGURE:
            return self._feed(Configure(payload, now))
        if kind == _STOPPED:
            self._cpu.discard(payload)
            self._call_ms.pop(payload, None)
            return self._feed(Stopped(payload, now))
        request_id, attempt = payload
        if request_id in self._latency or request_id not in self._arrived:
            return []  # granted or failed since: as the live shell, which only expires a request still waiting
        return self._feed(Expire(request_id, now, attempt))

    def _done(self, worker_id: str, now: float) -> list[Command]:
        """A worker call ends: it succeeds, or (``failure_rate``) its worker crashes on it."""
        requests = self._calls.pop(worker_id, ())
        rate = self.profile.failure_rate
        if rate > 0 and self._rng.random() < rate:
            error = WorkerCrashed(f"worker {worker_id} crashed (simulated)", worker_id)
            for request_id in requests:
                self._latency.pop(request_id, None)
            return self._feed(Released(worker_id, now, ok=False, reason="crashed", error=error))
        for request_id in requests:
            self.result.latencies_ms.append(self._latency.pop(request_id))
            self.result.served += 1
            self._arrived.pop(request_id, None)
        return self._feed(Released(worker_id, now))

    def _feed(self, event: Event) -> list[Command]:
        if self.profile.gpus:
            self.core.readings = self._readings()
        commands = self.core.handle(event)
        if self.log is not None:
            self.log.append((event, commands))
        if isinstance(event, (Released, Ready)):
            worker = self.core.workers.get(event.worker_id)
            if worker is not None and worker.state is State.IDLE and event.worker_id not in self._idle_since:
                self._idle_since[event.worker_id] = (event.now, worker.model)
        return commands

    def _carry_out(self, commands: list[Command], now: float) -> None:
        result, profile = self.result, self.profile
        for command in commands:
            if isinstance(command, Grant):
                arrived = self._arrived[command.request_id]
                if not command.batch or command.request_id == command.batch[0]:
                    # One worker call per batch; it lasts as long as its slowest member would alone.
                    self._busy(command.worker_id, now)
                    infer_ms = max(self._infer_ms(command.model) for _ in command.batch or (None,))
                    if command.cpu_fallback:
                        infer_ms *= profile.cpu_slowdown
                    self._call_ms[command.worker_id] = infer_ms
                    self._calls[command.worker_id] = command.batch or (command.request_id,)
                    self._push(now + infer_ms / 1000, _DONE, command.worker_id)
                result.cold_starts += command.cold_start
                result.stem_starts += command.start == "stem"
                result.fallback_serves += command.cpu_fallback
                self._latency[command.request_id] = (now - arrived) * 1000 + self._call_ms[command.worker_id]
            elif isinstance(command, Retry):
                result.retries += 1
                self._push(command.deadline, _EXPIRE, (command.request_id, command.attempt))
            elif isinstance(command, Fail):
                self._arrived.pop(command.request_id, None)
                if isinstance(command.error, WorkerCrashed):
                    result.failed += 1
                else:
                    result.rejected += 1
            elif isinstance(command, SpawnWorker):
                for victim in command.evict:
                    self._busy(victim, now)
                if command.cpu_fallback:
                    self._cpu.add(command.worker_id)
                if command.request_id is None:
                    result.prewarms += command.model != STEM
                    self._idle_since[command.worker_id] = (now, command.model)  # a guess holds memory while it starts
                spawn_s = profile.spawn_s(command.model)
                ready_at = now + len(command.evict) * profile.stop_ms / 1000 + spawn_s
                self._push(ready_at, _READY, (command.worker_id, spawn_s * 1000))
                result.peak_workers = max(result.peak_workers, len(self.core.workers))
            elif isinstance(command, LoadWorker):
                self._busy(command.worker_id, now)  # the stem cell stops waiting
                if command.request_id is None:
                    result.prewarms += 1
                    self._idle_since[command.worker_id] = (now, command.model)
                self._push(now + profile.load_ms / 1000, _READY, (command.worker_id, profile.load_ms))
            elif isinstance(command, StopWorker):
                self._busy(command.worker_id, now)
                self._push(now + profile.stop_ms / 1000, _STOPPED, command.worker_id)
            elif isinstance(command, RemoveStray):
                pass  # a simulated engine never loses a container
            else:
                assert_never(command)

    def _infer_ms(self, model: str) -> float:
        if self.profile.infer_ms is not None:
            return self.profile.infer_ms
        return self.trace.profiles[model].sample_ms(self._rng.random())

    def _busy(self, worker_id: str, now: float) -> None:
        """``worker_id`` stops being idle (taken, stopped or evicted)."""
        idle = self._idle_since.pop(worker_id, None)
        if idle is not None:
            self._add_idle(idle[1], idle[0], now, worker_id in self._cpu)

    def _add_idle(self, model: str, since: float, now: float, cpu: bool = False) -> None:
        """``model``'s worker was idle from ``since`` to ``now``; a CPU one holds no GPU memory."""
        seconds = max(0.0, now - since)
        self.result.idle_worker_s += seconds
        if not cpu:
            self.result.idle_mb_s += seconds * self._memory_mb(model)

    def _memory_mb(self, model: str) -> float:
        """The GPU memory a worker of ``model`` holds: the profile's, else the trace's."""
        memory = self.profile.stem_memory_mb if model == STEM else self.profile.memory_mb
        if memory is None:
            known = self.trace.profiles.get(model)
            memory = known.memory_mb if known is not None else 0.0
        return memory

    def _readings(self) -> list[GpuReading]:
        """What NVML would read now: the memory of the workers on each GPU. A starting
        worker's model is left out (the core adds it to the reading itself); a stem
        cell loading a model keeps its own part."""
        used = dict.fromkeys(self.profile.gpus, 0.0)
        estimates = self.core.config.estimates_mb
        for worker in self.core.workers.values():
            if worker.device in used:
                loading = estimates.get(worker.model, 0.0) if worker.state is State.STARTING else 0.0
                used[worker.device] += max(0.0, worker.gpu_mb - loading)
        return [GpuReading(device, used[device], total) for device, total in self.profile.gpus.items()]

    def _schedule_tick(self, now: float) -> None:
        wake = self.core.next_wakeup()
        if wake is None:
            return
        wake = max(wake, now) + 1e-6  # keep-alive ends are strict: idle longer than the window
        if self.tick_s:
            wake = math.ceil(wake / self.tick_s) * self.tick_s
            batch = self.core.next_batch_due()  # the live batcher ticks to the millisecond, not with the reaper
            if batch is not None:
                wake = min(wake, max(batch, now))
        if wake < self._next_tick:
            self._next_tick = wake
            self._push(wake, _TICK, None)

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        entry = (at, self._seq, kind, payload)
        if kind == _EXPIRE and (not self._deadlines or self._deadlines[-1][0] <= at):
            self._deadlines.append(entry)
        else:
            heapq.heappush(self._heap, entry)


def simulate(
    trace: Trace,
    config: CoreConfig,
    profile: Profile,
    queue_timeout_s: float = 10.0,
    tick_s: float | None = None,
    seed: int = 0,
) -> SimResult:
    """Run ``trace`` through a pool with ``config`` (module doc)."""
    return Simulator(trace, config, profile, queue_timeout_s, tick_s, seed).run()


@dataclass(frozen=True)
class Grid:
    """The settings ``wanwu tune`` tries: every combination."""

    max_workers: Sequence[int] = (1, 2, 4, 8)
    ttl_s: Sequence[float] = (10, 30, 60, 120, 300, 600)
    keepalive: Sequence[str] = ("fixed", "adaptive")
    stem_cells: Sequence[int] = (0,)

    def configs(self, base: CoreConfig) -> list[CoreConfig]:
        return [
            replace(base, capacity=n, default_ttl_s=ttl, keepalive=policy, stem_cells=stems)
            for policy in self.keepalive
            for n in self.max_workers
            for stems in self.stem_cells
            for ttl in self.ttl_s
        ]


def point(config: CoreConfig, result: SimResult) -> Point:
    m = result.metrics()
    return Point(
        keepalive=config.keepalive,
        max_workers=config.capacity,
        ttl_s=config.default_ttl_s,
        requests=result.requests,
        cold_rate=m["cold_rate"],
        reject_rate=m["reject_rate"],
        p50_ms=m["p50_ms"],
        p99_ms=m["p99_ms"],
        idle_worker_s=m["idle_worker_s"],
        idle_gb_h=m["idle_gb_h"],
        stem_cells=config.stem_cells,
        stem_rate=result.stem_starts / result.requests if result.requests else 0.0,
    )


_shared: tuple[Trace, Profile, float, float | None, int] | None = None


def _adopt(trace: Trace, profile: Profile, queue_timeout_s: float, tick_s: float | None, seed: int) -> None:
    """Process-pool initializer: the trace arrives once per process (forked, not pickled)."""
    global _shared
    _shared = (trace, profile, queue_timeout_s, tick_s, seed)


def _run_one(config: CoreConfig) -> tuple[Point, float, int]:
    assert _shared is not None
    trace, profile, queue_timeout_s, tick_s, seed = _shared
    result = simulate(trace, config, profile, queue_timeout_s, tick_s, seed)
    return point(config, result), result.wall_s, result.requests


def run_grid(
    trace: Trace,
    grid: Grid,
    profile: Profile,
    base: CoreConfig | None = None,
    queue_timeout_s: float = 10.0,
    tick_s: float | None = None,
    seed: int = 0,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Point], float]:
    """Simulate every point of ``grid`` (on ``jobs`` processes); returns the points in
    grid order and the simulator's speed in requests per second of wall time (per process)."""
    configs = grid.configs(base or CoreConfig(capacity=1, default_ttl_s=30))
    shared = (trace, profile, queue_timeout_s, tick_s, seed)
    points: list[Point] = []
    wall = requests = 0.0
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(configs) > 1:
            context = multiprocessing.get_context("fork")
            executor = ProcessPoolExecutor(min(jobs, len(configs)), context, initializer=_adopt, initargs=shared)
            outcomes: Iterable[tuple[Point, float, int]] = stack.enter_context(executor).map(_run_one, configs)
        else:
            _adopt(*shared)
            outcomes = map(_run_one, configs)
        for got in outcomes:
            points.append(got[0])
            wall, requests = wall + got[1], requests + got[2]
            if progress:
                progress(1)
    return points, (requests / wall if wall else math.inf)
