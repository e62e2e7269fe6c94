"""The warm pool with a FakeBackend, a FakeClock and inline execution: no sleeps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.errors import (
    BackendUnavailable,
    CapacityExhausted,
    ModelUnavailable,
    UnknownModel,
    WorkerRejected,
    WorkerStartError,
    WorkerTimeout,
)
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import GpuReading
from scheduler.pool import INLINE, Lease, WarmPool
from scheduler.settings import Settings
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        make_bundle(tmp_path, name, gpu_memory_mb=1000)
    make_bundle(tmp_path, "quick", idle_ttl_s=5)
    return tmp_path


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_pool(backend: FakeBackend, clock: FakeClock, models: Path, **settings: object) -> WarmPool:
    defaults = {"max_workers": 2, "queue_timeout_s": 5.0, "stem_cells": 0}  # stem cells: tests/unit/test_stem.py
    config = Settings(models_dir=models, **{**defaults, **settings})  # type: ignore[arg-type]
    pool = WarmPool(
        backend, ModelCatalog(models, clock=clock), config, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    return pool


@pytest.fixture
def pool(backend: FakeBackend, clock: FakeClock, models: Path) -> Iterator[WarmPool]:
    pool = make_pool(backend, clock, models)
    yield pool
    pool.shutdown(grace_s=0)


def test_two_sequential_requests_use_one_worker(pool: WarmPool, backend: FakeBackend) -> None:
    first = pool.predict("a", b"1")
    second = pool.predict("a", b"2")
    assert len(backend.spawns) == 1
    assert first.cold_start and not second.cold_start
    assert first.worker_id == second.worker_id
    assert second.predictions[0]["label"] == "a:2"
    assert second.timing_ms["spawn"] == 0 and first.timing_ms["spawn"] >= 0
    counters = pool.snapshot().counters
    assert counters["cold_starts"] == 1 and counters["warm_hits"] == 1


def test_a_miss_spawns_and_a_full_pool_evicts_the_lru_idle_worker_of_another_model(
    pool: WarmPool, backend: FakeBackend, clock: FakeClock
) -> None:
    a = pool.predict("a", b"x").worker_id
    clock.advance(1)
    b = pool.predict("b", b"x").worker_id
    clock.advance(1)
    pool.predict("a", b"x")  # a is now the most recently used
    clock.advance(1)
    pool.predict("c", b"x")
    assert backend.stops == [b]
    assert {w.model for w in pool.snapshot().workers} == {"a", "c"}
    assert a in backend.live and backend.peak == 2
    assert pool.snapshot().reaps["evicted"] == 1


def real_time_pool(backend: FakeBackend, models: Path, **settings: object) -> WarmPool:
    from scheduler.clock import MonotonicClock

    config = Settings(models_dir=models, **{"max_workers": 1, "stem_cells": 0, **settings})  # type: ignore[arg-type]
    pool = WarmPool(backend, ModelCatalog(models), config, clock=MonotonicClock(), gpu=GpuMonitor(()), executor=INLINE)
    pool.start(background=False)
    return pool


def queued_acquire(pool: WarmPool, model: str) -> tuple[threading.Thread, list[Lease]]:
    """Start an acquire in another thread and return once it waits in the queue."""
    got: list[Lease] = []
    depth = pool.snapshot().queue_depth
    thread = threading.Thread(target=lambda: got.append(pool.acquire(model, pool.clock.now() + 30)))
    thread.start()
    while pool.snapshot().queue_depth == depth:
        threading.Event().wait(0.001)
    return thread, got


def test_waiting_request_gets_the_released_worker(backend: FakeBackend, models: Path) -> None:
    pool = real_time_pool(backend, models)
    lease = pool.acquire("a", pool.clock.now() + 5)
    thread, got = queued_acquire(pool, "a")
    pool.release(lease)
    thread.join(10)
    assert got and got[0].worker_id == lease.worker_id and not got[0].cold_start
    assert len(backend.spawns) == 1
    pool.release(got[0])
    pool.shutdown(grace_s=0)


def test_a_full_queue_rejects_at_once(backend: FakeBackend, models: Path) -> None:
    pool = real_time_pool(backend, models, queue_max=1)
    lease = pool.acquire("a", pool.clock.now() + 5)
    thread, got = queued_acquire(pool, "a")
    with pytest.raises(CapacityExhausted, match=r"wait queue is full \(1 requests\)"):
        pool.acquire("a", pool.clock.now() + 5)
    pool.release(lease)
    thread.join(10)
    pool.release(got[0])
    pool.shutdown(grace_s=0)


def test_no_worker_in_time_is_capacity_exhausted_with_retry_after(pool: WarmPool, clock: FakeClock) -> None:
    pool.acquire("a", clock.now() + 5)
    pool.acquire("b", clock.now() + 5)
    before = clock.now()
    with pytest.raises(CapacityExhausted, match=r"no c worker became free within 2\.0 s") as caught:
        pool.acquire("c", clock.now() + 2)
    assert clock.now() == before + 2  # it waited exactly until its deadline
    assert caught.value.retry_after_s >= 1
    assert pool.snapshot().queue_depth == 0


def test_idle_ttl_reaps_with_per_model_override(pool: WarmPool, backend: FakeBackend, clock: FakeClock) -> None:
    a = pool.predict("a", b"x").worker_id
    quick = pool.predict("quick", b"x").worker_id
    clock.advance(6)
    assert pool.reap() == [(quick, "ttl")]
    clock.advance(25)
    assert pool.reap() == [(a, "ttl")]
    assert backend.live == {}
    assert pool.snapshot().reaps["ttl"] == 2


def test_busy_workers_are_never_reaped(pool: WarmPool, clock: FakeClock) -> None:
    lease = pool.acquire("a", clock.now() + 5)
    clock.advance(1000)
    assert pool.reap(readings=[GpuReading("0", 10_000, 10_000)]) == []
    pool.release(lease)


def test_gpu_pressure_reaps_idle_lru_first(backend: FakeBackend, clock: FakeClock, models: Path) -> None:
    backend.gpu_mb = {"a": 3000, "b": 3000, "c": 3000}
    pool = make_pool(backend, clock, models, max_workers=3, gpus=("0",))
    pool._readings = [GpuReading("0", 0, 10_000)]
    ids = []
    for model in ("a", "b", "c"):
        ids.append(pool.predict(model, b"x").worker_id)
        clock.advance(1)
    # 9500 used of 10000 > 0.90: stop the oldest idle workers until <= 8000.
    assert pool.reap(readings=[GpuReading("0", 9500, 10_000)]) == [(ids[0], "gpu_pressure")]
    assert pool.snapshot().reaps["gpu_pressure"] == 1
    pool.shutdown(grace_s=0)


def test_spawn_failure_is_reported_then_the_model_backs_off(
    pool: WarmPool, backend: FakeBackend, clock: FakeClock
) -> None:
    backend.fail_next_spawns("a", 2)
    with pytest.raises(WorkerStartError, match="bundle is broken"):
        pool.predict("a", b"x")
    with pytest.raises(ModelUnavailable, match=r"failed to start 1 time\(s\) in a row; next try in 1.0 s") as caught:
        pool.predict("a", b"x")
    assert caught.value.retry_after_s == pytest.approx(1.0)
    assert len(backend.spawns) == 1  # no crash loop
    clock.advance(1.5)
    with pytest.raises(WorkerStartError):
        pool.predict("a", b"x")
    with pytest.raises(ModelUnavailable, match=r"next try in 2\.0 s"):  # doubled
        pool.predict("a", b"x")
    clock.advance(2.5)
    assert pool.predict("a", b"x").cold_start  # healthy again: backoff reset
    assert pool.snapshot().backoff == {}
    assert pool.predict("b", b"x")  # other models never waited


def test_a_backing_off_model_is_still_served_by_its_idle_worker(
    pool: WarmPool, backend: FakeBackend, clock: FakeClock
) -> None:
    lease = pool.acquire("a", clock.now() + 5)  # worker 1 busy
    backend.fail_next_spawns("a")
    with pytest.raises(WorkerStartError):
        pool.predict("a", b"x")  # a second worker fails to start: backoff
    pool.release(lease)
    assert pool.predict("a", b"y").worker_id == lease.worker_id  # the idle one serves
    with pytest.raises(ModelUnavailable):  # but no new worker is tried while it is busy
        lease = pool.acquire("a", clock.now() + 5)
        pool.acquire("a", clock.now() + 5)
    pool.release(lease)


def test_a_crashed_worker_is_replaced_and_the_request_retried_once(pool: WarmPool, backend: FakeBackend) -> None:
    first = pool.predict("a", b"x").worker_id
    backend.outcomes[first].append("crash")
    answer = pool.predict("a", b"y")
    assert answer.attempts == 2 and answer.worker_id != first and answer.cold_start
    assert first in backend.stops
    snap = pool.snapshot()
    assert snap.reaps["crashed"] == 1 and snap.counters["retries"] == 1


def test_a_second_failure_is_raised(pool: WarmPool, backend: FakeBackend) -> None:
    backend.outcomes["a"].extend(["timeout", "timeout"])
    with pytest.raises(WorkerTimeout):
        pool.predict("a", b"x")
    assert len(backend.stops) == 2 and pool.snapshot().reaps["timeout"] == 2
    assert backend.live == {}


def test_a_rejected_input_keeps_the_worker(pool: WarmPool, backend: FakeBackend) -> None:
    backend.outcomes["a"].append("reject")
    with pytest.raises(WorkerRejected):
        pool.predict("a", b"x")
    assert backend.stops == [] and len(backend.live) == 1
    assert pool.predict("a", b"y").attempts == 1


def test_worker_dying_while_idle_leaves_the_pool(pool: WarmPool, backend: FakeBackend) -> None:
    worker = pool.predict("a", b"x").worker_id
    pool.on_worker_exit(worker, "exit 137")
    assert pool.snapshot().workers == [] and pool.snapshot().reaps["crashed"] == 1
    assert pool.predict("a", b"x").cold_start


def test_worker_dying_while_busy_is_not_reused(pool: WarmPool, backend: FakeBackend, clock: FakeClock) -> None:
    lease = pool.acquire("a", clock.now() + 5)
    pool.on_worker_exit(lease.worker_id, "oom")
    pool.release(lease, ok=True)
    assert lease.worker_id in backend.stops
    assert pool.snapshot().workers == []


def test_reconcile_forgets_workers_the_engine_lost(pool: WarmPool, backend: FakeBackend) -> None:
    worker = pool.predict("a", b"x").worker_id
    backend.live.clear()  # as after a daemon restart
    pool.reconcile()
    assert pool.snapshot().workers == []
    assert worker in backend.stops


def test_reconcile_removes_containers_the_pool_does_not_track(pool: WarmPool, backend: FakeBackend) -> None:
    from scheduler.backends.base import SpawnRequest

    kept = pool.predict("a", b"x").worker_id
    backend.live["stray01"] = SpawnRequest("stray01", "a", Path("/m"))  # its removal failed earlier
    pool.reconcile()
    assert "stray01" in backend.stops and kept not in backend.stops
    assert [w.id for w in pool.snapshot().workers] == [kept]


def test_start_removes_leftovers(backend: FakeBackend, clock: FakeClock, models: Path) -> None:
    backend.orphans = ["wanwu-wanwu-old1", "wanwu-wanwu-old2"]
    pool = make_pool(backend, clock, models)
    assert backend.orphans == []
    pool.shutdown(grace_s=0)


def test_shutdown_stops_every_worker_and_refuses_new_requests(
    backend: FakeBackend, clock: FakeClock, models: Path
) -> None:
    pool = make_pool(backend, clock, models)
    pool.predict("a", b"x")
    pool.predict("b", b"x")
    pool.shutdown(grace_s=0)
    assert backend.live == {}
    assert pool.snapshot().reaps["shutdown"] == 2
    with pytest.raises(BackendUnavailable, match="shutting down"):
        pool.predict("a", b"x")


def test_unknown_model(pool: WarmPool) -> None:
    with pytest.raises(UnknownModel, match="no model named 'zzz'"):
        pool.predict("zzz", b"x")


def test_snapshot_describes_workers(pool: WarmPool, clock: FakeClock) -> None:
    pool.predict("a", b"x")
    clock.advance(3)
    (worker,) = pool.snapshot().workers
    assert worker.model == "a" and worker.state == "idle" and worker.idle_s == 3 and worker.requests == 1
    assert worker.gpu_mb == 1000  # the bundle's estimate until the worker reports its own
    assert pool.snapshot().workers[0].model == "a"


def test_a_start_that_outlives_the_shutdown_is_stopped_and_its_request_fails(
    backend: FakeBackend, models: Path
) -> None:
    from scheduler.clock import MonotonicClock

    release, spawning = threading.Event(), threading.Event()

    def slow_start(request: object) -> None:  # the container takes its time to come up
        spawning.set()
        release.wait(10)

    backend.on_spawn = slow_start
    config = Settings(models_dir=models, max_workers=1, queue_timeout_s=30, stem_cells=0)
    pool = WarmPool(backend, ModelCatalog(models), config, clock=MonotonicClock(), gpu=GpuMonitor(()))
    pool.start(background=False)
    errors: list[Exception] = []

    def ask() -> None:
        try:
            pool.acquire("a", pool.clock.now() + 30)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            errors.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    assert spawning.wait(5)
    stopper = threading.Thread(target=lambda: pool.shutdown(grace_s=0.1))
    stopper.start()
    asker.join(5)
    assert errors and isinstance(errors[0], BackendUnavailable)  # at the shutdown, not after 30 s
    release.set()  # the container comes up after all...
    stopper.join(10)
    assert backend.live == {}  # ...and is removed
