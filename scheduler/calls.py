"""The request path on a lease: a request takes a lease on a worker (``acquire``), makes
its worker call, shapes the answer and gives the lease back (``release``).

``Calls`` is a part of ``WarmPool`` (a mixin): ``predict`` and ``predict_batch`` with the
retry of a failed call on another worker, and the dynamic batch (``_Batch``), in which
the first member's thread sends every member's images in one ``/predict_batch`` call and
hands each member its own results. Shaping the results is ``scheduler.scoring``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import policy
from .backends.base import Connection
from .clock import Clock
from .core import BATCH, INTERACTIVE, PoolCore
from .errors import (
    INPUT_STATUS,
    BackendUnavailable,
    WanwuError,
    WorkerCrashed,
    WorkerRejected,
    WorkerTimeout,
)
from .events import Grant
from .models import ModelCatalog, ModelInfo
from .policy import State
from .scoring import LabelSubset, label_scores, shape, slices
from .settings import Settings
from .worker_client import Scores, WorkerAnswer, WorkerBatchAnswer

__all__ = ["BatchAnswer", "Calls", "Lease", "PoolAnswer"]

_UP = (State.IDLE, State.BUSY)

# The pool's log lines keep the logger name they had before the pool was split.
log = logging.getLogger("scheduler.pool")


@dataclass(eq=False)
class _Waiter:
    """A request's thread waiting for the core's Grant or Fail (a Retry re-arms it for
    the next Grant, with a new deadline), with what it will send."""

    request_id: int
    deadline: float
    attempt: int = 1
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
    released: bool = False  # its lease was given back (the core judged a failed call) before members were told

    def shape(self, answer: WorkerBatchAnswer) -> list[list[dict[str, Any]]]:
        """Every member's results, scored over its own labels and cut to its own top_k.
        Raises (WorkerCrashed, or whatever shaping meets) if the answer cannot be shaped."""
        parts = slices([len(waiter.images) for waiter in self.members])
        return [
            [shape(entry, waiter.top_k, waiter.subset, self.scores) for entry in answer.results[part]]
            for waiter, part in zip(self.members, parts, strict=True)
        ]

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
    request_id: int = 0
    attempt: int = 1  # 2: another worker failed the request first

    def request_ids(self) -> list[int]:
        """The requests the call carries: the batch's members, or its own."""
        return [m.request_id for m in self.batch.members] if self.batch is not None else [self.request_id]


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


