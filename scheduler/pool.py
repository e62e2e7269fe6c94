"""The warm pool: leases on worker containers, carried out from the pure policy.

Every decision is taken under one lock by ``scheduler.policy``; what it asks for
(spawning, stopping) runs after the lock is released, on an executor, so several spawns
can run at once and no Docker call ever holds up another request. Requests that cannot
be served at once wait in a bounded FIFO queue until a worker is released or started,
or their deadline passes (CapacityExhausted: the gateway's 503 + Retry-After).

    pool = WarmPool(backend, catalog, settings)
    pool.start()                      # remove this pool id's leftovers, start threads
    answer = pool.predict("demo-shapes", image_bytes, top_k=5)
    pool.shutdown()                   # drain, then remove every container of this pool
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .backends.base import Backend, Connection, SpawnRequest
from .clock import Clock, MonotonicClock
from .errors import (
    BackendUnavailable,
    CapacityExhausted,
    ModelUnavailable,
    WanwuError,
    WorkerCrashed,
    WorkerError,
    WorkerRejected,
    WorkerTimeout,
)
from .gpu import GpuMonitor
from .models import ModelCatalog, ModelInfo
from .policy import State
from .settings import Settings
from .worker_client import WorkerAnswer

log = logging.getLogger(__name__)

REAP_REASONS = ("ttl", "gpu_pressure", "evicted", "crashed", "timeout", "shutdown")
Action = Callable[[], None]


@dataclass
class _Worker:
    id: str
    model: str
    state: State
    last_used: float
    started_at: float
    device: str | None = None
    gpu_mb: float = 0.0
    served: int = 0
    connection: Connection | None = None
    dead: str | None = None  # why, if it died while busy
    reserved_for: _Waiter | None = None
    spawn_ms: float = 0.0
    spawn_breakdown: dict[str, float] = field(default_factory=dict)

    def view(self) -> policy.WorkerView:
        return policy.WorkerView(self.id, self.model, self.state, self.last_used, self.gpu_mb, self.device)


@dataclass(eq=False)
class _Waiter:
    model: str
    deadline: float
    enqueued: float
    event: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None
    error: WanwuError | None = None
    spawning: _Worker | None = None

    @property
    def done(self) -> bool:
        return self.lease is not None or self.error is not None


@dataclass(frozen=True)
class Lease:
    """The right to send one request to one worker; give it back with ``release``."""

    worker_id: str
    model: str
    connection: Connection
    cold_start: bool
    queue_ms: float
    spawn_ms: float
    spawn_breakdown: dict[str, float]


@dataclass(frozen=True)
class PoolAnswer:
    predictions: list[dict[str, Any]]
    model: str
    worker_id: str
    cold_start: bool
    attempts: int
    timing_ms: dict[str, float]


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    model: str
    state: str
    idle_s: float | None
    age_s: float
    gpu_mb: float
    device: str | None
    requests: int


@dataclass(frozen=True)
class PoolSnapshot:
    capacity: int
    workers: list[WorkerInfo]
    queue_depth: int
    counters: dict[str, int]
    reaps: dict[str, int]
    gpus: list[policy.GpuReading]
    backoff: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "queue_depth": self.queue_depth,
            "workers": [w.__dict__ for w in self.workers],
            "counters": self.counters,
            "reaps": self.reaps,
            "gpus": [
                {"device": g.device, "used_mb": round(g.used_mb, 1), "total_mb": round(g.total_mb, 1)}
                for g in self.gpus
            ],
            "backoff_s": self.backoff,
        }


class _Inline(Executor):
    """Runs submitted work at once in the caller's thread (deterministic tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        return None


INLINE = _Inline()


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0
    last_error: str = ""


