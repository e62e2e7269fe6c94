"""The pool core: the whole behaviour of the warm pool as a state machine without I/O.

No threads, no clock reads, no backend (like h11 for HTTP): the core takes events and
returns commands, through one entry, ``PoolCore.handle``. Two shells drive it:
``WarmPool`` (a lock, threads, an executor, a backend and real time) and
``scheduler.sim.Simulator`` (an event heap in virtual time), so what the tuner predicts
is what the live pool does, retries included.

Events (``scheduler.events``, a closed union; each carries ``now``):
    Arrive        a request for a model came in, with a deadline, a size (images) and
                  a priority (interactive or batch)
    Expire        a waiting request's deadline passed
    Ready         a worker answered its health check
    StartFailed   a worker did not become ready
    Released      a worker call finished (``ok=False``: the worker failed it)
    Died          the backend saw a worker exit
    Stopped       a worker's container is gone
    Tick          time passed (keep-alive ends, pre-warms, held batches), perhaps with
                  fresh GPU readings
    Configure     settings changed; with the catalog's digests, bundles may have been
                  replaced: a replaced (or removed) model's idle workers stop now, busy
                  and starting ones once their requests finish; none is reused
    Retire        one model's bundle was replaced
    Reconcile     what the backend lists after losing its engine
    Close         shutting down: refuse new requests
    StopAll       stop every worker (the end of a shutdown)

Commands (what the shell must carry out):
    SpawnWorker   stop ``evict`` first (their slots pass to the new worker), then start it
    LoadWorker    a stem cell loads a model
    StopWorker    kill and remove a worker, then report ``Stopped``
    RemoveStray   remove a container the core does not track
    Grant         hand a request its lease on a worker (one per request; the requests of
                  one dynamic batch share a worker and name each other in ``batch``)
    Retry         a worker failed the request's call: it waits again, for another worker
    Fail          end a request with an error

Retries: inference is idempotent, so a request whose worker crashes or times out on it
goes back to the queue (at its priority, with a fresh wait) and is served by another
worker; after ``config.attempts`` tries it fails with the worker's error. The failed
worker is stopped, never reused.

A worker's states and their moves are ``workers.py``'s table; how waiters are served
(batching, priority, capacity, stem cells, CPU fallback) is ``rules.py``'s.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any, assert_never

from . import policy
from .backoff import Backoff
from .batching import Request
from .coreconfig import UNBOUNDED, CoreConfig
from .errors import BackendUnavailable, CapacityExhausted, WorkerCrashed, WorkerTimeout
from .events import (
    BATCH,
    INTERACTIVE,
    PRIORITIES,
    Arrive,
    Close,
    Command,
    Configure,
    Died,
    Event,
    Expire,
    Fail,
    Grant,
    LoadWorker,
    Ready,
    Reconcile,
    Released,
    RemoveStray,
    Retire,
    Retry,
    SpawnWorker,
    StartFailed,
    StopAll,
    Stopped,
    StopWorker,
    Tick,
)
from .keepalive import make
from .rules import REAP_REASONS, Rules
from .workers import STEM, State, Worker

__all__ = [
    "BATCH",
    "INTERACTIVE",
    "PRIORITIES",
    "REAP_REASONS",
    "UNBOUNDED",
    "Backoff",
    "Command",
    "CoreConfig",
    "Event",
    "Fail",
    "Grant",
    "LoadWorker",
    "PoolCore",
    "RemoveStray",
    "Request",
    "Retry",
    "SpawnWorker",
    "StopWorker",
    "Worker",
]


class PoolCore(Rules):
    """The pool's state and rules (module doc). Not thread-safe: the shell serialises events."""

    def __init__(self, config: CoreConfig, id_prefix: str = "w", digests: Mapping[str, str] | None = None) -> None:
        super().__init__(config, id_prefix)
        self._digests = dict(digests or {})  # each served bundle's identity, as last configured

    def handle(self, event: Event) -> list[Command]:
        """The one entry: what ``event`` means for the pool, as commands to carry out."""
        match event:
            case Arrive():
                return self._arrive(event)
            case Expire():
                return self._expire(event)
            case Ready():
                return self._ready(event)
            case StartFailed():
                return self._start_failed(event)
            case Released():
                return self._released(event)
            case Died():
                return self._died(event.worker_id, event.now, event.reason)
            case Stopped():
                return self._stopped(event)
            case Tick():
                return self._tick(event)
            case Configure():
                return self._configure(event)
            case Retire():
                return self._retire(event.model, event.now)
            case Reconcile():
                return self._reconcile(event)
            case Close():
                return self._close()
            case StopAll():
                return self._stop_all(event.now)
            case _:
                assert_never(event)

    # -- requests --------------------------------------------------------------------

    def _arrive(self, event: Arrive) -> list[Command]:
        if event.priority not in PRIORITIES:
            raise ValueError(f"priority is {event.priority!r}; expected one of {', '.join(PRIORITIES)}")
        request = Request(
            event.request_id,
            event.model,
            event.deadline,
            event.now,
            size=event.size,
            priority=event.priority,
            wait_s=event.deadline - event.now,
            tries=self.config.attempts if event.tries is None else event.tries,
        )
        refused = self._admit(request, event.now)
        if refused is not None:
            return [refused]
        self.keepalive.observe(event.model, event.now)
        self._windows.pop(event.model, None)
        self._last_arrival[event.model] = event.now
        return self._dispatch(event.now)

    def _admit(self, request: Request, now: float) -> Fail | None:
        """Queue ``request`` (a new one, or one sent round again), or say why not."""
        if self.closing:
            return Fail(request.id, BackendUnavailable("the pool is shutting down"))
        # Each priority has its own room: waiting batch work never turns interactive requests away.
        waiting = self.queue.count(request.priority)
        if waiting >= max(1, self.config.queue_max):
            self.counters["rejected"] += 1
            error = CapacityExhausted(f"the wait queue is full ({waiting} requests)", self.config.retry_after_s)
            return Fail(request.id, error)
        if request.priority == INTERACTIVE:
            self._last_interactive = now
        self.prewarm_at.pop(request.model, None)  # the request itself is here
        self._enqueue(request)
        return None

    def _expire(self, event: Expire) -> list[Command]:
        """A deadline passed; a start under way for the request goes on and serves the next waiter."""
        request = self._waiting_request(event.request_id)
        if request is None or request.attempt != event.attempt:
            return []
        if request.spawning is not None and request.spawning in self.workers:
            self.workers[request.spawning].reserved_for = None
        self.counters["timeouts"] += 1
        capacity = "unbounded" if self.config.capacity <= 0 else str(self.config.capacity)
        error = CapacityExhausted(
            f"no {request.model} worker became free within {request.wait_s:.1f} s "
            f"({len(self.workers)}/{capacity} workers, {len(self.queue) - 1} waiting)",
            self.config.retry_after_s,
        )
        return [self._fail(request, error)]

    def _released(self, event: Released) -> list[Command]:
        """A call on a worker finished. ``ok=False``: the worker failed it (``reason``:
        crashed or timeout) and is replaced rather than reused; its requests are tried
        again on another worker while they have tries left."""
        worker, now = self.workers.get(event.worker_id), event.now
        # The call's requests are settled whatever became of the worker meanwhile (a
        # shutdown may have stopped it under them): their threads wait on the answer.
        settled = self._settle(event.worker_id, event, now)
        if worker is None or worker.state is not State.BUSY:
            return settled
        commands: list[Command] = []
        window = self.window(worker.model)
        if event.ok and worker.retired and worker.dead is None:
            commands.append(self._stop(worker, "replaced", now))
        elif event.ok and worker.dead is None and not self.closing:
            self._idle(worker, now, window.keep_s)
        elif not event.ok or worker.dead is not None:
            commands.append(self._stop(worker, event.reason if not event.ok else "crashed", now))
        else:  # a sound worker finishing during a shutdown
            commands.append(self._stop(worker, "shutdown", now))
        commands += settled
        commands += self._dispatch(now)
        if window.prewarm_s > 0 and self._current((0.0, worker.id, now)):  # nobody took it
            commands += self._unload_until_prewarm(worker, window, now)
        return commands

    def _settle(self, worker_id: str, event: Released, now: float) -> list[Command]:
        """The requests of the call on ``worker_id`` are done; if it failed, each goes
        round again or fails (``_again``)."""
        commands: list[Command] = []
        for request_id in self.serving.pop(worker_id, ()):
            request = self.requests.pop(request_id, None)
            if request is not None and not event.ok:
                commands.append(self._again(request, event, now))
        return commands

    def _again(self, request: Request, event: Released, now: float) -> Retry | Fail:
        """A request its worker failed: back to the queue for another try (not while the
        pool shuts down: ``_admit`` fails it then), or its error."""
        error = event.error
        if error is None:
            kind = WorkerTimeout if event.reason == "timeout" else WorkerCrashed
            error = kind(f"worker {event.worker_id} failed the call ({event.reason})", event.worker_id)
        if request.attempt >= request.tries:
            return Fail(request.id, error)
        request.attempt += 1
        request.deadline, request.enqueued = now + request.wait_s, now
        request.done = False
        self.queue.park(request, None)
        refused = self._admit(request, now)
        if refused is not None:
            return refused
        self.counters["retries"] += 1
        return Retry(request.id, request.attempt, request.deadline, error)

    # -- workers ---------------------------------------------------------------------

    def _ready(self, event: Ready) -> list[Command]:
        """A worker started and answered its health check."""
        worker, now = self.workers.get(event.worker_id), event.now
        if worker is None:  # stopped while it was starting (a shutdown): stop what came up
            return [StopWorker(event.worker_id, "", "shutdown")]
        if worker.state not in (State.STARTING, State.STOPPING):
            return []  # a second report of a start already seen: nothing starts twice
        self.backoff.pop(worker.model, None)
        worker.spawn_ms = event.spawn_ms
        worker.spawn_breakdown = dict(event.breakdown or {})
        if not worker.stem and not worker.adopted:  # the pre-warm lead: what a container takes, conservatively
            self._start_s[worker.model] = event.spawn_ms / 1000
        self.start_ms["stem" if worker.stem else ("load" if worker.adopted else "container")] = event.spawn_ms
        self._windows.pop(worker.model, None)
        gpu_mb = event.gpu_mb
        if gpu_mb is not None and gpu_mb > 0 and not worker.cpu_fallback:
            # A stem cell reports what its allocator holds, not the CUDA context: keep the estimate.
            worker.gpu_mb = max(worker.gpu_mb, float(gpu_mb)) if worker.stem else float(gpu_mb)
        waiting = self._waiting_request(worker.reserved_for)
        if worker.retired and not self.closing and worker.state is not State.STOPPING:
            # It may have loaded the old bundle: its request waits on for a fresh start.
            if waiting is not None:
                self.queue.park(waiting, None)
            return [self._stop(worker, "replaced", now), *self._dispatch(now)]
        if worker.state is State.STOPPING or self.closing:
            commands: list[Command] = [self._stop(worker, "shutdown", now)]
            if waiting is not None:
                commands.append(self._fail(waiting, BackendUnavailable("the pool is shutting down")))
            return commands
        commands = []
        if worker.stem:
            self.workers.move(worker, State.IDLE, at=now)  # a stem cell waits for a model: no keep-alive
            commands += self._trim_stems(now)  # fewer may be wanted since it started
        else:
            self._idle(worker, now, self.window(worker.model).keep_s)
        if waiting is not None and waiting.priority == BATCH and self._interactive_waits(worker.model):
            # Interactive waiters go first, even for a worker started for batch work.
            worker.reserved_for = None
            self.queue.park(waiting, None)
        elif waiting is not None:  # it waited for a start: take its companions without more waiting
            # (even over a lowered N: its request has waited for it; it stops when idle)
            commands += self._hand_over_batch(self._members(waiting, now, hold=False) or [waiting], worker, now)
        return commands + self._dispatch(now)

    def _start_failed(self, event: StartFailed) -> list[Command]:
        """A worker did not become ready: its model backs off (1 s, doubling to the
        maximum) and the request it was started for gets the error."""
        worker, now, error = self.workers.get(event.worker_id), event.now, event.error
        if worker is None or worker.state not in (State.STARTING, State.STOPPING):
            return []  # gone, or a start already seen to succeed
        commands: list[Command] = []
        waiting = self._waiting_request(worker.reserved_for)
        if worker.adopted and worker.state is State.STARTING:
            # A stem cell that failed to load is never reused. The model gets its own
            # container instead (for the same backoff as a failed start would give it):
            # if the bundle is broken, that start fails too and says why, like any start.
            commands.append(self._stop(worker, "load_failed", now))
            self.counters["load_failures"] += 1
            self._back_off(self._stemless, worker.model, now, error)
            if waiting is not None:
                self.queue.park(waiting, None)  # it waits on: dispatch starts a container for it
            return commands + self._dispatch(now)
        self.workers.move(worker, None)  # the backend has already removed a container that failed to start
        self.counters["spawn_failures"] += 1
        self._back_off(self.backoff, worker.model, now, error)
        if waiting is not None:
            commands.append(self._fail(waiting, error))
        return commands + self._dispatch(now)

    def _died(self, worker_id: str, now: float, reason: str) -> list[Command]:
        """The backend saw ``worker_id`` exit (crash, OOM kill, removal from outside)."""
        worker = self.workers.get(worker_id)
        if worker is None or worker.state in (State.STOPPING, State.STARTING):
            return []  # ours to stop, or its start will notice
        if worker.state is State.BUSY:
            self.workers.mark(worker, "dead", reason)  # the call in flight fails and is tried again
            return []
        if worker.stem:  # a stem cell that dies waiting is a failed start: no restart loop at full speed
            self.counters["spawn_failures"] += 1
            self._back_off(self.backoff, STEM, now, f"stem cell {worker_id} died: {reason}")
        return [self._stop(worker, "crashed", now)]

    def _stopped(self, event: Stopped) -> list[Command]:
        worker = self.workers.get(event.worker_id)
        if worker is None or worker.state is not State.STOPPING:
            return []  # only a worker the core stopped is gone: any other report is stray
        self.workers.move(worker, None)
        return self._dispatch(event.now)

    def _reconcile(self, event: Reconcile) -> list[Command]:
        """After the engine came back: workers whose containers are gone or dead died;
        containers of this pool the core does not track are removed."""
        commands: list[Command] = []
        up = (State.IDLE, State.BUSY)
        lost = [w.id for w in list(self.workers.values()) if w.state in up and not event.listed.get(w.id, False)]
        strays = sorted(set(event.listed) - set(self.workers))
        for worker_id in lost:
            commands += self._died(worker_id, event.now, "gone after an engine restart")
        return commands + [RemoveStray(w) for w in strays]

    # -- time, settings, shutdown ----------------------------------------------------

    def _tick(self, event: Tick) -> list[Command]:
        """Stop idle workers past their keep-alive and, above the GPU high watermark,
        idle workers least recently used first; start workers due to be pre-warmed."""
        now = event.now
        if event.readings is not None:
            self.readings = event.readings
        due = self._due(now)
        keep = {w.id: w.keep_s for w in due}
        victims = [(w, "ttl") for w in policy.expired(due, now, self._limits, keep)]
        chosen = {w for w, _ in victims}
        for worker in due:
            if worker.id not in chosen:  # due by the sum, not yet by the difference: look again later
                self._idle(worker, worker.last_used, worker.keep_s)
        if any(g.fraction > self._limits.high_watermark for g in self.readings):
            idle = list(self.workers.in_state(State.IDLE))
            pressure = policy.under_pressure(idle, self.readings, self._limits)
            victims += [(w, "gpu_pressure") for w in pressure if w not in chosen]
        commands: list[Command] = [self._stop(self.workers[w], reason, now) for w, reason in victims]
        commands += self._prewarm_due(now)
        return commands + self._dispatch(now)

    def _configure(self, event: Configure) -> list[Command]:
        """New settings: capacity, TTLs, estimates, keep-alive policy, stem cells. A
        smaller capacity or fewer stem cells stop the surplus: idle workers at once
        (stem cells first, then least recently used), busy and starting ones as soon as
        they are idle (``_trim``, ``_trim_stems``). With digests, replaced bundles'
        workers are retired first."""
        config, now = event.config, event.now
        commands: list[Command] = []
        if event.digests is not None:
            for model in sorted(m for m, digest in self._digests.items() if event.digests.get(m) != digest):
                commands += self._retire(model, now, dispatch=False)
            self._digests = dict(event.digests)
        if config.keepalive != self.config.keepalive:
            self.keepalive = make(config.keepalive)
            self.prewarm_at.clear()
        self.config, self._limits = config, config.limits
        self._windows.clear()
        self._expiry.clear()
        for worker in self.workers.in_state(State.IDLE):  # idle workers get the new keep-alive (stem cells have none)
            if not worker.stem:
                self._idle(worker, worker.last_used, self.window(worker.model).keep_s)
        return commands + self._trim_stems(now) + self._dispatch(now)

    def _retire(self, model: str, now: float, dispatch: bool = True) -> list[Command]:
        """``model``'s bundle changed: no worker that may hold the old one serves again.
        Idle ones stop now; busy and starting ones are marked and stop when done."""
        commands: list[Command] = []
        for state in (State.IDLE, State.STARTING, State.BUSY):
            for worker in self.workers.of(model, state):
                if state is State.IDLE:
                    commands.append(self._stop(worker, "replaced", now))
                else:
                    self.workers.mark(worker, "retired", True)
        self.prewarm_at.pop(model, None)
        return commands + self._dispatch(now) if dispatch else commands

    def _close(self) -> list[Command]:
        """Refuse new requests; waiters without a start under way fail now."""
        self.closing = True
        self.prewarm_at.clear()
        error = BackendUnavailable("the pool is shutting down")
        return [self._fail(r, error) for r in list(self.queue) if r.spawning is None]

    def _stop_all(self, now: float) -> list[Command]:
        """Stop every worker that is not already stopping; requests still waiting (for a
        start that outlived the grace period) fail now, as nothing will serve them."""
        live = [w for w in self.workers.values() if w.state is not State.STOPPING]
        commands: list[Command] = [self._stop(w, "shutdown", now) for w in live]
        error = BackendUnavailable("the pool is shutting down")
        return commands + [self._fail(r, error) for r in list(self.queue)]

    # -- what the shell may read -----------------------------------------------------

    def is_waiting(self, request_id: int) -> bool:
        """Whether ``request_id`` waits in the queue (not served, failed or gone)."""
        return self._waiting_request(request_id) is not None

    def in_flight(self) -> bool:
        return self.workers.counting(State.BUSY, State.STARTING) > 0

    def next_wakeup(self) -> float | None:
        """The earliest time a ``Tick`` would change something (an idle worker's
        keep-alive ending, a pre-warm or a held batch falling due); None if nothing is
        timed. The live shell sleeps until then (or the next event)."""
        expiry = self._expiry
        while expiry and not self._current(expiry[0]):
            heapq.heappop(expiry)
        times = (expiry[0][0] if expiry else None, self._next_prewarm(), self.next_batch_due())
        return min((t for t in times if t is not None), default=None)

    def next_batch_due(self) -> float | None:
        """When the earliest held batch goes (its oldest member has waited long enough),
        or batch work held back by the interactive reserve may start."""
        times = list(self._batch_due.values())
        if self._reserve_until is not None:
            times.append(self._reserve_until)
        return min(times, default=None)

    def describe_keepalive(self) -> dict[str, Any]:
        return {"policy": self.keepalive.name, "models": self.keepalive.describe()}
