"""The warm pool: the live shell around the pool core (``scheduler.core``).

The core decides everything (queue, FIFO order, deadlines, reservations, eviction,
backoff, keep-alive) from events; this shell feeds it events under one lock, with real
time, and carries out its commands: grants and failures wake the waiting thread, spawns
and stops run after the lock is released, on an executor, so several spawns can run at
once and no Docker call ever holds up another request. Requests that cannot be served
at once wait until a worker is released or started, or their deadline passes
(CapacityExhausted: the gateway's 503 + Retry-After).

Dynamic batching: when the core grants several requests one worker call (``Grant.batch``),
the first member's thread sends every member's images in one ``/predict_batch`` call and
hands each member its own results; the others wait for that. A held batch (waiting for
more members) goes when the core says: a batcher thread ticks the core at
``next_batch_due``.

    pool = WarmPool(backend, catalog, settings)
    pool.start()                      # remove this pool id's leftovers, start threads
    answer = pool.predict("demo-shapes", image_bytes, top_k=5)
    answers = pool.predict_batch("demo-shapes", [a, b, c], priority="batch")
    pool.shutdown()                   # drain, then remove every container of this pool
"""

from __future__ import annotations

import itertools
import logging
import math
import reprlib
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from wanwu_worker.bundle import labels_digest

from . import policy
from .backends.base import Backend, Connection, SpawnRequest, Started
from .clock import Clock, MonotonicClock
from .core import (
    BATCH,
    INTERACTIVE,
    PRIORITIES,
    REAP_REASONS,
    Command,
    CoreConfig,
    Fail,
    Grant,
    LoadWorker,
    PoolCore,
    SpawnWorker,
    StopWorker,
)
from .errors import (
    INPUT_STATUS,
    BackendUnavailable,
    WanwuError,
    WorkerCrashed,
    WorkerError,
    WorkerRejected,
    WorkerStartError,
    WorkerTimeout,
)
from .gpu import GpuMonitor, GpuReader
from .models import ModelCatalog, ModelInfo
from .policy import STEM, State
from .settings import Settings
from .worker_client import Scores, WorkerAnswer, WorkerBatchAnswer

_UP = (State.IDLE, State.BUSY)

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
Action = Callable[[], None]


@dataclass(eq=False)
class _Waiter:
    """A thread waiting in ``acquire`` for the core's Grant or Fail, with what it will send."""

    event: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None
    error: WanwuError | None = None
    images: Sequence[bytes] = ()
    top_k: int = 5
    subset: LabelSubset | None = None  # the labels to score over; None: all of them


@dataclass(eq=False)
class _Batch:
    """One worker call shared by several requests (a dynamic batch): the first member
    sends it and shapes every member's results, each member takes its own."""

    members: list[_Waiter]
    done: threading.Event = field(default_factory=threading.Event)
    answer: WorkerBatchAnswer | None = None
    error: WanwuError | None = None
    shares: list[list[dict[str, Any]]] = field(default_factory=list)  # each member's results, shaped

    def images(self) -> list[bytes]:
        return [image for member in self.members for image in member.images]

    scores: Scores | None = None  # the raw scores the call asked for, set by the member that sends it

    def shape(self, answer: WorkerBatchAnswer) -> list[list[dict[str, Any]]]:
        """Every member's results, scored over its own labels and cut to its own top_k.
        Raises (WorkerCrashed, or whatever shaping meets) if the answer cannot be shaped."""
        shares, start = [], 0
        for waiter in self.members:
            end = start + len(waiter.images)
            shares.append(
                [_shape(entry, waiter.top_k, waiter.subset, self.scores) for entry in answer.results[start:end]]
            )
            start = end
        return shares

    def finish(
        self,
        answer: WorkerBatchAnswer | None,
        error: WanwuError | None = None,
        shares: list[list[dict[str, Any]]] | None = None,
    ) -> None:
        self.answer, self.error, self.shares = answer, error, shares or []
        self.done.set()

    def share(self, member: int) -> list[dict[str, Any]]:
        """Member ``member``'s results; the call's error if it failed."""
        if self.error is not None:
            raise self.error
        return self.shares[member]


@dataclass(frozen=True)
class LabelSubset:
    """The labels a request scores over (renormalised over them): one of the model's
    named subsets, or labels named in the request (``name`` None)."""

    labels: tuple[str, ...]
    name: str | None = None


def label_scores(info: ModelInfo, subsets: Iterable[LabelSubset | None]) -> Scores | None:
    """The raw scores one worker call asks for to score every request's subset: the
    named subsets by name, the other labels by column; None when no request has one."""
    given = [subset for subset in subsets if subset is not None]
    named = tuple(dict.fromkeys(s.name for s in given if s.name is not None))
    listed = tuple(dict.fromkeys(label for s in given if s.name is None for label in s.labels))
    if not named and not listed:
        return None
    columns = tuple(sorted(info.columns[label] for label in listed))
    in_order = [label for name in named for label in info.subsets[name]] + [info.labels[c] for c in columns]
    labels = tuple(dict.fromkeys(in_order))
    return Scores(named, columns, len(info.labels), labels, labels_digest(labels))


