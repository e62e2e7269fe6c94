"""The pool core: the whole behaviour of the warm pool as a state machine without I/O.

No threads, no clock reads, no backend (like h11 for HTTP): the core takes events and
returns commands. Two shells drive it: ``WarmPool`` (a lock, threads, an executor, a
backend and real time) and ``scheduler.sim.Simulator`` (an event heap in virtual time),
so what the tuner predicts is what the live pool does.

Events (methods, each taking ``now``):
    arrive        a request for a model came in, with a deadline (``retry``: a second attempt),
                  a size (images) and a priority (interactive or batch)
    expire        a waiting request's deadline passed
    ready         a worker answered its health check
    start_failed  a worker did not become ready
    released      a request on a worker finished (``ok=False``: the worker failed it)
    died          the backend saw a worker exit
    stopped       a worker's container is gone
    tick          time passed (TTL reaping, pre-warming, batches whose wait is over),
                  with fresh GPU readings
    configure     settings changed
    retire        a model's bundle was replaced (or removed): its idle workers stop now,
                  busy and starting ones once their requests finish; none is reused
    close         shutting down: refuse new requests
    stop_all      stop every worker (the end of a shutdown)

Commands (what the shell must carry out):
    SpawnWorker   stop ``evict`` first (their slots pass to the new worker), then start it
    StopWorker    kill and remove a worker, then report ``stopped``
    Grant         hand a request its lease on a worker (one per request; the requests of
                  one dynamic batch share a worker and name each other in ``batch``)
    Fail          end a request with an error

The rules the core applies are ``policy.py``'s (reuse, spawn, evict, wait, reject,
expiry, GPU pressure) and ``keepalive.py``'s (how long to keep, when to pre-warm).

Batching and priority: waiters are served interactive first, then batch, FIFO within
each. For a model with batching, a free worker gets the waiting requests of one
priority together, up to ``max_batch_size`` images, once the batch is full or its
oldest member has waited ``max_wait`` (it only waits while another worker of the model
is serving: a lone request on a quiet pool goes at once). Batch work never takes the last free slot (an
empty slot or an idle worker) while an interactive request waits or, on a pool of two
or more, while interactive requests arrived within ``interactive_reserve_s``: so an
interactive request waits at most for one batch's inference.

Capacity: N counts every worker, stem cells included. Lowered below what the pool
holds, the surplus stops as soon as it is idle (stem cells first, then least recently
used); a busy or starting one finishes its request first. Once nothing is queued or in
flight, at most N workers are not stopping.

CPU fallback: a model in ``cpu_fallback`` (set only on a pool with GPUs) that no GPU
has room for, now or ever, gets a CPU worker (no device, no GPU memory) in a free slot
instead of waiting or being rejected. Such a worker counts in N, is reused and reaped
like any other (an idle GPU worker of its model goes first), and its grants say
``cpu_fallback``. Never for a pre-warm, never in a stem cell.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import policy
from .errors import BackendUnavailable, CapacityExhausted, ModelUnavailable, WanwuError
from .keepalive import KeepAlive, Window, make
from .policy import STEM, State

REAP_REASONS = ("ttl", "gpu_pressure", "evicted", "crashed", "timeout", "load_failed", "replaced", "shutdown")
INTERACTIVE, BATCH = "interactive", "batch"
PRIORITIES = (INTERACTIVE, BATCH)
UNBOUNDED = sys.maxsize


@dataclass(frozen=True)
class CoreConfig:
    """Everything the core needs to decide; ``capacity`` 0 means unbounded."""

    capacity: int
    default_ttl_s: float
    model_ttl_s: Mapping[str, float] = field(default_factory=dict)
    estimates_mb: Mapping[str, float] = field(default_factory=dict)
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    queue_max: int = 64
    retry_after_s: float = 5.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    keepalive: str = "fixed"
    tick_s: float = 0.0  # how late a tick may come (the live reaper's interval): pre-warms start that early
    stem_cells: int = 0  # stem cells to keep ready (capacity permitting)
    stem_models: frozenset[str] | None = None  # models a stem cell can load; None: all
    batching: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # model -> (max images, max wait s)
    interactive_reserve_s: float = 10.0  # batch work leaves a slot free this long after an interactive request
    cpu_fallback: frozenset[str] = frozenset()  # models a CPU worker serves when no GPU has room (GPU pools only)

    @property
    def limits(self) -> policy.Limits:
        capacity = self.capacity if self.capacity > 0 else UNBOUNDED
        return policy.Limits(capacity, self.default_ttl_s, self.model_ttl_s, self.high_watermark, self.low_watermark)


# -- commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpawnWorker:
    """Start a worker of ``model`` (a stem cell when it is STEM), after stopping ``evict``."""

    worker_id: str
    model: str
    device: str | None = None
    evict: tuple[str, ...] = ()
    request_id: int | None = None  # the request it is started for; None: a pre-warm or a stem cell
    cpu_fallback: bool = False  # on the CPU (``device`` None) because no GPU has room for the model


@dataclass(frozen=True)
class LoadWorker:
    """Turn the stem cell ``worker_id`` into a worker of ``model``, then report ``ready``
    (or ``start_failed``: the stem cell is then stopped)."""

    worker_id: str
    model: str
    request_id: int | None = None


@dataclass(frozen=True)
class StopWorker:
    worker_id: str
    model: str
    reason: str
    idle_s: float | None = None  # how long it had been idle, for TTL and pressure reaps


@dataclass(frozen=True)
class Grant:
    request_id: int
    worker_id: str
    model: str
    cold_start: bool
    queue_ms: float
    spawn_ms: float
    spawn_breakdown: Mapping[str, float]
    start: str = "warm"  # how its worker started: warm (reused), container, or stem (a stem cell loaded it)
    batch: tuple[int, ...] = ()  # the requests sharing this worker call, in order; (): this one alone
    cpu_fallback: bool = False  # its worker runs on the CPU because no GPU had room for the model


@dataclass(frozen=True)
class Fail:
    request_id: int
    error: WanwuError


Command = SpawnWorker | LoadWorker | StopWorker | Grant | Fail


# -- state ---------------------------------------------------------------------------


@dataclass
class Worker:
    id: str
    model: str
    state: State
    last_used: float
    started_at: float
    device: str | None = None
    gpu_mb: float = 0.0
    served: int = 0
    dead: str | None = None  # why, if it died while busy
    reserved_for: int | None = None  # request id its start is for
    spawn_ms: float = 0.0
    spawn_breakdown: Mapping[str, float] = field(default_factory=dict)
    keep_s: float = 0.0  # how long it may stay idle, decided when it went idle
    adopted: bool = False  # a stem cell that loads or serves a model
    cpu_fallback: bool = False  # a CPU worker started because no GPU had room (holds no GPU memory)
    retired: bool = False  # its model's bundle was replaced while it ran: stopped once its request is done

    @property
    def stem(self) -> bool:
        return self.model == STEM


@dataclass(eq=False)
class Request:
    id: int
    model: str
    deadline: float
    enqueued: float
    spawning: str | None = None  # the worker started for it, if any
    size: int = 1  # images it carries
    priority: str = INTERACTIVE
    done: bool = False  # granted or failed (a dispatch walk may still hold it)


@dataclass
class Backoff:
    failures: int = 0
    until: float = 0.0
    last_error: str = ""


class PoolCore:
    """The pool's state and rules (module doc). Not thread-safe: the shell serialises events."""

    def __init__(self, config: CoreConfig, id_prefix: str = "w") -> None:
        self.config = config
        self.workers: dict[str, Worker] = {}
        self.queue: collections.deque[Request] = collections.deque()
        self.backoff: dict[str, Backoff] = {}
        self._stemless: dict[str, Backoff] = {}  # models whose load into a stem cell failed: containers for now
        self.readings: list[policy.GpuReading] = []
        self.counters = dict.fromkeys(
            (
                "cold_starts",
                "stem_starts",
                "warm_hits",
                "prewarms",
                "spawn_failures",
                "load_failures",
                "retries",
                "rejected",
                "timeouts",
                "batches",
                "batched_requests",
                "batch_priority_grants",
                "queue_jumps",  # interactive grants made while older batch work still waited
                "cpu_fallbacks",  # CPU workers started because no GPU had room for their model
            ),
            0,
        )
        self.reaps = dict.fromkeys(REAP_REASONS, 0)
        self.closing = False
        self.prewarm_at: dict[str, float] = {}  # model -> when to start a pre-warmed worker
        self.keepalive: KeepAlive = make(config.keepalive)
        self._limits = config.limits
        self._start_s: dict[str, float] = {}  # model -> its last start-up time
        self.start_ms: dict[str, float] = {}  # the last start of each kind: container, stem (cell), load (into one)
        self._last_arrival: dict[str, float] = {}  # model -> its last request (idle times count from there)
        self._windows: dict[str, Window] = {}  # model -> keep-alive window, until its inputs change
        self._expiry: list[tuple[float, str, float]] = []  # heap of (idle until, worker id, idle since)
        self._ids = itertools.count(1)
        self._prefix = id_prefix
        self._batch_due: dict[tuple[str, str], float] = {}  # (model, priority) -> when its held batch goes
        self._reserve_until: float | None = None  # when batch work held back by the reserve may go
        self._last_interactive = -math.inf

    # -- events ------------------------------------------------------------------------

    def arrive(
        self,
        request_id: int,
        model: str,
        now: float,
        deadline: float,
        retry: bool = False,
        size: int = 1,
        priority: str = INTERACTIVE,
    ) -> list[Command]:
        """A request for ``model`` (``size`` images, for one worker call) that must be
        served (or failed) by ``deadline``."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority is {priority!r}; expected one of {', '.join(PRIORITIES)}")
        if self.closing:
            return [Fail(request_id, BackendUnavailable("the pool is shutting down"))]
        # Each priority has its own room: waiting batch work never turns interactive requests away.
        waiting = sum(1 for r in self.queue if r.priority == priority)
        if waiting >= max(1, self.config.queue_max):
            self.counters["rejected"] += 1
            error = CapacityExhausted(f"the wait queue is full ({waiting} requests)", self.config.retry_after_s)
            return [Fail(request_id, error)]
        if retry:
            self.counters["retries"] += 1
        else:
            self.keepalive.observe(model, now)
            self._windows.pop(model, None)
            self._last_arrival[model] = now
        if priority == INTERACTIVE:
            self._last_interactive = now
        self.prewarm_at.pop(model, None)  # the request itself is here
        self.queue.append(Request(request_id, model, deadline, now, size=size, priority=priority))
        return self._dispatch(now)

    def expire(self, request_id: int, now: float) -> list[Command]:
        """``request_id``'s deadline passed; a start under way for it goes on and serves the next waiter."""
        request = next((r for r in self.queue if r.id == request_id), None)
        if request is None:
            return []
        self.queue.remove(request)
        request.done = True
        if request.spawning is not None and request.spawning in self.workers:
            self.workers[request.spawning].reserved_for = None
        self.counters["timeouts"] += 1
        waited = request.deadline - request.enqueued
        capacity = "unbounded" if self.config.capacity <= 0 else str(self.config.capacity)
        error = CapacityExhausted(
            f"no {request.model} worker became free within {waited:.1f} s "
            f"({len(self.workers)}/{capacity} workers, {len(self.queue)} waiting)",
            self.config.retry_after_s,
        )
        return [Fail(request_id, error)]

    def ready(
        self,
        worker_id: str,
        now: float,
        spawn_ms: float,
        breakdown: Mapping[str, float] | None = None,
        gpu_mb: float | None = None,
    ) -> list[Command]:
        """A worker started and answered its health check."""
        worker = self.workers.get(worker_id)
        if worker is None:  # stopped while it was starting (a shutdown): stop what came up
            return [StopWorker(worker_id, "", "shutdown")]
        self.backoff.pop(worker.model, None)
        worker.spawn_ms = spawn_ms
        worker.spawn_breakdown = dict(breakdown or {})
        if not worker.stem and not worker.adopted:  # the pre-warm lead: what a container takes, conservatively
            self._start_s[worker.model] = spawn_ms / 1000
        self.start_ms["stem" if worker.stem else ("load" if worker.adopted else "container")] = spawn_ms
        self._windows.pop(worker.model, None)
        if gpu_mb is not None and gpu_mb > 0 and not worker.cpu_fallback:
            # A stem cell reports what its allocator holds, not the CUDA context: keep the estimate.
            worker.gpu_mb = max(worker.gpu_mb, float(gpu_mb)) if worker.stem else float(gpu_mb)
        commands: list[Command] = []
        if worker.retired and not self.closing and worker.state is not State.STOPPING:
            # It may have loaded the old bundle: its request waits on for a fresh start.
            waiting = self._request(worker.reserved_for)
            if waiting is not None:
                waiting.spawning = None
            return [self._stop(worker, "replaced", now), *self._dispatch(now)]
        if worker.state is State.STOPPING or self.closing:
            commands.append(self._stop(worker, "shutdown", now))
            waiting = self._request(worker.reserved_for)
            if waiting is not None:
                commands.append(self._fail(waiting, BackendUnavailable("the pool is shutting down")))
            return commands
        if worker.stem:
            worker.state, worker.last_used = State.IDLE, now  # a stem cell waits for a model: no keep-alive
            commands += self._trim_stems(now)  # fewer may be wanted since it started
        else:
            self._idle(worker, now, self.window(worker.model).keep_s)
        waiting = self._request(worker.reserved_for)
        if waiting is not None and waiting.priority == BATCH and self._interactive_waits(worker.model):
            # Interactive waiters go first, even for a worker started for batch work.
            waiting.spawning = worker.reserved_for = None
        elif waiting is not None:  # it waited for a start: take its companions without more waiting
            # (even over a lowered N: its request has waited for it; it stops when idle)
            commands += self._hand_over_batch(self._members(waiting, now, hold=False) or [waiting], worker, now)
        return commands + self._dispatch(now)

    def start_failed(self, worker_id: str, now: float, error: WanwuError) -> list[Command]:
        """A worker did not become ready: its model backs off (1 s, doubling to the
        maximum) and the request it was started for gets ``error``."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return []
        commands: list[Command] = []
        waiting = self._request(worker.reserved_for)
        if worker.adopted and worker.state is State.STARTING:
            # A stem cell that failed to load is never reused. The model gets its own
            # container instead (for the same backoff as a failed start would give it):
            # if the bundle is broken, that start fails too and says why, like any start.
            commands.append(self._stop(worker, "load_failed", now))
            self.counters["load_failures"] += 1
            self._back_off(self._stemless, worker.model, now, error)
            if waiting is not None:
                waiting.spawning = None  # it waits on: dispatch starts a container for it
            return commands + self._dispatch(now)
        del self.workers[worker_id]  # the backend has already removed a container that failed to start
        self.counters["spawn_failures"] += 1
        self._back_off(self.backoff, worker.model, now, error)
        if waiting is not None:
            commands.append(self._fail(waiting, error))
        return commands + self._dispatch(now)

    def _back_off(self, table: dict[str, Backoff], model: str, now: float, error: WanwuError | str) -> None:
        backoff = table.setdefault(model, Backoff())
        backoff.failures += 1
        backoff.until = now + self.backoff_delay(backoff)
        text = str(error)
        backoff.last_error = text.splitlines()[0][:300] if text else type(error).__name__

    def backoff_delay(self, backoff: Backoff) -> float:
        return min(self.config.backoff_max_s, self.config.backoff_base_s * 2.0 ** (backoff.failures - 1))

    def released(self, worker_id: str, now: float, ok: bool = True, reason: str = "crashed") -> list[Command]:
        """A request on ``worker_id`` finished. ``ok=False``: the worker failed it
        (``reason``: crashed or timeout) and is replaced rather than reused."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state is not State.BUSY:
            return []
        commands: list[Command] = []
        window = self.window(worker.model)
        if ok and worker.retired and worker.dead is None:
            commands.append(self._stop(worker, "replaced", now))
        elif ok and worker.dead is None and not self.closing:
            self._idle(worker, now, window.keep_s)
        elif not ok or worker.dead is not None:
            commands.append(self._stop(worker, reason if not ok else "crashed", now))
        else:  # a sound worker finishing during a shutdown
            commands.append(self._stop(worker, "shutdown", now))
        commands += self._dispatch(now)
        if window.prewarm_s > 0 and self._current((0.0, worker_id, now)):  # nobody took it
            commands += self._unload_until_prewarm(worker, window, now)
        return commands

    def died(self, worker_id: str, now: float, reason: str) -> list[Command]:
        """The backend saw ``worker_id`` exit (crash, OOM kill, removal from outside)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state in (State.STOPPING, State.STARTING):
            return []  # ours to stop, or its start will notice
        if worker.state is State.BUSY:
            worker.dead = reason  # the request in flight fails and is retried
            return []
        if worker.stem:  # a stem cell that dies waiting is a failed start: no restart loop at full speed
            self.counters["spawn_failures"] += 1
            self._back_off(self.backoff, STEM, now, f"stem cell {worker_id} died: {reason}")
        return [self._stop(worker, "crashed", now)]

    def stopped(self, worker_id: str, now: float) -> list[Command]:
        """A worker's container is gone: its slot is free."""
        if self.workers.pop(worker_id, None) is None:
            return []
        return self._dispatch(now)

    def tick(self, now: float, readings: list[policy.GpuReading] | None = None) -> list[Command]:
        """Stop idle workers past their keep-alive and, above the GPU high watermark,
        idle workers least recently used first; start workers due to be pre-warmed."""
        if readings is not None:
            self.readings = readings
        due = self._due(now)
        keep = {w.id: w.keep_s for w in due}
        victims = [(w, "ttl") for w in policy.expired(due, now, self._limits, keep)]
        chosen = {w for w, _ in victims}
        for worker in due:
            if worker.id not in chosen:  # due by the sum, not yet by the difference: look again later
                heapq.heappush(self._expiry, (worker.last_used + worker.keep_s, worker.id, worker.last_used))
        pressure = policy.under_pressure(list(self.workers.values()), self.readings, self._limits)
        victims += [(w, "gpu_pressure") for w in pressure if w not in chosen]
        commands: list[Command] = [self._stop(self.workers[w], reason, now) for w, reason in victims]
        commands += self._prewarm_due(now)
        return commands + self._dispatch(now)

    def configure(self, config: CoreConfig, now: float) -> list[Command]:
        """New settings: capacity, TTLs, estimates, keep-alive policy, stem cells. A
        smaller capacity or fewer stem cells stop the surplus: idle workers at once
        (stem cells first, then least recently used), busy and starting ones as soon as
        they are idle (``_trim``, ``_trim_stems``)."""
        if config.keepalive != self.config.keepalive:
            self.keepalive = make(config.keepalive)
            self.prewarm_at.clear()
        self.config, self._limits = config, config.limits
        self._windows.clear()
        self._expiry.clear()
        for worker in self.workers.values():  # idle workers get the new keep-alive (stem cells have none)
            if worker.state is State.IDLE and not worker.stem:
                self._idle(worker, worker.last_used, self.window(worker.model).keep_s)
        return self._trim_stems(now) + self._dispatch(now)

    def retire(self, model: str, now: float) -> list[Command]:
        """``model``'s bundle changed: no worker that may hold the old one serves again.
        Idle ones stop now; busy and starting ones are marked and stop when done."""
        commands: list[Command] = []
        for worker in list(self.workers.values()):
            if worker.model != model or worker.state is State.STOPPING:
                continue
            if worker.state is State.IDLE:
                commands.append(self._stop(worker, "replaced", now))
            else:
                worker.retired = True
        self.prewarm_at.pop(model, None)
        return commands + self._dispatch(now)

    def close(self, now: float) -> list[Command]:
        """Refuse new requests; waiters without a start under way fail now."""
        self.closing = True
        self.prewarm_at.clear()
        error = BackendUnavailable("the pool is shutting down")
        return [self._fail(r, error) for r in list(self.queue) if r.spawning is None]

    def stop_all(self, now: float) -> list[Command]:
        """Stop every worker that is not already stopping; requests still waiting (for a
        start that outlived the grace period) fail now, as nothing will serve them."""
        live = [w for w in self.workers.values() if w.state is not State.STOPPING]
        commands: list[Command] = [self._stop(w, "shutdown", now) for w in live]
        error = BackendUnavailable("the pool is shutting down")
        return commands + [self._fail(r, error) for r in list(self.queue)]

    # -- what the shell may read ---------------------------------------------------------

    def waiting(self) -> dict[str, int]:
        """Requests waiting, by priority."""
        counts = dict.fromkeys(PRIORITIES, 0)
        for request in self.queue:
            counts[request.priority] += 1
        return counts

    def in_flight(self) -> bool:
        return any(w.state in (State.BUSY, State.STARTING) for w in self.workers.values())

    def next_wakeup(self) -> float | None:
        """The earliest time a ``tick`` would change something (an idle worker's
        keep-alive ending, a pre-warm or a held batch falling due); None if nothing is timed."""
        expiry = self._expiry
        while expiry and not self._current(expiry[0]):
            heapq.heappop(expiry)
        times = [expiry[0][0]] if expiry else []
        times += self.prewarm_at.values()
        due = self.next_batch_due()
        return min([*times, due] if due is not None else times, default=None)

    def next_batch_due(self) -> float | None:
        """When the earliest held batch goes (its oldest member has waited long enough),
        or batch work held back by the interactive reserve may start; the live shell
        ticks then, to the millisecond (keep-alive can wait for the reaper)."""
        times = list(self._batch_due.values())
        if self._reserve_until is not None:
            times.append(self._reserve_until)
        return min(times, default=None)

    def describe_keepalive(self) -> dict[str, Any]:
        return {"policy": self.keepalive.name, "models": self.keepalive.describe()}

    # -- rules ---------------------------------------------------------------------------

    def _dispatch(self, now: float) -> list[Command]:
        """Serve waiters, interactive first and FIFO within a priority, as far as the
        policy allows; batch work only where ``_batch_may_take`` says so."""
        commands = self._trim(now)  # first: a surplus worker serves nobody, and its slot is not refilled
        limits, estimates = self._limits, self.config.estimates_mb
        self._batch_due.clear()
        self._reserve_until = None
        if self._full_and_busy(now):
            return commands + self._refill_stems(now)  # every waiter would wait: skip the walk
        # Decisions depend only on the model and the workers: reuse them along the queue
        # until a hand-over or a spawn changes the workers (a long queue stays cheap).
        decided: dict[str, policy.Decision] = {}
        held: set[tuple[str, str]] = set()  # (model, priority) batches waiting for more members
        kept: set[str] = set()  # their idle workers: to any other request they look busy
        for request in self._in_order():
            if request.done or (request.model, request.priority) in held:
                continue
            batch = request.priority == BATCH
            if batch and (request.model, INTERACTIVE) in held:
                continue  # that worker is being held for an interactive batch
            decision = decided.get(request.model)
            if decision is None:
                views = [replace(w, state=State.BUSY) if w.id in kept else w for w in self.workers.values()]
                decision = decided[request.model] = policy.decide(
                    request.model,
                    views,
                    limits,
                    self.readings,
                    estimates,
                    self._stem_ok(request.model, now),
                    request.model in self.config.cpu_fallback,
                )
            backoff = self.backoff.get(request.model)
            if isinstance(decision, policy.Reuse):
                if batch and not self._batch_may_take(now, len(kept)):
                    continue
                members = self._members(request, now)
                if members is None:  # a batch that may still grow: the worker waits with it
                    held.add((request.model, request.priority))
                    kept.add(decision.worker_id)
                    decided.clear()
                    continue
                commands += self._hand_over_batch(members, self.workers[decision.worker_id], now)
                decided.clear()
            elif request.spawning is None and backoff is not None and backoff.until > now:
                # Its workers keep failing to start: an idle one still serves, a new one is not tried yet.
                commands.append(self._fail(request, self._backoff_error(request.model, backoff, now)))
            elif isinstance(decision, policy.Reject):
                commands.append(self._fail(request, CapacityExhausted(decision.reason, self.config.retry_after_s)))
            elif request.spawning is not None:
                continue  # its start is under way
            elif (starting := self._unreserved_start(request.model)) is not None:
                # A start nobody waits for (a pre-warm, or one whose request gave up): take it over.
                starting.reserved_for, request.spawning = request.id, starting.id
            elif batch and not self._batch_may_take(now, len(kept)):
                continue
            elif isinstance(decision, policy.Spawn):
                commands.append(self._spawn(request.model, decision, now, request))
                decided.clear()
            elif isinstance(decision, policy.Adopt):
                commands.append(self._adopt(request.model, decision.worker_id, now, request))
                decided.clear()
        return commands + self._refill_stems(now)

    def _trim(self, now: float) -> list[Command]:
        """N is a promise: while the pool holds more workers than capacity (it was
        lowered), surplus workers stop as soon as they are idle, stem cells first, then
        the least recently used. Busy and starting ones stay surplus until an event (a
        release, a ready) leaves them idle and brings them here."""
        capacity = self._limits.capacity
        if len(self.workers) <= capacity:  # the pool only outgrows N when N is lowered: the usual case is O(1)
            return []
        # Workers already stopping are on their way out: count them again and a second
        # change (or a catalog reload) would stop one more each time.
        over = sum(w.state is not State.STOPPING for w in self.workers.values()) - capacity
        if over <= 0:
            return []
        idle = sorted(
            (w for w in self.workers.values() if w.state is State.IDLE), key=lambda w: (not w.stem, w.last_used, w.id)
        )
        return [self._stop(worker, "evicted", now) for worker in idle[:over]]

    def _trim_stems(self, now: float) -> list[Command]:
        """More stem cells ready than wanted (fewer were asked for): the surplus stops,
        the most recently ready first. One still starting then stops once it is up."""
        idle = [w for w in self.workers.values() if w.stem and w.state is State.IDLE]
        surplus = len(idle) - max(0, self.config.stem_cells)
        if surplus <= 0:
            return []
        idle.sort(key=lambda w: (w.last_used, w.id), reverse=True)
        return [self._stop(worker, "evicted", now) for worker in idle[:surplus]]

    def _in_order(self) -> list[Request]:
        """The queue as it is served: interactive requests first, FIFO within each priority."""
        queue = self.queue
        if all(r.priority == INTERACTIVE for r in queue):
            return list(queue)
        return [r for r in queue if r.priority == INTERACTIVE] + [r for r in queue if r.priority != INTERACTIVE]

    def _interactive_waits(self, model: str | None = None) -> bool:
        return any(r.priority == INTERACTIVE and (model is None or r.model == model) for r in self.queue)

    def _batch_may_take(self, now: float, kept: int = 0) -> bool:
        """Whether batch work may take a slot (an empty one or an idle worker not kept
        for a held batch): always while two are free; the last one only if no
        interactive request waits and, on a pool of two or more, none arrived within
        ``interactive_reserve_s`` (``_reserve_until`` says when it may)."""
        capacity = self._limits.capacity
        if capacity >= UNBOUNDED:
            return True
        taken = kept + sum(1 for w in self.workers.values() if w.state is not State.IDLE)
        if capacity - taken >= 2:
            return True
        if self._interactive_waits():
            return False
        until = self._last_interactive + self.config.interactive_reserve_s
        if capacity < 2 or now >= until:
            return True
        self._reserve_until = until
        return False

    def _members(self, head: Request, now: float, hold: bool = True) -> list[Request] | None:
        """The requests one worker call serves with ``head``: for a model with batching,
        waiters of the same model and priority in FIFO order up to ``max_batch_size``
        images. None (``hold``) while the batch may still grow: not full, another worker
        of the model is serving (traffic is not a lone request), and its oldest member
        has waited less than ``max_wait`` (``_batch_due`` says when)."""
        spec = self.config.batching.get(head.model)
        if spec is None:
            return [head]
        max_size, max_wait = spec
        members, total, left_out = [head], head.size, False
        for request in self.queue:
            if total >= max_size:
                break
            if request is head or request.done or request.model != head.model or request.priority != head.priority:
                continue
            if request.deadline <= now:
                continue  # its expiry is on its way
            if total + request.size > max_size:
                left_out = True  # it goes in the next batch: waiting would not fill this one
                continue
            members.append(request)
            total += request.size
        due = min(r.enqueued for r in members) + max_wait
        if not hold or total >= max_size or left_out or now >= due or not self._busy(head.model):
            return members
        key = (head.model, head.priority)
        self._batch_due[key] = min(due, self._batch_due.get(key, due))
        return None

    def _busy(self, model: str) -> bool:
        """Whether a worker of ``model`` is serving: the sign more requests are coming.
        Without it a batch does not wait (a lone request on a quiet pool pays nothing)."""
        return any(w.model == model and w.state is State.BUSY for w in self.workers.values())

    def _hand_over_batch(self, members: list[Request], worker: Worker, now: float) -> list[Command]:
        """Grant ``members`` one call on ``worker``; the one its start was for is the cold start."""
        cold_for = worker.reserved_for
        if len(members) == 1:
            return [self._hand_over(members[0], worker, now, cold=cold_for == members[0].id)]
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(members)
        ids = tuple(r.id for r in members)
        return [self._hand_over(r, worker, now, cold=cold_for == r.id, batch=ids) for r in members]

    def _stem_ok(self, model: str, now: float) -> bool:
        allowed = self.config.stem_models
        if self.config.stem_cells <= 0 or (allowed is not None and model not in allowed):
            return False
        failed = self._stemless.get(model)  # its last load into a stem cell failed: a container for now
        return failed is None or failed.until <= now

    def _adopt(self, model: str, stem_id: str, now: float, request: Request | None) -> LoadWorker:
        """A stem cell becomes ``model``'s worker: it loads while the request waits."""
        worker = self.workers[stem_id]
        worker.model, worker.state, worker.adopted = model, State.STARTING, True
        worker.last_used = now
        worker.gpu_mb += self.config.estimates_mb.get(model, 0.0)
        worker.reserved_for = None if request is None else request.id
        if request is not None:
            request.spawning = stem_id
        return LoadWorker(stem_id, model, None if request is None else request.id)

    def _refill_stems(self, now: float) -> list[Command]:
        """Keep ``stem_cells`` stem cells starting or ready, in spare slots only: a
        request waiting for a slot, a full pool or stems failing to start come first."""
        if self.closing or self.config.stem_cells <= 0:
            return []
        if any(r.spawning is None for r in self.queue):
            return []
        backoff = self.backoff.get(STEM)
        if backoff is not None and backoff.until > now:
            return []
        commands: list[Command] = []
        stems = sum(1 for w in self.workers.values() if w.stem and w.state in (State.STARTING, State.IDLE))
        while stems < self.config.stem_cells:
            views = list(self.workers.values())
            # Below the low watermark only, so a stem cell never pushes a GPU into pressure reaping.
            low = replace(self._limits, high_watermark=self._limits.low_watermark)
            decision = policy.room_for(STEM, views, low, self.readings, self.config.estimates_mb)
            if decision is None:
                break
            commands.append(self._spawn(STEM, decision, now, None))
            stems += 1
        return commands

    def _unreserved_start(self, model: str) -> Worker | None:
        return next(
            (
                w
                for w in self.workers.values()
                if w.model == model and w.state is State.STARTING and w.reserved_for is None
            ),
            None,
        )

    def _full_and_busy(self, now: float) -> bool:
        """No waiter can be served, failed or rejected now: no room, no idle worker, no
        backoff in force, and no GPU readings (which could reject a model outright)."""
        if not self.queue:
            return True
        if self.readings or len(self.workers) < self._limits.capacity:
            return False
        if any(b.until > now for b in self.backoff.values()):
            return False
        return not any(w.state is State.IDLE for w in self.workers.values())

    def _hand_over(
        self, request: Request, worker: Worker, now: float, cold: bool, batch: tuple[int, ...] = ()
    ) -> Grant:
        if request.spawning is not None and request.spawning != worker.id and request.spawning in self.workers:
            self.workers[request.spawning].reserved_for = None  # that start will serve someone else
        worker.reserved_for = None
        worker.state = State.BUSY
        worker.served += 1
        request.done = True
        self.counters["cold_starts" if cold else "warm_hits"] += 1
        if request.priority == BATCH:
            self.counters["batch_priority_grants"] += 1
        elif any(r.priority == BATCH and r.enqueued < request.enqueued and not r.done for r in self.queue):
            self.counters["queue_jumps"] += 1
        spawn_ms = worker.spawn_ms if cold else 0.0
        waited = max(0.0, (now - request.enqueued) * 1000 - spawn_ms)
        self.queue.remove(request)
        breakdown = dict(worker.spawn_breakdown) if cold else {}
        start = "warm" if not cold else ("stem" if worker.adopted else "container")
        if start == "stem":
            self.counters["stem_starts"] += 1
        return Grant(
            request.id,
            worker.id,
            worker.model,
            cold,
            round(waited, 3),
            spawn_ms,
            breakdown,
            start,
            batch,
            worker.cpu_fallback,
        )

    def _fail(self, request: Request, error: WanwuError) -> Fail:
        if request in self.queue:
            self.queue.remove(request)
        request.done = True
        return Fail(request.id, error)

    def _spawn(self, model: str, decision: policy.Spawn, now: float, request: Request | None) -> SpawnWorker:
        for victim_id in decision.evict:
            del self.workers[victim_id]  # its slot passes to the new worker now
            self.reaps["evicted"] += 1
        worker = Worker(
            f"{self._prefix}{next(self._ids):04d}",
            model,
            State.STARTING,
            now,
            now,
            decision.device,
            gpu_mb=0.0 if decision.cpu_fallback else self.config.estimates_mb.get(model, 0.0),
            reserved_for=None if request is None else request.id,
            cpu_fallback=decision.cpu_fallback,
        )
        self.workers[worker.id] = worker
        if request is not None:
            request.spawning = worker.id
        if decision.cpu_fallback:
            self.counters["cpu_fallbacks"] += 1
        request_id = None if request is None else request.id
        return SpawnWorker(worker.id, model, decision.device, decision.evict, request_id, decision.cpu_fallback)

    def _stop(self, worker: Worker, reason: str, now: float) -> StopWorker:
        idle = now - worker.last_used if worker.state is State.IDLE else None
        worker.state = State.STOPPING
        self.reaps[reason] += 1
        return StopWorker(worker.id, worker.model, reason, idle)

    def _idle(self, worker: Worker, now: float, keep_s: float) -> None:
        worker.state = State.IDLE
        worker.last_used = now
        worker.keep_s = keep_s
        heapq.heappush(self._expiry, (now + keep_s, worker.id, now))

    def _current(self, entry: tuple[float, str, float]) -> bool:
        """Whether an expiry entry still describes an idle worker (not reused since)."""
        worker = self.workers.get(entry[1])
        return worker is not None and worker.state is State.IDLE and worker.last_used == entry[2]

    def _due(self, now: float) -> list[Worker]:
        """Idle workers whose keep-alive has ended by ``now`` (taken off the expiry heap)."""
        due: list[Worker] = []
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            entry = heapq.heappop(expiry)
            if self._current(entry) and self.workers[entry[1]] not in due:  # an entry may be there twice
                due.append(self.workers[entry[1]])
        return due

    def _unload_until_prewarm(self, worker: Worker, window: Window, now: float) -> list[Command]:
        """Adaptive keep-alive: a model whose next request is not expected for a while
        gives its worker back at once and gets one pre-warmed shortly before then."""
        # Idle times are counted from arrivals, and a tick may come up to tick_s late.
        lead = self._start_s.get(worker.model, 0.0) + self.config.tick_s
        due = self._last_arrival.get(worker.model, now) + window.prewarm_s - lead
        if due <= now + lead:  # no time to stop and start again: keep it through the pre-warm window too
            worker.keep_s = window.prewarm_s + window.keep_s
            heapq.heappush(self._expiry, (now + worker.keep_s, worker.id, now))
            return []
        self.prewarm_at[worker.model] = due
        return [self._stop(worker, "ttl", now)]

    def _prewarm_due(self, now: float) -> list[Command]:
        commands: list[Command] = []
        for model, due in list(self.prewarm_at.items()):
            if due > now:
                continue
            del self.prewarm_at[model]
            if self.closing or any(w.model == model and w.state is not State.STOPPING for w in self.workers.values()):
                continue
            backoff = self.backoff.get(model)
            if backoff is not None and backoff.until > now:
                continue
            views = list(self.workers.values())
            estimates = self.config.estimates_mb
            decision = policy.decide(model, views, self._limits, self.readings, estimates, self._stem_ok(model, now))
            if isinstance(decision, policy.Adopt):
                self.counters["prewarms"] += 1
                commands.append(self._adopt(model, decision.worker_id, now, None))
            elif isinstance(decision, policy.Spawn) and not decision.evict:  # never evict for a guess
                self.counters["prewarms"] += 1
                commands.append(self._spawn(model, decision, now, None))
        return commands

    def window(self, model: str) -> Window:
        """The keep-alive window of ``model`` now (cached until its inputs change)."""
        window = self._windows.get(model)
        if window is None:
            window = self.keepalive.window(model, self._limits.ttl(model), self._start_s.get(model, 0.0))
            self._windows[model] = window
        return window

    def _request(self, request_id: int | None) -> Request | None:
        if request_id is None:
            return None
        return next((r for r in self.queue if r.id == request_id), None)

    @staticmethod
    def _backoff_error(model: str, backoff: Backoff, now: float) -> ModelUnavailable:
        wait = backoff.until - now
        return ModelUnavailable(
            f"model {model} failed to start {backoff.failures} time(s) in a row; next try in {wait:.1f} s. "
            f"Last error: {backoff.last_error}",
            retry_after_s=wait,
        )
