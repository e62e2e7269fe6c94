"""The pool core's state and the rules that serve its waiters (``PoolCore`` in
``scheduler.core`` adds what each event does).

The rules are ``policy.py``'s (reuse, spawn, evict, wait, reject, expiry, GPU pressure),
``batching.py``'s (who shares a call, when batch work may take a slot) and
``keepalive.py``'s (how long to keep, when to pre-warm), applied to the workers as
``workers.Workers`` indexes them.

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

import heapq
import itertools
import math
from dataclasses import dataclass, field, replace

from . import batching, policy
from .backoff import Backoff
from .batching import Request
from .coreconfig import UNBOUNDED, CoreConfig
from .errors import CapacityExhausted, WanwuError
from .events import BATCH, INTERACTIVE, Command, Fail, Grant, LoadWorker, SpawnWorker, StopWorker
from .keepalive import KeepAlive, Window, make
from .workers import STEM, State, Worker, Workers

REAP_REASONS = ("ttl", "gpu_pressure", "evicted", "crashed", "timeout", "load_failed", "replaced", "shutdown")
COUNTERS = (
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
)


@dataclass
class _Walk:
    """One dispatch walk's notes. Decisions depend only on the model and the workers:
    they are reused along the queue until a hand-over or a start changes the workers (a
    long queue stays cheap)."""

    decided: dict[str, policy.Decision] = field(default_factory=dict)
    held: set[tuple[str, str]] = field(default_factory=set)  # (model, priority) batches waiting for more members
    kept: set[str] = field(default_factory=set)  # their idle workers: to any other request they look busy


class Rules:
    """The core's state and how waiters are served. Not thread-safe: the shell serialises events."""

    def __init__(self, config: CoreConfig, id_prefix: str = "w") -> None:
        self.config = config
        self.workers = Workers()
        self.queue = batching.WaitQueue()  # waiting, in queue order
        self.requests: dict[int, Request] = {}  # every request the core holds: waiting or in flight
        self.serving: dict[str, tuple[int, ...]] = {}  # worker -> the requests of its call in flight
        self.backoff: dict[str, Backoff] = {}
        self._stemless: dict[str, Backoff] = {}  # models whose load into a stem cell failed: containers for now
        self.readings: list[policy.GpuReading] = []
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.reaps = dict.fromkeys(REAP_REASONS, 0)
        self.closing = False
        self.prewarm_at: dict[str, float] = {}  # model -> when to start a pre-warmed worker
        self._prewarms: list[tuple[float, str]] = []  # heap of (due, model); stale where prewarm_at differs
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
        self._freed: set[str] = set()  # models that got a free worker while requests of theirs were parked

    # -- serving waiters -------------------------------------------------------------

    def _dispatch(self, now: float) -> list[Command]:
        """Serve waiters, interactive first and FIFO within a priority, as far as the
        policy allows; batch work only where ``_batch_may_take`` says so."""
        commands = self._trim(now)  # first: a surplus worker serves nobody, and its slot is not refilled
        self._batch_due.clear()
        self._reserve_until = None
        if self._full_and_busy(now):
            return commands + self._refill_stems(now)  # every waiter would wait: skip the walk
        walk = _Walk()
        for request in self.queue.candidates(self._attention()):
            if self._passes_over(request, walk):
                continue
            decision = walk.decided.get(request.model)
            if decision is None:
                decision = walk.decided[request.model] = policy.decide(
                    request.model,
                    self.workers.hiding(frozenset(walk.kept)),
                    self._limits,
                    self.readings,
                    self.config.estimates_mb,
                    self._stem_ok(request.model, now),
                    request.model in self.config.cpu_fallback,
                )
            if isinstance(decision, policy.Reuse):
                commands += self._reuse(request, decision, walk, now)
            else:
                commands += self._start(request, decision, walk, now)
        return commands + self._refill_stems(now)

    def _passes_over(self, request: Request, walk: _Walk) -> bool:
        """Whether the walk has nothing to decide for ``request``."""
        if request.done or (request.model, request.priority) in walk.held:
            return True
        if request.spawning is not None and not self.readings and not self.workers.has(request.model, State.IDLE):
            return True  # its start is under way and no worker of its model is free
        # A batch request waits while the model's worker is held for an interactive batch.
        return request.priority == BATCH and (request.model, INTERACTIVE) in walk.held

    def _reuse(self, request: Request, decision: policy.Reuse, walk: _Walk, now: float) -> list[Command]:
        """Hand an idle worker to ``request`` and its batch, or hold it for a batch that may still grow."""
        if request.priority == BATCH and not self._batch_may_take(now, len(walk.kept)):
            return []
        members = self._members(request, now)
        walk.decided.clear()
        if members is None:  # a batch that may still grow: the worker waits with it (to others it looks busy)
            walk.held.add((request.model, request.priority))
            walk.kept.add(decision.worker_id)
            return []
        return self._hand_over_batch(members, self.workers[decision.worker_id], now)

    def _start(self, request: Request, decision: policy.Decision, walk: _Walk, now: float) -> list[Command]:
        """No idle worker for ``request``: fail it (its model backs off, or can never fit),
        take over a start nobody waits for, or start a worker; else it waits."""
        backoff = self.backoff.get(request.model)
        if request.spawning is None and backoff is not None and backoff.until > now:
            # Its workers keep failing to start: an idle one still serves, a new one is not tried yet.
            return [self._fail(request, backoff.error(request.model, now))]
        if isinstance(decision, policy.Reject):
            return [self._fail(request, CapacityExhausted(decision.reason, self.config.retry_after_s))]
        if request.spawning is not None:
            return []  # its start is under way
        if (starting := self._unreserved_start(request.model)) is not None:
            # A start nobody waits for (a pre-warm, or one whose request gave up): take it over.
            starting.reserved_for = request.id
            self.queue.park(request, starting.id)
            return []
        if request.priority == BATCH and not self._batch_may_take(now, len(walk.kept)):
            return []
        if isinstance(decision, policy.Spawn):
            walk.decided.clear()
            return [self._spawn(request.model, decision, now, request)]
        if isinstance(decision, policy.Adopt):
            walk.decided.clear()
            return [self._adopt(request.model, decision.worker_id, now, request)]
        return []  # Wait

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
        over = len(self.workers) - self.workers.counting(State.STOPPING) - capacity
        if over <= 0:
            return []
        return [self._stop(worker, "evicted", now) for worker in self.workers.idle_lru()[:over]]

    def _trim_stems(self, now: float) -> list[Command]:
        """More stem cells ready than wanted (fewer were asked for): the surplus stops,
        the most recently ready first. One still starting then stops once it is up."""
        idle = list(self.workers.of(STEM, State.IDLE))
        surplus = len(idle) - max(0, self.config.stem_cells)
        if surplus <= 0:
            return []
        idle.sort(key=lambda w: (w.last_used, w.id), reverse=True)
        return [self._stop(worker, "evicted", now) for worker in idle[:surplus]]

    def _attention(self) -> list[str]:
        """The models whose parked requests a dispatch must look at: with GPU readings
        every one (a reading may reject a model), else those with a free worker."""
        if self.readings:
            return self.queue.parked_models()
        if not self._freed:
            return []
        for model in list(self._freed):
            if not (self.queue.parked(model) and self.workers.has(model, State.IDLE)):
                self._freed.discard(model)
        return sorted(self._freed)

    def _interactive_waits(self, model: str | None = None) -> bool:
        if model is None:
            return self.queue.count(INTERACTIVE) > 0
        return self.queue.waits(model, INTERACTIVE)

    def _batch_may_take(self, now: float, kept: int = 0) -> bool:
        """Whether batch work may take a slot (``batching.batch_may_take``)."""
        capacity = self._limits.capacity
        if capacity >= UNBOUNDED:
            return True
        taken = kept + len(self.workers) - self.workers.counting(State.IDLE)
        reserve = self.config.interactive_reserve_s
        may, until = batching.batch_may_take(
            capacity, taken, self._interactive_waits(), self._last_interactive, reserve, now
        )
        if until is not None:
            self._reserve_until = until
        return may

    def _members(self, head: Request, now: float, hold: bool = True) -> list[Request] | None:
        """The requests one worker call serves with ``head`` (``batching.members``);
        None while a batch may still grow (``_batch_due`` says when it goes)."""
        spec = self.config.batching.get(head.model)
        if spec is None:
            return [head]
        busy = self.workers.has(head.model, State.BUSY)
        members, due = batching.members(self.queue.of(head.model, head.priority), head, spec, now, hold, busy)
        if due is None:
            return members
        key = (head.model, head.priority)
        self._batch_due[key] = min(due, self._batch_due.get(key, due))
        return None

    def _hand_over_batch(self, members: list[Request], worker: Worker, now: float) -> list[Command]:
        """Grant ``members`` one call on ``worker``; the one its start was for is the cold start."""
        cold_for = worker.reserved_for
        if len(members) == 1:
            return [self._hand_over(members[0], worker, now, cold=cold_for == members[0].id)]
        self.counters["batches"] += 1
        self.counters["batched_requests"] += len(members)
        ids = tuple(r.id for r in members)
        return [self._hand_over(r, worker, now, cold=cold_for == r.id, batch=ids) for r in members]

    def _hand_over(
        self, request: Request, worker: Worker, now: float, cold: bool, batch: tuple[int, ...] = ()
    ) -> Grant:
        if request.spawning is not None and request.spawning != worker.id and request.spawning in self.workers:
            self.workers[request.spawning].reserved_for = None  # that start will serve someone else
        worker.reserved_for = None
        if worker.state is not State.BUSY:  # a batch's first member takes it
            self.workers.move(worker, State.BUSY)
        worker.served += 1
        self.serving[worker.id] = batch or (request.id,)
        self.counters["cold_starts" if cold else "warm_hits"] += 1
        if request.priority == BATCH:
            self.counters["batch_priority_grants"] += 1
        elif (first := self.queue.first(BATCH)) is not None and first.enqueued < request.enqueued:
            self.counters["queue_jumps"] += 1
        self._dequeue(request)
        spawn_ms = worker.spawn_ms if cold else 0.0
        waited = max(0.0, (now - request.enqueued) * 1000 - spawn_ms)
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
            request.attempt,
        )

    def _enqueue(self, request: Request) -> None:
        self.queue.add(request)
        self.requests[request.id] = request

    def _dequeue(self, request: Request) -> None:
        """``request`` leaves the queue (granted, failed or expired); a granted one stays
        in ``requests`` until its call is done."""
        if not request.done:
            request.done = True
            self.queue.remove(request)

    def _fail(self, request: Request, error: WanwuError) -> Fail:
        self._dequeue(request)
        self.requests.pop(request.id, None)
        return Fail(request.id, error)

    # -- stem cells ------------------------------------------------------------------

    def _stem_ok(self, model: str, now: float) -> bool:
        allowed = self.config.stem_models
        if self.config.stem_cells <= 0 or (allowed is not None and model not in allowed):
            return False
        failed = self._stemless.get(model)  # its last load into a stem cell failed: a container for now
        return failed is None or failed.until <= now

    def _adopt(self, model: str, stem_id: str, now: float, request: Request | None) -> LoadWorker:
        """A stem cell becomes ``model``'s worker: it loads while the request waits."""
        worker = self.workers[stem_id]
        self.workers.rename(worker, model)
        self.workers.move(worker, State.STARTING, at=now)
        worker.adopted = True
        worker.gpu_mb += self.config.estimates_mb.get(model, 0.0)
        worker.reserved_for = None if request is None else request.id
        if request is not None:
            self.queue.park(request, stem_id)
        return LoadWorker(stem_id, model, None if request is None else request.id)

    def _refill_stems(self, now: float) -> list[Command]:
        """Keep ``stem_cells`` stem cells starting or ready, in spare slots only: a
        request waiting for a slot, a full pool or stems failing to start come first."""
        if self.closing or self.config.stem_cells <= 0:
            return []
        if self.queue.opened():
            return []
        backoff = self.backoff.get(STEM)
        if backoff is not None and backoff.until > now:
            return []
        commands: list[Command] = []
        stems = sum(1 for state in (State.STARTING, State.IDLE) for _ in self.workers.of(STEM, state))
        # Below the low watermark only, so a stem cell never pushes a GPU into pressure reaping.
        low = replace(self._limits, high_watermark=self._limits.low_watermark)
        while stems < self.config.stem_cells:
            decision = policy.room_for(STEM, self.workers, low, self.readings, self.config.estimates_mb)
            if decision is None:
                break
            commands.append(self._spawn(STEM, decision, now, None))
            stems += 1
        return commands

    # -- workers ---------------------------------------------------------------------

    def _unreserved_start(self, model: str) -> Worker | None:
        return self.workers.first(model, State.STARTING, unreserved=True)

    def _full_and_busy(self, now: float) -> bool:
        """No waiter can be served, failed or rejected now: no room, no idle worker, no
        backoff in force, and no GPU readings (which could reject a model outright)."""
        if not self.queue:
            return True
        if self.readings or len(self.workers) < self._limits.capacity:
            return False
        if any(b.until > now for b in self.backoff.values()):
            return False
        return self.workers.counting(State.IDLE) == 0

    def _spawn(self, model: str, decision: policy.Spawn, now: float, request: Request | None) -> SpawnWorker:
        for victim_id in decision.evict:
            self.workers.move(self.workers[victim_id], None)  # its slot passes to the new worker now
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
        self.workers.add(worker)
        if request is not None:
            self.queue.park(request, worker.id)
        if decision.cpu_fallback:
            self.counters["cpu_fallbacks"] += 1
        request_id = None if request is None else request.id
        return SpawnWorker(worker.id, model, decision.device, decision.evict, request_id, decision.cpu_fallback)

    def _stop(self, worker: Worker, reason: str, now: float) -> StopWorker:
        idle = now - worker.last_used if worker.state is State.IDLE else None
        self.workers.move(worker, State.STOPPING)
        self.reaps[reason] += 1
        return StopWorker(worker.id, worker.model, reason, idle)

    # -- keep-alive ------------------------------------------------------------------

    def _idle(self, worker: Worker, now: float, keep_s: float) -> None:
        if worker.state is not State.IDLE:
            self.workers.move(worker, State.IDLE, at=now)
            if self.queue.parked(worker.model):
                self._freed.add(worker.model)
        worker.keep_s = keep_s
        self._expire_at(now + keep_s, worker, now)

    def _expire_at(self, at: float, worker: Worker, since: float) -> None:
        """``worker`` (idle since ``since``) is due at ``at``. Entries of workers reused
        since go stale; once most are, the heap is rebuilt (a worker kept for ever, or
        for long, would otherwise leave one behind each time it is used)."""
        expiry = self._expiry
        heapq.heappush(expiry, (at, worker.id, since))
        if len(expiry) > 2 * self.workers.counting(State.IDLE) + 64:
            self._expiry = [entry for entry in expiry if self._current(entry)]
            heapq.heapify(self._expiry)

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
            self._expire_at(now + worker.keep_s, worker, now)
            return []
        self.prewarm_at[worker.model] = due
        heapq.heappush(self._prewarms, (due, worker.model))
        return [self._stop(worker, "ttl", now)]

    def _prewarm_due(self, now: float) -> list[Command]:
        commands: list[Command] = []
        heap = self._prewarms
        while heap and heap[0][0] <= now:
            due, model = heapq.heappop(heap)
            if self.prewarm_at.get(model) != due:
                continue  # stale: the request came, or a later pre-warm replaced it
            del self.prewarm_at[model]
            if self.closing or self.workers.live_of(model):
                continue
            backoff = self.backoff.get(model)
            if backoff is not None and backoff.until > now:
                continue
            estimates = self.config.estimates_mb
            stem_ok = self._stem_ok(model, now)
            decision = policy.decide(model, self.workers, self._limits, self.readings, estimates, stem_ok)
            if isinstance(decision, policy.Adopt):
                self.counters["prewarms"] += 1
                commands.append(self._adopt(model, decision.worker_id, now, None))
            elif isinstance(decision, policy.Spawn) and not decision.evict:  # never evict for a guess
                self.counters["prewarms"] += 1
                commands.append(self._spawn(model, decision, now, None))
        return commands

    def _next_prewarm(self) -> float | None:
        heap = self._prewarms
        while heap and self.prewarm_at.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def window(self, model: str) -> Window:
        """The keep-alive window of ``model`` now (cached until its inputs change)."""
        window = self._windows.get(model)
        if window is None:
            window = self.keepalive.window(model, self._limits.ttl(model), self._start_s.get(model, 0.0))
            self._windows[model] = window
        return window

    # -- failures --------------------------------------------------------------------

    def _back_off(self, table: dict[str, Backoff], model: str, now: float, error: WanwuError | str) -> None:
        table.setdefault(model, Backoff()).failed(now, error, self.config.backoff_base_s, self.config.backoff_max_s)

    def backoff_delay(self, backoff: Backoff) -> float:
        return backoff.delay(self.config.backoff_base_s, self.config.backoff_max_s)

    def _waiting_request(self, request_id: int | None) -> Request | None:
        """The request ``request_id`` if it is still waiting."""
        request = None if request_id is None else self.requests.get(request_id)
        return None if request is None or request.done else request

    def waiting(self) -> dict[str, int]:
        """Requests waiting, by priority."""
        return {priority: self.queue.count(priority) for priority in (INTERACTIVE, BATCH)}