def _shape(entry: dict[str, Any], top_k: int, subset: LabelSubset | None, scores: Scores | None) -> dict[str, Any]:
    """One image's entry as its request asked: the top ``top_k`` predictions over all
    labels, or over ``subset`` (scored from the raw scores the worker gave for
    ``scores.labels``); never the raw scores themselves."""
    shaped = {key: value for key, value in entry.items() if key not in ("logits", "logits_of")}
    if "error" in entry:
        return shaped
    if subset is not None:
        if scores is None or entry.get("logits_of") != scores.digest:
            # The worker loaded another version of the bundle than the catalog knows
            # (replaced while it ran, before the catalog's rescan retired it): its scores
            # are of other labels. Fail loudly.
            raise WorkerCrashed(
                "the worker's raw scores are not of the labels asked for: its bundle differs from the "
                "gateway's catalog (the bundle was replaced; the worker is retired at the next rescan)"
            )
        shaped["predictions"] = subset_predictions(entry.get("logits"), scores.labels, subset.labels, top_k)
    elif isinstance(entry.get("predictions"), list):
        shaped["predictions"] = entry["predictions"][:top_k]
    return shaped


def subset_predictions(logits: Any, asked: Sequence[str], subset: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The top ``top_k`` of ``subset`` with scores renormalised over it: a softmax over
    those labels' raw scores (``logits``, one per label ``asked``), which equals the
    model's probabilities divided by their sum over the subset, without their underflow
    for a model with tens of thousands of labels. Ties keep the subset's order."""
    if not isinstance(logits, list) or len(logits) != len(asked):
        raise WorkerCrashed(f"the worker answered {str(logits)[:80]} for the raw scores of {len(asked)} labels")
    where = {label: index for index, label in enumerate(asked)}
    raw = [float(logits[where[label]]) for label in subset]
    top = max(raw)
    weights = [math.exp(value - top) for value in raw]
    total = sum(weights)
    ranked = sorted(range(len(subset)), key=lambda i: -weights[i])[:top_k]
    return [{"label": subset[i], "score": round(weights[i] / total, 6)} for i in ranked]


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
    start: str = "warm"  # warm, container or stem
    batch: _Batch | None = None  # the dynamic batch it is part of; None: a call of its own
    member: int = 0  # its place in the batch (0 sends the call)
    cpu_fallback: bool = False  # the worker runs on the CPU because no GPU had room for the model


@dataclass(frozen=True)
class PoolAnswer:
    predictions: list[dict[str, Any]]
    model: str
    worker_id: str
    cold_start: bool
    attempts: int
    timing_ms: dict[str, float]
    start: str = "warm"  # how the worker that answered started: warm, container or stem
    batch_size: int = 1  # images in the worker call that answered it
    cpu_fallback: bool = False  # a CPU worker answered because no GPU had room for the model
    embedding: list[float] | None = None  # an embedding model's L2-normalised vector (no predictions)
    dim: int | None = None
    groups: list[dict[str, Any]] | None = None  # coarse groups' scores, for a model with groups


@dataclass(frozen=True)
class _Call:
    """What one worker call (up to the model's max batch size) gave one request."""

    results: list[dict[str, Any]]  # per image: {"predictions"} or {"error": {code, message}}
    worker_id: str
    cold_start: bool
    attempts: int
    timing_ms: dict[str, float]
    start: str
    batch_size: int
    cpu_fallback: bool = False


@dataclass(frozen=True)
class BatchAnswer:
    """``predict_batch``'s outcome, image by image in the order given: the worker's
    entry (``{"predictions"}`` or ``{"error": {"code", "message"}}``), or the
    WanwuError that failed the call carrying that image (no capacity, worker failed)."""

    results: list[dict[str, Any] | WanwuError]
    model: str
    calls: int  # requests it was split into (each up to the model's max batch size)
    cold_start: bool
    timing_ms: dict[str, float]  # queue and spawn: the longest of its calls; worker: their sum
    cpu_fallback: bool = False  # at least one of its calls ran on a CPU fallback worker


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
    settings: dict[str, Any] = field(default_factory=dict)
    keepalive: dict[str, Any] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # by priority

    def to_json(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "queue_depth": self.queue_depth,
            "waiting": self.waiting,
            "workers": [w.__dict__ for w in self.workers],
            "counters": self.counters,
            "reaps": self.reaps,
            "gpus": [
                {"device": g.device, "used_mb": round(g.used_mb, 1), "total_mb": round(g.total_mb, 1)}
                for g in self.gpus
            ],
            "backoff_s": self.backoff,
            "settings": self.settings,
            "keepalive": self.keepalive,
        }


class _Inline(Executor):
    """Runs submitted work at once in the caller's thread (deterministic tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        return None


INLINE = _Inline()


class WarmPool:
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
        self._batch_wake = threading.Condition(self._lock)  # a batch is held: the batcher's timer
        # predict_batch's calls run side by side (an injected executor, as in tests: one after another).
        self._calls: Executor | None = (
            None
            if executor is not None
            else ThreadPoolExecutor(max(4, settings.max_workers * 2), thread_name_prefix="wanwu-batch")
        )
        self._catalog_version = catalog.version
        self._digests = {m.name: m.digest for m in catalog.all()}  # each served bundle's identity, as last fed
        self._ttl_overrides: dict[str, float] = {}  # per-model TTLs set at run time (reconfigure)
        self.stem_problem: str | None = None  # why stem cells cannot work here (set by the factory)
        self.core = PoolCore(self._core_config(), id_prefix=uuid.uuid4().hex[:4])
        self._waiters: dict[int, _Waiter] = {}
        self._connections: dict[str, Connection] = {}
        self._request_ids = itertools.count(1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.recorder: Callable[[str, tuple[Any, ...], list[Command]], None] | None = None

    def _core_config(self) -> CoreConfig:
        models = self.catalog.all()
        s = self.settings
        root = s.models_dir.resolve()
        return CoreConfig(
            capacity=s.max_workers,
            default_ttl_s=s.idle_ttl_s,
            model_ttl_s={
                **{m.name: m.idle_ttl_s for m in models if m.idle_ttl_s is not None},
                **self._ttl_overrides,
            },
            estimates_mb={**{m.name: float(m.gpu_memory_mb) for m in models}, STEM: s.stem_gpu_mb if s.gpus else 0.0},
            high_watermark=s.gpu_high_watermark,
            low_watermark=s.gpu_low_watermark,
            queue_max=s.queue_max,
            retry_after_s=max(1.0, min(s.queue_timeout_s, 5.0)),
            backoff_base_s=self._backoff[0],
            backoff_max_s=self._backoff[1],
            keepalive=s.keepalive,
            tick_s=s.reap_interval_s,
            stem_cells=s.stem_cells,
            batching={m.name: (m.batching.max_batch_size, m.batching.max_wait_ms / 1000) for m in models if m.batching},
            interactive_reserve_s=s.interactive_reserve_s,
            # Without GPUs every worker is a CPU one: there is nothing to fall back from.
            cpu_fallback=frozenset(m.name for m in models if m.cpu_fallback) if s.gpus else frozenset(),
            # A stem cell sees the models directory: bundles linked in from elsewhere start their own containers.
            stem_models=frozenset(m.name for m in models if m.path.parent == root),
        )

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
        removed = self.backend.remove_orphans()
        if removed:
            log.info(
                "removed %d leftover workers of pool %s: %s", len(removed), self.settings.pool_id, ", ".join(removed)
            )
        self.reap()  # the first tick starts the stem cells
        if background:
            self._spawn_thread("wanwu-reaper", self._reap_loop)
            self._spawn_thread("wanwu-batcher", self._batch_loop)
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

    def _batch_loop(self) -> None:
        """Tick the core when a held batch is due (its oldest member has waited long enough)."""
        with self._lock:
            while not self._stop.is_set():
                due, now = self.core.next_batch_due(), self.clock.now()
                if due is None or due > now:
                    self._batch_wake.wait(1.0 if due is None else due - now)
                    continue
                try:
                    actions = self._event("tick", now)
                    self._lock.release()
                    try:
                        self._run(actions)
                    finally:
                        self._lock.acquire()
                except Exception:  # the batcher must outlive any one failure
                    log.exception("batcher pass failed")
                    self._batch_wake.wait(0.1)

    def shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let in-flight ones finish within the grace period, then
        stop every worker of this pool."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with self._lock:
            self._event("close", self.clock.now())
            deadline = self.clock.now() + grace
            while self.core.in_flight():
                left = deadline - self.clock.now()
                if left <= 0:
                    log.warning("shutdown grace of %.1f s is over with requests still in flight", grace)
                    break
                self._idle_or_gone.wait(min(left, 0.1))
            actions = self._event("stop_all", self.clock.now())
        self._stop.set()
        with self._lock:
            self._batch_wake.notify_all()
        self._run(actions)
        self.backend.close()  # ends the event stream the watcher blocks on
        for thread in self._threads:
            thread.join(timeout=5)
        if self._own_executor:
            self._executor.shutdown(wait=True)
        if self._calls is not None:
            self._calls.shutdown(wait=True)
        self.gpu.close()

    # -- settings at run time -----------------------------------------------------------

    def runtime_settings(self) -> dict[str, Any]:
        """What ``reconfigure`` can change, as it is now."""
        with self._lock:
            return self._runtime_settings()

    def reconfigure(
        self, settings: Settings, model_ttl_s: Mapping[str, float | None] | None = None
    ) -> dict[str, tuple[Any, Any]]:
        """Run with ``settings`` from now on (validated by the caller) and per-model TTL
        overrides (None removes one), without a restart: a settings-changed event of the
        core. A smaller N stops idle workers first and never a busy one (the pool is
        over N until they finish); a larger N serves waiting requests at once. Returns
        what changed as {key: (old, new)}."""
        with self._lock:
            before = self._runtime_settings()
            ttl = dict(self._ttl_overrides)
            for model, value in (model_ttl_s or {}).items():
                if value is None:
                    ttl.pop(model, None)
                else:
                    ttl[model] = float(value)
            self.settings, self._ttl_overrides = settings, ttl
            self._grow_executors(settings.max_workers)
            after = self._runtime_settings()
            actions = self._event("configure", self._core_config(), self.clock.now())
        self._run(actions)
        changed = {key: (before[key], after[key]) for key in after if before[key] != after[key]}
        if changed:
            log.info(
                "settings changed: %s", ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            )
        return changed

    def _grow_executors(self, workers: int) -> None:
        """Give a larger N threads enough to start and stop that many workers at once
        (lock held). The old executors finish what they were given."""
        if workers <= self._sized_for or not self._own_executor:
            return
        old, self._executor = self._executor, ThreadPoolExecutor(workers * 2 + 4, thread_name_prefix="wanwu-pool")
        old.shutdown(wait=False)
        if self._calls is not None:
            calls, self._calls = self._calls, ThreadPoolExecutor(max(4, workers * 2), thread_name_prefix="wanwu-batch")
            calls.shutdown(wait=False)
        self._sized_for = workers

    def _runtime_settings(self) -> dict[str, Any]:
        s = self.settings
        return {
            "max_workers": s.max_workers,
            "idle_ttl_s": s.idle_ttl_s,
            "keepalive": s.keepalive,
            "stem_cells": s.stem_cells,
            "model_ttl_s": dict(sorted(self._ttl_overrides.items())),
        }

    # -- the core, under the lock ------------------------------------------------------

    def _event(self, name: str, *args: Any) -> list[Action]:
        """Feed one event to the core (lock held) and carry out what it returns:
        grants and failures at once, spawns and stops as actions to run unlocked."""
        return self._apply(self._feed(name, *args))

    def _feed(self, name: str, *args: Any) -> list[Command]:
        actions: list[Command] = []
        if self.catalog.version != self._catalog_version:  # bundles came, went or were replaced
            self._catalog_version = self.catalog.version
            now = self.clock.now()
            digests = {m.name: m.digest for m in self.catalog.all()}
            for model in sorted(name for name, digest in self._digests.items() if digests.get(name) != digest):
                log.info("model %s: its bundle was replaced or removed; retiring its workers", model)
                actions += self._feed("retire", model, now)
            self._digests = digests
            actions += self._feed("configure", self._core_config(), now)  # new TTLs and estimates
        commands: list[Command] = getattr(self.core, name)(*args)
        if self.recorder is not None:
            self.recorder(name, args, commands)
        return actions + commands

    def _apply(self, commands: list[Command]) -> list[Action]:
        actions: list[Action] = []
        batches: dict[tuple[int, ...], _Batch] = {}
        for command in commands:
            if isinstance(command, Grant):
                batch = None
                if command.batch:
                    batch = batches.get(command.batch)
                    if batch is None:  # its first member: every member is still waiting
                        batch = batches[command.batch] = _Batch([self._waiters[i] for i in command.batch])
                waiter = self._waiters.pop(command.request_id)
                waiter.lease = Lease(
                    command.worker_id,
                    command.model,
                    self._connections[command.worker_id],
                    command.cold_start,
                    command.queue_ms,
                    command.spawn_ms,
                    dict(command.spawn_breakdown),
                    command.start,
                    batch,
                    command.batch.index(command.request_id) if command.batch else 0,
                    cpu_fallback=command.cpu_fallback,
                )
                waiter.event.set()
            elif isinstance(command, Fail):
                waiter = self._waiters.pop(command.request_id)
                waiter.error = command.error
                waiter.event.set()
            elif isinstance(command, SpawnWorker):
                actions.append(self._later(self._spawn_job, command))
            elif isinstance(command, LoadWorker):
                actions.append(self._later(self._load_job, command))
            else:
                self._log_stop(command)
                actions.append(self._later(self._stop_job, command))
        self._idle_or_gone.notify_all()
        if self.core.next_batch_due() is not None:
            self._batch_wake.notify()
        return actions

    @staticmethod
    def _log_stop(command: StopWorker) -> None:
        if command.reason in ("ttl", "gpu_pressure") and command.idle_s is not None:
            log.info(
                "reaping worker %s (model %s): %s after %.1f s idle",
                command.worker_id,
                command.model,
                command.reason,
                command.idle_s,
            )
        elif command.reason in ("crashed", "timeout"):
            log.warning("worker %s (model %s) removed: %s", command.worker_id, command.model, command.reason)
        else:
            log.info("stopping worker %s (model %s): %s", command.worker_id, command.model or "-", command.reason)

    # -- leases --------------------------------------------------------------------

    def acquire(
        self,
        model: str,
        deadline: float,
        retry: bool = False,
        *,
        priority: str = INTERACTIVE,
        images: Sequence[bytes] = (b"",),
        top_k: int = 5,
        subset: LabelSubset | None = None,
    ) -> Lease:
        """A lease on a ready worker of ``model`` for one call carrying ``images``, or
        an error by ``deadline``: CapacityExhausted (no worker in time, or the queue is
        full), ModelUnavailable (the model is backing off after failed starts),
        WorkerStartError, UnknownModel, BackendUnavailable. A lease in a dynamic batch
        (``lease.batch``) shares its worker call with other requests."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority is {priority!r}; expected one of {', '.join(PRIORITIES)}")
        info = self.catalog.get(model)
        waiter = _Waiter(images=images, top_k=top_k, subset=subset)
        with self._lock:
            request_id = next(self._request_ids)
            self._waiters[request_id] = waiter
            actions = self._event(
                "arrive", request_id, info.name, self.clock.now(), deadline, retry, len(images), priority
            )
        self._run(actions)
        self.clock.wait(waiter.event, deadline - self.clock.now())
        actions = []
        with self._lock:
            if not waiter.event.is_set():
                actions = self._event("expire", request_id, self.clock.now())
        self._run(actions)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.lease is not None
        return waiter.lease

    def release(self, lease: Lease, ok: bool = True, reason: str = "crashed") -> None:
        """Give a lease back. ``ok=False`` means the worker failed (``reason``:
        crashed or timeout) and is replaced rather than reused. In a dynamic batch only
        the member that sent the call gives the worker back."""
        if lease.member != 0:
            return
        with self._lock:
            actions = self._event("released", lease.worker_id, self.clock.now(), ok, reason)
        self._run(actions)

    def predict(
        self,
        model: str,
        image: bytes,
        top_k: int = 5,
        queue_timeout_s: float | None = None,
        request_timeout_s: float | None = None,
        priority: str = INTERACTIVE,
        subset: LabelSubset | None = None,
    ) -> PoolAnswer:
        """Classify ``image`` on a worker of ``model`` (batched with other requests if
        the model has batching). A worker that crashes or times out is removed and the
        request is retried once on another (inference is idempotent); a second failure
        is raised (WorkerCrashed or WorkerTimeout); a bad image is WorkerRejected.
        ``subset``: score over these of the model's labels, renormalised. An
        embedding model answers ``embedding`` and ``dim`` instead of predictions."""
        info = self.catalog.get(model)
        call = self._call(info, [image], top_k, priority, queue_timeout_s, request_timeout_s, subset)
        entry = call.results[0]
        if "error" in entry:
            raise _rejected(entry, call.worker_id)
        return PoolAnswer(
            entry.get("predictions") or [],
            info.name,
            call.worker_id,
            call.cold_start,
            call.attempts,
            call.timing_ms,
            call.start,
            call.batch_size,
            cpu_fallback=call.cpu_fallback,
            embedding=entry.get("embedding"),
            dim=entry.get("dim"),
            groups=entry.get("groups"),
        )

    def predict_batch(
        self,
        model: str,
        images: Sequence[bytes],
        top_k: int = 5,
        priority: str = BATCH,
        queue_timeout_s: float | None = None,
        request_timeout_s: float | None = None,
        subset: LabelSubset | None = None,
    ) -> BatchAnswer:
        """Classify ``images``: split into calls of at most the model's max batch size
        (one image each without batching), run side by side, each queued at
        ``priority``. One failed call fails only its own images (``BatchAnswer``).

        How many calls, of what sizes: ``policy.batch_calls``, over the workers of the
        model that are up now."""
        if not images:
            raise ValueError("predict_batch needs at least one image")
        info = self.catalog.get(model)
        with self._lock:
            up = sum(1 for w in self.core.workers.values() if w.model == info.name and w.state in _UP)
        chunks, start = [], 0
        for size in policy.batch_calls(len(images), info.max_batch_size, up):
            chunks.append(images[start : start + size])
            start += size

        def run(chunk: Sequence[bytes]) -> _Call | WanwuError:
            try:
                return self._call(info, chunk, top_k, priority, queue_timeout_s, request_timeout_s, subset)
            except WanwuError as exc:
                return exc

        executor = self._calls
        try:
            later = [executor.submit(run, chunk) for chunk in chunks[1:]] if executor is not None else []
        except RuntimeError:  # shut down under us
            raise BackendUnavailable("the pool is shutting down") from None
        outcomes = [run(chunks[0])]
        outcomes += [f.result() for f in later] if executor is not None else [run(c) for c in chunks[1:]]
        results: list[dict[str, Any] | WanwuError] = []
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            results += [outcome] * len(chunk) if isinstance(outcome, WanwuError) else outcome.results
        calls = [o for o in outcomes if isinstance(o, _Call)]
        timing = {
            "queue": max((c.timing_ms["queue"] for c in calls), default=0.0),
            "spawn": max((c.timing_ms["spawn"] for c in calls), default=0.0),
            "worker": round(sum(c.timing_ms["worker"] for c in calls), 3),
        }
        cold, fallback = any(c.cold_start for c in calls), any(c.cpu_fallback for c in calls)
        return BatchAnswer(results, info.name, len(chunks), cold, timing, cpu_fallback=fallback)

    def _call(
        self,
        info: ModelInfo,
        images: Sequence[bytes],
        top_k: int,
        priority: str,
        queue_timeout_s: float | None,
        request_timeout_s: float | None,
        subset: LabelSubset | None = None,
    ) -> _Call:
        """One worker call's worth of images, retried once on another worker if the
        first crashes or times out."""
        queue_timeout = self.settings.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
        request_timeout = self.settings.request_timeout_s if request_timeout_s is None else request_timeout_s
        queue_ms = spawn_ms = 0.0
        cold, start = False, "warm"
        for attempt in (1, 2):
            lease = self.acquire(
                info.name,
                self.clock.now() + queue_timeout,
                retry=attempt > 1,
                priority=priority,
                images=images,
                top_k=top_k,
                subset=subset,
            )
            queue_ms += lease.queue_ms
            spawn_ms += lease.spawn_ms
            cold = cold or lease.cold_start
            start = lease.start if lease.cold_start else start
            try:
                results, answer = self._send(info, lease, images, top_k, request_timeout, subset)
            except (WorkerCrashed, WorkerTimeout) as exc:
                if attempt == 2:
                    raise
                log.warning("retrying on another worker after: %s", exc)
                continue
            timing = _timing(answer, queue_ms, spawn_ms, lease.spawn_breakdown)
            size = len(answer.results) if isinstance(answer, WorkerBatchAnswer) else 1
            return _Call(results, lease.worker_id, cold, attempt, timing, start, size, cpu_fallback=lease.cpu_fallback)
        raise AssertionError("unreachable")

    def _send(
        self,
        info: ModelInfo,
        lease: Lease,
        images: Sequence[bytes],
        top_k: int,
        timeout: float,
        subset: LabelSubset | None,
    ) -> tuple[list[dict[str, Any]], WorkerAnswer | WorkerBatchAnswer]:
        """Make (or, in a batch, wait for) the worker call and give the lease back.
        However the call or the shaping of its answer fails, the lease goes back (a
        worker that crashed, timed out or answered garbage is replaced) and a batch's
        other members are told at once; an error that is not the scheduler's is the
        worker's garbage, WorkerCrashed."""
        batch = lease.batch
        if batch is not None and lease.member != 0:  # another member sends the call
            if not batch.done.wait(timeout + 5.0):
                raise WorkerTimeout(f"the batch call on worker {lease.worker_id} did not finish", lease.worker_id)
            results = batch.share(lease.member)
            assert batch.answer is not None
            return results, batch.answer
        try:
            results, answer, shares = self._ask(info, lease, images, top_k, timeout, subset)
        except Exception as exc:  # the lease and the batch must never be left behind
            error = exc if isinstance(exc, WanwuError) else self._garbage(lease, exc)
            if batch is not None:
                batch.finish(None, error)
            failed = isinstance(error, (WorkerCrashed, WorkerTimeout))
            self.release(lease, ok=not failed, reason="timeout" if isinstance(error, WorkerTimeout) else "crashed")
            if error is exc:
                raise
            raise error from exc
        if batch is not None:
            assert isinstance(answer, WorkerBatchAnswer)
            batch.finish(answer, shares=shares)  # the other members go on before the worker is given back
        self.release(lease, ok=True)
        return results, answer

    def _ask(
        self,
        info: ModelInfo,
        lease: Lease,
        images: Sequence[bytes],
        top_k: int,
        timeout: float,
        subset: LabelSubset | None,
    ) -> tuple[list[dict[str, Any]], WorkerAnswer | WorkerBatchAnswer, list[list[dict[str, Any]]]]:
        """The worker call and its answer shaped: this request's results, the answer,
        and in a batch every member's results."""
        batch = lease.batch
        if batch is not None:
            # The worker's top_k is for members scored over all labels; the others
            # are scored here from the raw scores.
            top = max((m.top_k for m in batch.members if m.subset is None), default=1)
            batch.scores = label_scores(info, (m.subset for m in batch.members))
            answer = lease.connection.predict_batch(batch.images(), top, timeout, batch.scores)
            shares = batch.shape(answer)
            return shares[0], answer, shares
        scores = label_scores(info, [subset])
        top = 1 if subset is not None else top_k
        if len(images) == 1:
            single = lease.connection.predict(images[0], top, timeout, scores)
            return [_shape(single.entry(), top_k, subset, scores)], single, []
        several = lease.connection.predict_batch(list(images), top, timeout, scores)
        return [_shape(entry, top_k, subset, scores) for entry in several.results], several, []

    @staticmethod
    def _garbage(lease: Lease, exc: Exception) -> WorkerCrashed:
        """An unexpected error from a worker call or its answer, as the worker's crash."""
        log.error(
            "worker %s (model %s) failed a call unexpectedly; it is replaced",
            lease.worker_id,
            lease.model,
            exc_info=exc,
        )
        return WorkerCrashed(
            f"worker {lease.worker_id} answered what could not be used: {type(exc).__name__}: {str(exc)[:200]}",
            lease.worker_id,
        )

    # -- carrying out commands -------------------------------------------------------

    def _spawn_job(self, command: SpawnWorker) -> None:
        # Evicted containers go first, so the engine never holds more than N.
        for victim_id in command.evict:
            log.info("evicting worker %s for a %s worker", victim_id, command.model)
            self._stop_container(victim_id, "evicted")
        stem = command.model == STEM
        log.info(
            "%s worker %s%s%s",
            "starting stem cell" if stem else ("pre-warming" if command.request_id is None else "spawning"),
            command.worker_id,
            "" if stem else f" for model {command.model}",
            f" on GPU {command.device}" if command.device else "",
        )

        def start() -> tuple[Started, Connection | None]:
            path = self.settings.models_dir.resolve() if stem else self.catalog.get(command.model).path
            started = self.backend.spawn(SpawnRequest(command.worker_id, command.model, path, command.device))
            return started, self.backend.connect(command.worker_id, self.settings.request_timeout_s)

        self._start(command, start, "ready")

    def _load_job(self, command: LoadWorker) -> None:
        """A stem cell loads ``command.model``; a failed load stops it (the core says so)."""
        log.info("stem cell %s loads model %s", command.worker_id, command.model)

        def load() -> tuple[Started, Connection | None]:
            path = self.catalog.get(command.model).path
            return self.backend.load(command.worker_id, path, self.settings.spawn_timeout_s), None

        self._start(command, load, "loaded into its stem cell")

    def _start(
        self,
        command: SpawnWorker | LoadWorker,
        run: Callable[[], tuple[Started, Connection | None]],
        done: str,
    ) -> None:
        """Run a start (a container, or a load into a stem cell) and tell the core how
        it went; a stem cell keeps the connection it was started with."""
        started_at = self.clock.now()
        try:
            started, connection = run()
        except WanwuError as exc:
            self._spawn_failed(command, exc)
            return
        except Exception as exc:  # a backend bug must not leave a waiter hanging
            log.exception("starting worker %s failed unexpectedly", command.worker_id)
            self._spawn_failed(
                command, WorkerError(f"starting worker {command.worker_id} failed: {exc}", command.worker_id)
            )
            return
        problem = _garbled_start(started)
        if problem is not None:  # the worker is up but not to be trusted: a failed start
            if connection is not None:
                connection.close()
            if isinstance(command, SpawnWorker):  # a failed load's stem cell is stopped by the core
                self._stop_container(command.worker_id, f"answered {problem}")
            self._spawn_failed(
                command, WorkerStartError(f"worker {command.worker_id} answered {problem}", command.worker_id)
            )
            return
        now = self.clock.now()
        spawn_ms = round((now - started_at) * 1000, 3)
        gpu_mb = started.health.get("gpu_memory_mb")
        with self._lock:
            if connection is not None:
                self._connections[command.worker_id] = connection
            log.info("worker %s (model %s) %s in %.0f ms", command.worker_id, command.model, done, spawn_ms)
            actions = self._event(
                "ready",
                command.worker_id,
                now,
                spawn_ms,
                started.timing_ms,
                float(gpu_mb) if isinstance(gpu_mb, (int, float)) else None,
            )
        self._run(actions)

    def _spawn_failed(self, command: SpawnWorker | LoadWorker, exc: WanwuError) -> None:
        with self._lock:
            actions = self._event("start_failed", command.worker_id, self.clock.now(), exc)
            backoff = self.core.backoff.get(command.model)
            if backoff is not None:
                log.error(
                    "worker %s for model %s failed to start (%d in a row; next try in %.0f s): %s",
                    command.worker_id,
                    command.model,
                    backoff.failures,
                    self.core.backoff_delay(backoff),
                    exc,
                )
        self._run(actions)

    def _stop_job(self, command: StopWorker) -> None:
        """Stop a worker the core marked STOPPING, then tell the core it is gone."""
        self._stop_container(command.worker_id, command.reason)
        with self._lock:
            actions = self._event("stopped", command.worker_id, self.clock.now())
        self._run(actions)

    def _stop_container(self, worker_id: str, reason: str) -> None:
        try:
            self.backend.stop(worker_id)
        except WanwuError as exc:
            log.error("stopping worker %s (%s) failed: %s", worker_id, reason, exc)
        with self._lock:
            connection = self._connections.pop(worker_id, None)
        if connection is not None:
            connection.close()
        log.info("worker %s stopped: %s", worker_id, reason)

    def _run(self, actions: Iterable[Action]) -> None:
        for action in actions:
            action()

    def _later(self, fn: Callable[..., None], *args: Any) -> Action:
        """An action that hands ``fn(*args)`` to the executor."""

        def action() -> None:
            try:
                self._executor.submit(fn, *args)
            except RuntimeError:  # the executor is shut down: a start that outlived the shutdown; stop it here
                fn(*args)

        return action

    # -- reaping and events -----------------------------------------------------------

    def reap(self, now: float | None = None, readings: list[policy.GpuReading] | None = None) -> list[tuple[str, str]]:
        """Stop idle workers past their keep-alive and, under GPU pressure, idle workers
        least recently used first; start pre-warmed workers that are due. Returns the
        (worker id, reason) pairs stopped."""
        readings = self.gpu.readings() if readings is None else readings
        self.catalog.poll()  # a replaced bundle's workers are retired by the feed below
        now = self.clock.now() if now is None else now
        with self._lock:
            commands = self._feed("tick", now, readings)
            actions = self._apply(commands)
        self._run(actions)
        return [(c.worker_id, c.reason) for c in commands if isinstance(c, StopWorker)]

    def on_worker_exit(self, worker_id: str, reason: str) -> None:
        """The backend saw a worker die (exit, OOM kill, removal from outside)."""
        with self._lock:
            worker = self.core.workers.get(worker_id)
            if worker is not None and worker.state is State.IDLE:
                log.warning("worker %s (model %s) died while idle: %s", worker_id, worker.model, reason)
            actions = self._event("died", worker_id, self.clock.now(), reason)
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
            tracked = set(self.core.workers)
            lost = [
                w.id for w in self.core.workers.values() if w.state in (State.IDLE, State.BUSY) and w.id not in running
            ]
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
        closing = self.core.closing
        checks["pool"] = (not closing, "shutting down" if closing else "accepting requests")
        return checks

    def snapshot(self) -> PoolSnapshot:
        now = self.clock.now()
        with self._lock:
            core = self.core
            workers = [
                WorkerInfo(
                    w.id,
                    w.model,
                    w.state.value,
                    round(now - w.last_used, 3) if w.state is State.IDLE else None,
                    round(now - w.started_at, 3),
                    w.gpu_mb,
                    "cpu" if w.cpu_fallback else w.device,
                    w.served,
                )
                for w in sorted(core.workers.values(), key=lambda w: w.started_at)
            ]
            backoff = {m: round(b.until - now, 3) for m, b in core.backoff.items() if b.until > now}
            return PoolSnapshot(
                self.settings.max_workers,
                workers,
                len(core.queue),
                dict(core.counters),
                dict(core.reaps),
                list(core.readings),
                backoff,
                self._live_settings(),
                core.describe_keepalive(),
                core.waiting(),
            )

    def _live_settings(self) -> dict[str, Any]:
        """What a simulator needs to predict this pool (``wanwu replay``)."""
        config = self.core.config
        return {
            "max_workers": config.capacity,
            "idle_ttl_s": config.default_ttl_s,
            "model_ttl_s": dict(config.model_ttl_s),
            "keepalive": config.keepalive,
            "queue_timeout_s": self.settings.queue_timeout_s,
            "queue_max": config.queue_max,
            "reap_interval_s": self.settings.reap_interval_s,
            "stem_cells": config.stem_cells,
            "batching": {
                model: {"max_batch_size": n, "max_wait_ms": wait * 1000} for model, (n, wait) in config.batching.items()
            },
            "interactive_reserve_s": config.interactive_reserve_s,
            "gpu_high_watermark": config.high_watermark,
            "gpu_low_watermark": config.low_watermark,
            "start_ms": dict(self.core.start_ms),  # the last start of each kind, as measured
        }


def _garbled_start(started: Started) -> str | None:
    """What is wrong with what a started worker reported (its health's GPU memory, its
    start's timings), or None; the worker client checks the same, but a backend may
    add to it."""
    gpu_mb = started.health.get("gpu_memory_mb")
    if gpu_mb is not None and not (_finite(gpu_mb) and gpu_mb >= 0):
        return f"gpu_memory_mb {reprlib.repr(gpu_mb)}, not a finite number of megabytes"
    for name, value in started.timing_ms.items():
        if not _finite(value):
            return f"a start timing {reprlib.repr(name)} of {reprlib.repr(value)}, not a finite number"
    return None


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53


def _rejected(entry: dict[str, Any], worker_id: str) -> WorkerRejected:
    """A worker's per-image error entry as the error a single request raises."""
    error = entry.get("error")
    error = error if isinstance(error, dict) else {}
    code = str(error.get("code", "bad_input"))
    return WorkerRejected(str(error.get("message", entry)), INPUT_STATUS.get(code, 400), code, worker_id)


def _timing(
    answer: WorkerAnswer | WorkerBatchAnswer, queue_ms: float, spawn_ms: float, breakdown: dict[str, float]
) -> dict[str, float]:
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
