"""The warm pool: the live shell around the pool core (``scheduler.core``).

The core decides everything from events; this shell keeps the lock, the threads, the
leases and the I/O. It feeds the core events under one lock, with real time, and carries
out its commands: grants, retries and failures wake the waiting thread; starts and stops
run after the lock is released, on an executor, so several can run at once and no Docker
call holds up another request. A timer thread ticks the core at its next wake-up (a
keep-alive ending, a pre-warm, a held batch), exactly; the reaper thread reads GPU memory
and polls the models directory every ``WANWU_REAP_INTERVAL_S``.

Beside it: ``calls`` (worker calls on leases: ``predict``, ``predict_batch``, dynamic
batches), ``starts`` (carrying out starts and stops), ``reconfigure`` (settings changed
at run time), ``snapshot`` (what it reports), ``scoring`` (shaping answers: top_k,
label subsets).

    pool = WarmPool(backend, catalog, settings)
    pool.start()                      # remove this pool id's leftovers, start threads
    answer = pool.predict("general", image_bytes, top_k=5)
    answers = pool.predict_batch("general", [a, b, c], priority="batch")
    pool.shutdown()                   # drain, then remove every container of this pool
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import assert_never

from . import events as ev
from . import policy
from .backends.base import Backend, Connection, RemovesOrphans
from .calls import BatchAnswer, Calls, Lease, PoolAnswer, _Batch, _Waiter
from .clock import Clock, MonotonicClock
from .core import BATCH, INTERACTIVE, PRIORITIES, REAP_REASONS, PoolCore
from .coreconfig import CoreConfig
from .errors import WanwuError, WorkerTimeout
from .events import Command, Event
from .gpu import GpuMonitor, GpuReader
from .models import ModelCatalog
from .policy import State
from .reconfigure import Reconfigure
from .scoring import LabelSubset
from .settings import Settings
from .snapshot import PoolSnapshot, WorkerInfo, readiness, take_snapshot
from .starts import INLINE, Action, Starts

log = logging.getLogger(__name__)

__all__ = [
    "BATCH",
    "INLINE",
    "INTERACTIVE",
    "REAP_REASONS",
    "BatchAnswer",
    "LabelSubset",
    "Lease",
    "PoolAnswer",
    "PoolSnapshot",
    "WarmPool",
    "WorkerInfo",
]


class WarmPool(Calls, Starts, Reconfigure):
    """A pool of at most ``settings.max_workers`` worker containers across models."""

    def __init__(
        self,
        backend: Backend,
        catalog: ModelCatalog,
        settings: Settings,
        clock: Clock | None = None,
        gpu: GpuReader | None = None,
        executor: Executor | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.settings = settings
        self.clock = clock or MonotonicClock()
        self.gpu: GpuReader = gpu or GpuMonitor(settings.gpus)
        self._executor = executor or ThreadPoolExecutor(settings.max_workers * 2 + 4, thread_name_prefix="wanwu-pool")
        self._own_executor = executor is None
        self._sized_for = settings.max_workers  # the executors' size follows N up (reconfigure)
        self._backoff = (backoff_base_s, backoff_max_s)
        self._lock = threading.Lock()
        self._idle_or_gone = threading.Condition(self._lock)
        self._wake = threading.Condition(self._lock)  # the timer's: the core's next wake-up moved earlier
        self._sleeping_until: float | None = None  # when the timer means to wake (None: not asleep)
        # predict_batch's calls run side by side (an injected executor, as in tests: one after another).
        self._calls: Executor | None = (
            None
            if executor is not None
            else ThreadPoolExecutor(max(4, settings.max_workers * 2), thread_name_prefix="wanwu-batch")
        )
        self._catalog_version = catalog.version
        self._ttl_overrides: dict[str, float] = {}  # per-model TTLs set at run time (reconfigure)
        self.stem_problem: str | None = None  # why stem cells cannot work here (set by scheduler.assembly)
        digests = {m.name: m.digest for m in catalog.all()}  # each served bundle's identity
        self.core = PoolCore(self._core_config(), id_prefix=uuid.uuid4().hex[:4], digests=digests)
        self._waiters: dict[int, _Waiter] = {}
        self._connections: dict[str, Connection] = {}
        self._request_ids = itertools.count(1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.recorder: Callable[[Event, list[Command]], None] | None = None  # sees every event and its commands

    def _core_config(self) -> CoreConfig:
        return CoreConfig.from_settings(self.settings, self.catalog.all(), self._ttl_overrides, self._backoff)

    @property
    def _readings(self) -> list[policy.GpuReading]:
        """The GPU readings the core decides with (tests set them directly)."""
        return self.core.readings

    @_readings.setter
    def _readings(self, readings: list[policy.GpuReading]) -> None:
        self.core.readings = readings

    # -- lifecycle -----------------------------------------------------------------

    def start(self, background: bool = True) -> list[str]:
        """Remove containers an earlier run of this pool id left, start the stem cells,
        the reaper and the event watcher. Returns the names of the leftovers removed."""
        removed = self.backend.remove_orphans() if isinstance(self.backend, RemovesOrphans) else []
        if removed:
            log.info(
                "removed %d leftover workers of pool %s: %s", len(removed), self.settings.pool_id, ", ".join(removed)
            )
        self.reap()  # the first tick starts the stem cells
        if background:
            self._spawn_thread("wanwu-reaper", self._reap_loop)
            self._spawn_thread("wanwu-timer", self._timer_loop)
            self._spawn_thread(
                "wanwu-events", lambda: self.backend.watch(self.on_worker_exit, self.reconcile, self._stop)
            )
        return removed

    def _spawn_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.settings.reap_interval_s):
            try:
                self.reap()
            except Exception:  # the reaper must outlive any one failure
                log.exception("reaper pass failed")

    def _timer_loop(self) -> None:
        """Tick the core at its next wake-up, exactly: sleep until then, or until an
        event moves it earlier (``_apply`` notifies)."""
        with self._lock:
            while not self._stop.is_set():
                try:
                    due, now = self.core.next_wakeup(), self.clock.now()
                    if due is None or due >= now:  # keep-alive ends are strict: wake just past them
                        self._sleeping_until = due
                        # At most an hour at a time: a TTL of "never" (1e10 s) is past what a wait takes.
                        self._wake.wait(None if due is None else min(due - now + 0.001, 3600.0))
                        self._sleeping_until = None
                        continue
                    actions = self._event(ev.Tick(now))  # as wake(), with the lock already held
                    self._lock.release()
                    try:
                        self._run(actions)
                    finally:
                        self._lock.acquire()
                except Exception:  # the timer must outlive any one failure
                    log.exception("timer pass failed")
                    self._sleeping_until = None
                    self._wake.wait(0.1)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let in-flight ones finish within the grace period, then
        stop every worker of this pool."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            self._event(ev.Close(self.clock.now()))
            deadline = self.clock.now() + grace
            while self.core.in_flight():
                left = deadline - self.clock.now()
                if left <= 0:
                    log.warning("shutdown grace of %.1f s is over with requests still in flight", grace)
                    break
                self._idle_or_gone.wait(min(left, 0.1))
            actions = self._event(ev.StopAll(self.clock.now()))
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
        self._run(actions)
        self.backend.close()  # ends the event stream the watcher blocks on
        for thread in self._threads:
            thread.join(timeout=5)
        if self._own_executor:
            self._executor.shutdown(wait=True)
        if self._calls is not None:
            self._calls.shutdown(wait=True)
        self.gpu.close()

    # -- the core, under the lock ------------------------------------------------------

    def _event(self, event: Event) -> list[Action]:
        """Feed one event to the core (lock held) and carry out what it returns:
        grants, retries and failures at once, starts and stops as actions to run unlocked."""
        return self._apply(self._feed(event))

    def _feed(self, event: Event) -> list[Command]:
        commands: list[Command] = []
        if self.catalog.version != self._catalog_version:  # bundles came, went or were replaced
            self._catalog_version = self.catalog.version
            digests = {m.name: m.digest for m in self.catalog.all()}
            commands += self._feed(ev.Configure(self._core_config(), self.clock.now(), digests))
        handled = self.core.handle(event)
        if self.recorder is not None:
            self.recorder(event, handled)
        return commands + handled

    def _apply(self, commands: list[Command]) -> list[Action]:
        actions: list[Action] = []
        batches: dict[tuple[int, ...], _Batch] = {}
        for command in commands:
            if isinstance(command, ev.Grant):
                waiter = self._waiters[command.request_id]
                waiter.lease = self._lease(command, self._connections[command.worker_id], batches)
                waiter.event.set()
            elif isinstance(command, ev.Retry):
                waiter = self._waiters[command.request_id]
                waiter.attempt, waiter.deadline = command.attempt, command.deadline
                log.warning("trying request %d again on another worker after: %s", command.request_id, command.error)
            elif isinstance(command, ev.Fail):
                waiter = self._waiters.pop(command.request_id)
                waiter.error = command.error
                waiter.event.set()
            elif isinstance(command, ev.SpawnWorker):
                actions.append(self._later(self._spawn_job, command))
            elif isinstance(command, ev.LoadWorker):
                actions.append(self._later(self._load_job, command))
            elif isinstance(command, ev.StopWorker):
                self._log_stop(command)
                actions.append(self._later(self._stop_job, command))
            elif isinstance(command, ev.RemoveStray):
                log.info("removing container of worker %s, which this pool no longer tracks", command.worker_id)
                actions.append(self._later(self._stop_container, command.worker_id, "stray"))
            else:
                assert_never(command)
        self._idle_or_gone.notify_all()
        due = self.core.next_wakeup()
        if due is not None and (self._sleeping_until is None or due < self._sleeping_until):
            self._wake.notify()
        return actions

    # -- leases --------------------------------------------------------------------

    def acquire(
        self,
        model: str,
        deadline: float,
        *,
        priority: str = INTERACTIVE,
        images: Sequence[bytes] = (b"",),
        top_k: int = 5,
        subset: LabelSubset | None = None,
        tries: int | None = 1,
    ) -> Lease:
        """A lease on a ready worker of ``model`` for one call carrying ``images``, or
        an error by ``deadline``: CapacityExhausted (no worker in time, or the queue is
        full), ModelUnavailable (the model is backing off after failed starts),
        WorkerStartError, UnknownModel, BackendUnavailable. A lease in a dynamic batch
        (``lease.batch``) shares its worker call with other requests. ``tries``: how
        many workers may serve it (None: the core's ``attempts``); with more than one, a
        failed ``release`` sends it round again and ``wait`` gives its next lease."""
        return self.wait(self.arrive(model, deadline, priority, images, top_k, subset, tries))

    def arrive(
        self,
        model: str,
        deadline: float,
        priority: str = INTERACTIVE,
        images: Sequence[bytes] = (b"",),
        top_k: int = 5,
        subset: LabelSubset | None = None,
        tries: int | None = None,
    ) -> _Waiter:
        """Queue a request (the core's Arrive); ``wait`` for its lease."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority is {priority!r}; expected one of {', '.join(PRIORITIES)}")
        info = self.catalog.get(model)
        with self._lock:
            waiter = _Waiter(next(self._request_ids), deadline, images=images, top_k=top_k, subset=subset)
            self._waiters[waiter.request_id] = waiter
            arrive = ev.Arrive(waiter.request_id, info.name, self.clock.now(), deadline, len(images), priority, tries)
            actions = self._event(arrive)
        self._run(actions)
        return waiter

    def wait(self, waiter: _Waiter) -> Lease:
        """The request's next lease, or its error: the core's Grant or Fail, or its
        deadline passing (an Expire for the try it waits for)."""
        while True:
            self.clock.wait(waiter.event, waiter.deadline - self.clock.now())
            actions: list[Action] = []
            with self._lock:
                if not waiter.event.is_set():
                    actions = self._event(ev.Expire(waiter.request_id, self.clock.now(), waiter.attempt))
                lease, error = waiter.lease, waiter.error
                if lease is not None:  # taken: a failed call's Retry re-arms it for the next Grant
                    waiter.lease = None
                    waiter.event.clear()
                elif error is None and not self.core.is_waiting(waiter.request_id):
                    # Neither granted, failed nor waiting (never happens: the core settles every
                    # request it holds), but a thread must not spin on it: it fails here.
                    self._waiters.pop(waiter.request_id, None)
                    error = WorkerTimeout(f"request {waiter.request_id} lost its worker call")
            self._run(actions)
            if error is not None:
                raise error
            if lease is not None:
                return lease

    def release(self, lease: Lease, ok: bool = True, reason: str = "crashed", error: WanwuError | None = None) -> None:
        """Give a lease back. ``ok=False`` means the worker failed (``reason``:
        crashed or timeout; ``error``: what its requests get if not tried again) and is
        replaced rather than reused. In a dynamic batch only the member that sent the
        call gives the worker back."""
        if lease.member != 0:
            return
        with self._lock:
            if ok:  # its requests are answered (a failed call's are sent round again, or fail)
                for request_id in lease.request_ids():
                    self._waiters.pop(request_id, None)
            actions = self._event(ev.Released(lease.worker_id, self.clock.now(), ok, reason, error))
        self._run(actions)

    # -- reaping and events -----------------------------------------------------------

    def reap(self, now: float | None = None, readings: list[policy.GpuReading] | None = None) -> list[tuple[str, str]]:
        """Read the GPUs and poll the models directory, and tick the core with them:
        under GPU pressure, idle workers stop least recently used first (and anything
        else due by now happens). Returns the (worker id, reason) pairs stopped."""
        readings = self.gpu.readings() if readings is None else readings
        self.catalog.poll()  # a replaced bundle's workers are retired by the feed below
        now = self.clock.now() if now is None else now
        with self._lock:
            commands = self._feed(ev.Tick(now, readings))
            actions = self._apply(commands)
        self._run(actions)
        return [(c.worker_id, c.reason) for c in commands if isinstance(c, ev.StopWorker)]

    def wake(self) -> None:
        """Tick the core now (what the timer thread does at the core's next wake-up)."""
        with self._lock:
            actions = self._event(ev.Tick(self.clock.now()))
        self._run(actions)

    def on_worker_exit(self, worker_id: str, reason: str) -> None:
        """The backend saw a worker die (exit, OOM kill, removal from outside)."""
        with self._lock:
            worker = self.core.workers.get(worker_id)
            if worker is not None and worker.state is State.IDLE:
                log.warning("worker %s (model %s) died while idle: %s", worker_id, worker.model, reason)
            actions = self._event(ev.Died(worker_id, self.clock.now(), reason))
        self._run(actions)

    def reconcile(self) -> None:
        """After losing the engine: the core forgets workers whose containers are gone
        or dead, and removes containers of this pool it does not track (a removal that
        failed while the engine was down leaves one behind)."""
        try:
            listed = self.backend.list_workers()
        except WanwuError as exc:
            log.warning("cannot reconcile with the engine: %s", exc)
            return
        with self._lock:
            actions = self._event(ev.Reconcile({w.worker_id: w.running for w in listed}, self.clock.now()))
        self._run(actions)

    # -- introspection ----------------------------------------------------------------

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """The backend's checks, the default model's bundle, and whether we are open."""
        return readiness(self.backend, self.catalog, self.settings, self.core.closing)

    def snapshot(self) -> PoolSnapshot:
        """The pool as it is now: its workers, queue, counters and live settings."""
        now = self.clock.now()
        with self._lock:
            return take_snapshot(self.core, self.settings, now)