class Calls:
    """``WarmPool``'s request path: what it serves requests with, on the pool's own
    attributes and leases (declared here for the type checker)."""

    catalog: ModelCatalog
    settings: Settings
    clock: Clock
    core: PoolCore
    _lock: threading.Lock
    _calls: Executor | None  # predict_batch's calls run side by side on it; None: one after another
    _waiters: dict[int, _Waiter]  # every request a thread waits on, by id

    if TYPE_CHECKING:  # WarmPool's own (scheduler.pool)

        def arrive(
            self,
            model: str,
            deadline: float,
            priority: str = INTERACTIVE,
            images: Sequence[bytes] = (b"",),
            top_k: int = 5,
            subset: LabelSubset | None = None,
            tries: int | None = None,
        ) -> _Waiter: ...

        def wait(self, waiter: _Waiter) -> Lease: ...

        def release(
            self, lease: Lease, ok: bool = True, reason: str = "crashed", error: WanwuError | None = None
        ) -> None: ...

    def _lease(self, grant: Grant, connection: Connection, batches: dict[tuple[int, ...], _Batch]) -> Lease:
        """The lease ``grant`` gives its request; the members of one dynamic batch share
        a ``_Batch`` (made for the first, while every member still waits)."""
        batch = None
        if grant.batch:
            batch = batches.get(grant.batch)
            if batch is None:
                batch = batches[grant.batch] = _Batch([self._waiters[i] for i in grant.batch])
        return Lease(
            grant.worker_id,
            grant.model,
            connection,
            grant.cold_start,
            grant.queue_ms,
            grant.spawn_ms,
            dict(grant.spawn_breakdown),
            grant.start,
            batch,
            grant.batch.index(grant.request_id) if grant.batch else 0,
            cpu_fallback=grant.cpu_fallback,
            request_id=grant.request_id,
            attempt=grant.attempt,
        )

    def predict(
        self,
        model: str | ModelInfo,
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
        embedding model answers ``embedding`` and ``dim`` instead of predictions.
        ``model``: a name, or the catalog entry it was resolved to (``_info``)."""
        info = self._info(model)
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
        model: str | ModelInfo,
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
        info = self._info(model)
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

    def _info(self, model: str | ModelInfo) -> ModelInfo:
        """The entry its caller resolved (the gateway checked the request against it), or
        the catalog's now. Scores are asked for and shaped by that one entry; a worker of a
        bundle replaced meanwhile answers another digest (``scoring.shape``: a 502)."""
        return model if isinstance(model, ModelInfo) else self.catalog.get(model)

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
        """One worker call's worth of images. A worker that crashes or times out on it
        is the core's to judge: it sends the request round again (``Retry``) or fails it
        with that error, and ``wait`` gives whichever comes."""
        queue_timeout = self.settings.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
        request_timeout = self.settings.request_timeout_s if request_timeout_s is None else request_timeout_s
        queue_ms = spawn_ms = 0.0
        cold, start = False, "warm"
        waiter = self.arrive(info.name, self.clock.now() + queue_timeout, priority, images, top_k, subset)
        while True:
            lease = self.wait(waiter)
            queue_ms += lease.queue_ms
            spawn_ms += lease.spawn_ms
            cold = cold or lease.cold_start
            start = lease.start if lease.cold_start else start
            try:
                results, answer = self._send(info, lease, images, top_k, request_timeout, subset)
            except (WorkerCrashed, WorkerTimeout):
                if lease.batch is not None and not lease.batch.released:
                    raise  # its batch's call never finished: the core has not judged it
                continue  # released: the core's Retry or Fail is on the waiter
            timing = _timing(answer, queue_ms, spawn_ms, lease.spawn_breakdown)
            size = len(answer.results) if isinstance(answer, WorkerBatchAnswer) else 1
            return _Call(
                results, lease.worker_id, cold, lease.attempt, timing, start, size, cpu_fallback=lease.cpu_fallback
            )

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
        worker that crashed, timed out or answered garbage is replaced, and the core
        decides what becomes of its requests) before a batch's other members are told;
        an error that is not the scheduler's is the worker's garbage, WorkerCrashed."""
        batch = lease.batch
        if batch is not None and lease.member != 0:
            # Another member sends the call, bounded by its request timeout, and finishes
            # the batch however it ends (``_sender``): a member that gave up first would
            # leave its request to the core with nobody waiting on it.
            batch.done.wait()
            results = batch.share(lease.member)
            assert batch.answer is not None
            return results, batch.answer
        try:
            return self._sender(info, lease, images, top_k, timeout, subset)
        finally:
            if batch is not None and not batch.done.is_set():  # only a BaseException gets here
                batch.finish(None, WorkerCrashed(f"the call on worker {lease.worker_id} was abandoned"))

    def _sender(
        self,
        info: ModelInfo,
        lease: Lease,
        images: Sequence[bytes],
        top_k: int,
        timeout: float,
        subset: LabelSubset | None,
    ) -> tuple[list[dict[str, Any]], WorkerAnswer | WorkerBatchAnswer]:
        """``_send`` for the request that makes the call."""
        batch = lease.batch
        try:
            results, answer, shares = self._ask(info, lease, images, top_k, timeout, subset)
        except Exception as exc:  # the lease and the batch must never be left behind
            error = exc if isinstance(exc, WanwuError) else self._garbage(lease, exc)
            failed = isinstance(error, (WorkerCrashed, WorkerTimeout))
            reason = "timeout" if isinstance(error, WorkerTimeout) else "crashed"
            try:
                self.release(lease, ok=not failed, reason=reason, error=error)
            finally:
                if batch is not None:
                    batch.released = True
                    batch.finish(None, error)
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
            return [shape(single.entry(), top_k, subset, scores)], single, []
        several = lease.connection.predict_batch(list(images), top, timeout, scores)
        return [shape(entry, top_k, subset, scores) for entry in several.results], several, []

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