class WarmPool:
    """A pool of at most ``settings.max_workers`` worker containers across models."""

    def __init__(
        self,
        backend: Backend,
        catalog: ModelCatalog,
        settings: Settings,
        clock: Clock | None = None,
        gpu: GpuMonitor | None = None,
        executor: Executor | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.backend = backend
        self.catalog = catalog
        self.settings = settings
        self.clock = clock or MonotonicClock()
        self.gpu = gpu or GpuMonitor(settings.gpus)
        self._executor = executor or ThreadPoolExecutor(settings.max_workers * 2 + 4, thread_name_prefix="wanwu-pool")
        self._own_executor = executor is None
        self._backoff_base = backoff_base_s
        self._backoff_max = backoff_max_s
        self._lock = threading.Lock()
        self._idle_or_gone = threading.Condition(self._lock)
        self._workers: dict[str, _Worker] = {}
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._backoff: dict[str, _Backoff] = {}
        self._readings: list[policy.GpuReading] = []
        self._counters = {
            "cold_starts": 0,
            "warm_hits": 0,
            "spawn_failures": 0,
            "retries": 0,
            "rejected": 0,
            "timeouts": 0,
        }
        self._reaps = dict.fromkeys(REAP_REASONS, 0)
        self._closing = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._inputs_version = -1
        self._inputs: tuple[policy.Limits, dict[str, float]] = (
            policy.Limits(settings.max_workers, settings.idle_ttl_s),
            {},
        )
        self._id_prefix = uuid.uuid4().hex[:4]

    # -- lifecycle -----------------------------------------------------------------

    def start(self, background: bool = True) -> list[str]:
        """Remove containers an earlier run of this pool id left, then start the reaper
        and the event watcher. Returns the names of the leftovers removed."""
        removed = self.backend.remove_orphans()
        if removed:
            log.info(
                "removed %d leftover workers of pool %s: %s", len(removed), self.settings.pool_id, ", ".join(removed)
            )
        if background:
            self._spawn_thread("wanwu-reaper", self._reap_loop)
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

    def shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let in-flight ones finish within the grace period, then
        stop every worker of this pool."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            self._closing = True
            for waiter in self._queue:
                if waiter.spawning is None:
                    waiter.error = BackendUnavailable("the pool is shutting down")
                    waiter.event.set()
            deadline = self.clock.now() + grace
            while any(w.state in (State.BUSY, State.STARTING) for w in self._workers.values()):
                left = deadline - self.clock.now()
                if left <= 0:
                    log.warning("shutdown grace of %.1f s is over with requests still in flight", grace)
                    break
                self._idle_or_gone.wait(min(left, 0.1))
            victims = [w for w in self._workers.values() if w.state is not State.STOPPING]
            for worker in victims:
                worker.state = State.STOPPING
        self._stop.set()
        for worker in victims:
            self._stop_worker(worker.id, "shutdown")
        self.backend.close()  # ends the event stream the watcher blocks on
        for thread in self._threads:
            thread.join(timeout=5)
        if self._own_executor:
            self._executor.shutdown(wait=True)
        self.gpu.close()

    # -- leases --------------------------------------------------------------------

    def acquire(self, model: str, deadline: float) -> Lease:
        """A lease on a ready worker of ``model``, or an error by ``deadline``:
        CapacityExhausted (no worker in time, or the queue is full), ModelUnavailable
        (the model is backing off after failed starts), WorkerStartError, UnknownModel,
        BackendUnavailable."""
        info = self.catalog.get(model)
        now = self.clock.now()
        with self._lock:
            if self._closing:
                raise BackendUnavailable("the pool is shutting down")
            if len(self._queue) >= max(1, self.settings.queue_max):
                self._counters["rejected"] += 1
                raise CapacityExhausted(f"the wait queue is full ({len(self._queue)} requests)", self._retry_after())
            waiter = _Waiter(info.name, deadline, now)
            self._queue.append(waiter)
            actions = self._dispatch()
        self._run(actions)
        self.clock.wait(waiter.event, deadline - self.clock.now())
        with self._lock:
            if not waiter.done:
                # Out of time. A spawn under way for it goes on and serves the next waiter.
                if waiter in self._queue:
                    self._queue.remove(waiter)
                if waiter.spawning is not None:
                    waiter.spawning.reserved_for = None
                self._counters["timeouts"] += 1
                waiter.error = CapacityExhausted(
                    f"no {model} worker became free within {deadline - waiter.enqueued:.1f} s "
                    f"({len(self._workers)}/{self.settings.max_workers} workers, {len(self._queue)} waiting)",
                    self._retry_after(),
                )
        if waiter.error is not None:
            raise waiter.error
        assert waiter.lease is not None
        return waiter.lease

    def release(self, lease: Lease, ok: bool = True, reason: str = "crashed") -> None:
        """Give a lease back. ``ok=False`` means the worker failed (``reason``:
        crashed or timeout) and is replaced rather than reused."""
        now = self.clock.now()
        actions: list[Action] = []
        with self._lock:
            worker = self._workers.get(lease.worker_id)
            if worker is None or worker.state is not State.BUSY:
                return
            worker.served += 1
            if ok and worker.dead is None and not self._closing:
                worker.state = State.IDLE
                worker.last_used = now
            else:
                worker.state = State.STOPPING
                why = reason if not ok else "crashed"
                log.warning("worker %s (model %s) removed: %s", worker.id, worker.model, worker.dead or why)
                actions.append(lambda: self._stop_worker(worker.id, why))
            actions += self._dispatch()
            self._idle_or_gone.notify_all()
        self._run(actions)

    def predict(
        self,
        model: str,
        image: bytes,
        top_k: int = 5,
        queue_timeout_s: float | None = None,
        request_timeout_s: float | None = None,
    ) -> PoolAnswer:
        """Classify ``image`` on a worker of ``model``. A worker that crashes or times
        out is removed and the request is retried once on another (inference is
        idempotent); a second failure is raised (WorkerCrashed or WorkerTimeout)."""
        queue_timeout = self.settings.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
        request_timeout = self.settings.request_timeout_s if request_timeout_s is None else request_timeout_s
        queue_ms = spawn_ms = 0.0
        cold = False
        for attempt in (1, 2):
            lease = self.acquire(model, self.clock.now() + queue_timeout)
            queue_ms += lease.queue_ms
            spawn_ms += lease.spawn_ms
            cold = cold or lease.cold_start
            try:
                answer = lease.connection.predict(image, top_k, timeout=request_timeout)
            except WorkerRejected:
                self.release(lease, ok=True)
                raise
            except (WorkerCrashed, WorkerTimeout) as exc:
                self.release(lease, ok=False, reason="timeout" if isinstance(exc, WorkerTimeout) else "crashed")
                if attempt == 2:
                    raise
                with self._lock:
                    self._counters["retries"] += 1
                log.warning("retrying on another worker after: %s", exc)
                continue
            self.release(lease, ok=True)
            return PoolAnswer(
                answer.predictions,
                lease.model,
                lease.worker_id,
                cold,
                attempt,
                _timing(answer, queue_ms, spawn_ms, lease.spawn_breakdown),
            )
        raise AssertionError("unreachable")

    # -- what the policy asks for ----------------------------------------------------

    def _views(self) -> list[policy.WorkerView]:
        return [w.view() for w in self._workers.values()]

    def _limits(self) -> policy.Limits:
        return self._policy_inputs()[0]

    def _estimates(self) -> dict[str, float]:
        return self._policy_inputs()[1]

    def _policy_inputs(self) -> tuple[policy.Limits, dict[str, float]]:
        """Limits (with per-model TTLs) and GPU estimates, rebuilt only when the catalog
        changes: they are read on every request."""
        if self._inputs_version != self.catalog.version:
            models = self.catalog.all()
            ttl = {m.name: m.idle_ttl_s for m in models if m.idle_ttl_s is not None}
            limits = policy.Limits(
                self.settings.max_workers,
                self.settings.idle_ttl_s,
                ttl,
                self.settings.gpu_high_watermark,
                self.settings.gpu_low_watermark,
            )
            self._inputs = (limits, {m.name: float(m.gpu_memory_mb) for m in models})
            self._inputs_version = self.catalog.version
        return self._inputs

    def _dispatch(self) -> list[Action]:
        """Serve waiters in FIFO order as far as the policy allows (lock held)."""
        actions: list[Action] = []
        now = self.clock.now()
        limits, estimates = self._limits(), self._estimates()
        for waiter in list(self._queue):
            if waiter.done:
                self._queue.remove(waiter)
                continue
            decision = policy.decide(waiter.model, self._views(), limits, self._readings, estimates)
            backoff = self._backoff.get(waiter.model)
            if not isinstance(decision, policy.Reuse) and waiter.spawning is None and backoff and backoff.until > now:
                # Its workers keep failing to start: an idle one still serves, a new one is not tried yet.
                self._fail(waiter, self._backoff_error(waiter.model, backoff, now))
            elif isinstance(decision, policy.Reuse):
                self._hand_over(waiter, self._workers[decision.worker_id], now)
            elif isinstance(decision, policy.Spawn) and waiter.spawning is None:
                actions.append(self._begin_spawn(waiter, decision, now))
            elif isinstance(decision, policy.Reject):
                self._fail(waiter, CapacityExhausted(decision.reason, self._retry_after()))
        return actions

    def _hand_over(self, waiter: _Waiter, worker: _Worker, now: float) -> None:
        cold = worker.reserved_for is waiter
        if waiter.spawning is not None and waiter.spawning is not worker:
            waiter.spawning.reserved_for = None  # that spawn will serve someone else
        worker.reserved_for = None
        worker.state = State.BUSY
        self._counters["cold_starts" if cold else "warm_hits"] += 1
        spawn_ms = worker.spawn_ms if cold else 0.0
        waited = max(0.0, (now - waiter.enqueued) * 1000 - spawn_ms)
        assert worker.connection is not None
        waiter.lease = Lease(
            worker.id,
            worker.model,
            worker.connection,
            cold,
            round(waited, 3),
            spawn_ms,
            dict(worker.spawn_breakdown) if cold else {},
        )
        self._queue.remove(waiter)
        waiter.event.set()

    def _fail(self, waiter: _Waiter, error: WanwuError) -> None:
        waiter.error = error
        if waiter in self._queue:
            self._queue.remove(waiter)
        waiter.event.set()

    def _begin_spawn(self, waiter: _Waiter, decision: policy.Spawn, now: float) -> Action:
        evicted = []
        for victim_id in decision.evict:
            victim = self._workers.pop(victim_id)  # its slot passes to the new worker now
            log.info("evicting worker %s (model %s) for a %s worker", victim.id, victim.model, waiter.model)
            evicted.append(victim)
        worker_id = f"{self._id_prefix}{next(self._ids):04d}"
        worker = _Worker(
            worker_id,
            waiter.model,
            State.STARTING,
            now,
            now,
            decision.device,
            gpu_mb=self._estimates().get(waiter.model, 0.0),
            reserved_for=waiter,
        )
        self._workers[worker_id] = worker
        waiter.spawning = worker
        info = self.catalog.get(waiter.model)
        log.info(
            "spawning worker %s for model %s%s",
            worker_id,
            waiter.model,
            f" on GPU {decision.device}" if decision.device else "",
        )
        return self._later(self._spawn_job, worker, info, [v.id for v in evicted])

    def _spawn_job(self, worker: _Worker, info: ModelInfo, evict: list[str]) -> None:
        # Evicted containers go first, so the engine never holds more than N.
        for victim_id in evict:
            self._stop_container(victim_id, "evicted")
        started_at = self.clock.now()
        try:
            started = self.backend.spawn(SpawnRequest(worker.id, worker.model, info.path, worker.device))
            connection = self.backend.connect(worker.id, self.settings.request_timeout_s)
        except WanwuError as exc:
            self._spawn_failed(worker, exc)
            return
        except Exception as exc:  # a backend bug must not leave a waiter hanging
            log.exception("spawning worker %s failed unexpectedly", worker.id)
            self._spawn_failed(worker, WorkerError(f"spawning worker {worker.id} failed: {exc}", worker.id))
            return
        now = self.clock.now()
        with self._lock:
            self._backoff.pop(worker.model, None)
            worker.connection = connection
            worker.spawn_ms = round((now - started_at) * 1000, 3)
            worker.spawn_breakdown = started.timing_ms
            gpu_mb = started.health.get("gpu_memory_mb")
            if isinstance(gpu_mb, (int, float)) and gpu_mb > 0:
                worker.gpu_mb = float(gpu_mb)
            if worker.state is State.STOPPING or self._closing:
                actions: list[Action] = [lambda: self._stop_worker(worker.id, "shutdown")]
                waiter = worker.reserved_for
                if waiter is not None and not waiter.done:
                    self._fail(waiter, BackendUnavailable("the pool is shutting down"))
            else:
                log.info("worker %s (model %s) ready in %.0f ms", worker.id, worker.model, worker.spawn_ms)
                worker.state = State.IDLE
                worker.last_used = now
                waiter = worker.reserved_for
                if waiter is not None and not waiter.done:
                    self._hand_over(waiter, worker, now)
                actions = self._dispatch()
            self._idle_or_gone.notify_all()
        self._run(actions)

    def _spawn_failed(self, worker: _Worker, exc: WanwuError) -> None:
        now = self.clock.now()
        with self._lock:
            self._workers.pop(worker.id, None)
            self._counters["spawn_failures"] += 1
            backoff = self._backoff.setdefault(worker.model, _Backoff())
            backoff.failures += 1
            delay = min(self._backoff_max, self._backoff_base * 2 ** (backoff.failures - 1))
            backoff.until = now + delay
            backoff.last_error = str(exc).splitlines()[0][:300]
            log.error(
                "worker %s for model %s failed to start (%d in a row; next try in %.0f s): %s",
                worker.id,
                worker.model,
                backoff.failures,
                delay,
                exc,
            )
            waiter = worker.reserved_for
            if waiter is not None and not waiter.done:
                self._fail(waiter, exc)
            actions = self._dispatch()
            self._idle_or_gone.notify_all()
        self._run(actions)

    @staticmethod
    def _backoff_error(model: str, backoff: _Backoff, now: float) -> ModelUnavailable:
        wait = backoff.until - now
        return ModelUnavailable(
            f"model {model} failed to start {backoff.failures} time(s) in a row; next try in {wait:.1f} s. "
            f"Last error: {backoff.last_error}",
            retry_after_s=wait,
        )

    def _retry_after(self) -> float:
        return max(1.0, min(self.settings.queue_timeout_s, 5.0))

    def _stop_worker(self, worker_id: str, reason: str) -> None:
        """Stop a worker whose record is STOPPING, then forget it and serve waiters."""
        self._stop_container(worker_id, reason)
        with self._lock:
            self._workers.pop(worker_id, None)
            actions = self._dispatch()
            self._idle_or_gone.notify_all()
        self._run(actions)

    def _stop_container(self, worker_id: str, reason: str) -> None:
        try:
            self.backend.stop(worker_id)
        except WanwuError as exc:
            log.error("stopping worker %s (%s) failed: %s", worker_id, reason, exc)
        with self._lock:
            self._reaps[reason] += 1
        log.info("worker %s stopped: %s", worker_id, reason)

    def _run(self, actions: Iterable[Action]) -> None:
        for action in actions:
            action()

    # -- reaping and events -----------------------------------------------------------

    def reap(self, now: float | None = None, readings: list[policy.GpuReading] | None = None) -> list[tuple[str, str]]:
        """Stop idle workers past their TTL and, under GPU pressure, idle workers least
        recently used first. Returns (worker id, reason) pairs."""
        readings = self.gpu.readings() if readings is None else readings
        now = self.clock.now() if now is None else now
        with self._lock:
            self._readings = readings
            views, limits = self._views(), self._limits()
            victims = [(w, "ttl") for w in policy.expired(views, now, limits)]
            chosen = {w for w, _ in victims}
            victims += [(w, "gpu_pressure") for w in policy.under_pressure(views, readings, limits) if w not in chosen]
            for worker_id, reason in victims:
                worker = self._workers[worker_id]
                worker.state = State.STOPPING
                idle = now - worker.last_used
                log.info("reaping worker %s (model %s): %s after %.1f s idle", worker_id, worker.model, reason, idle)
            actions = [self._stop_action(w, r) for w, r in victims] + self._dispatch()
        self._run(actions)
        return victims

    def _stop_action(self, worker_id: str, reason: str) -> Action:
        return self._later(self._stop_worker, worker_id, reason)

    def _later(self, fn: Callable[..., None], *args: Any) -> Action:
        """An action that hands ``fn(*args)`` to the executor."""

        def action() -> None:
            self._executor.submit(fn, *args)

        return action

    def on_worker_exit(self, worker_id: str, reason: str) -> None:
        """The backend saw a worker die (exit, OOM kill, removal from outside)."""
        actions: list[Action] = []
        with self._lock:
            worker = self._workers.get(worker_id)
            if worker is None or worker.state in (State.STOPPING, State.STARTING):
                return  # ours to stop, or the spawn itself will notice
            if worker.state is State.BUSY:
                worker.dead = reason  # the request in flight fails and is retried
                return
            log.warning("worker %s (model %s) died while idle: %s", worker_id, worker.model, reason)
            worker.state = State.STOPPING
            actions.append(self._stop_action(worker_id, "crashed"))
        self._run(actions)

    def reconcile(self) -> None:
        """After losing the engine: forget workers whose containers are gone or dead,
        and remove containers of this pool the pool does not track (a removal that
        failed while the engine was down leaves one behind)."""
        try:
            listed = self.backend.list_workers()
        except WanwuError as exc:
            log.warning("cannot reconcile with the engine: %s", exc)
            return
        running = {w.worker_id for w in listed if w.running}
        with self._lock:
            tracked = set(self._workers)
            lost = [w.id for w in self._workers.values() if w.state in (State.IDLE, State.BUSY) and w.id not in running]
        for worker_id in lost:
            self.on_worker_exit(worker_id, "gone after an engine restart")
        for stray in sorted({w.worker_id for w in listed} - tracked):
            log.info("removing container of worker %s, which this pool no longer tracks", stray)
            try:
                self.backend.stop(stray)
            except WanwuError as exc:
                log.error("removing stray worker %s failed: %s", stray, exc)

    # -- introspection ----------------------------------------------------------------

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """The backend's checks, the default model's bundle, and whether we are open."""
        checks = self.backend.readiness()
        try:
            model = self.catalog.get(self.settings.default_model)
            checks["model"] = (True, f"{model.name} ({model.path})")
        except WanwuError as exc:
            checks["model"] = (False, str(exc))
        checks["pool"] = (not self._closing, "shutting down" if self._closing else "accepting requests")
        return checks

    def snapshot(self) -> PoolSnapshot:
        now = self.clock.now()
        with self._lock:
            workers = [
                WorkerInfo(
                    w.id,
                    w.model,
                    w.state.value,
                    round(now - w.last_used, 3) if w.state is State.IDLE else None,
                    round(now - w.started_at, 3),
                    w.gpu_mb,
                    w.device,
                    w.served,
                )
                for w in sorted(self._workers.values(), key=lambda w: w.started_at)
            ]
            backoff = {m: round(b.until - now, 3) for m, b in self._backoff.items() if b.until > now}
            return PoolSnapshot(
                self.settings.max_workers,
                workers,
                len(self._queue),
                dict(self._counters),
                dict(self._reaps),
                list(self._readings),
                backoff,
            )


def _timing(answer: WorkerAnswer, queue_ms: float, spawn_ms: float, breakdown: dict[str, float]) -> dict[str, float]:
    worker = answer.timing_ms
    timing = {
        "queue": round(queue_ms, 3),
        "spawn": round(spawn_ms, 3),
        "worker": float(worker.get("total", 0.0)),
        "inference": float(worker.get("inference", 0.0)),
        "round_trip": answer.round_trip_ms,
    }
    timing.update({f"spawn_{k}": v for k, v in breakdown.items()})
    return timing
