"""The pool core on its own: events in, commands out. No threads, no clock, no backend."""

from __future__ import annotations

import collections

import pytest

from scheduler.core import CoreConfig, Fail, Grant, PoolCore, SpawnWorker, StopWorker
from scheduler.errors import (
    BackendUnavailable,
    CapacityExhausted,
    ModelUnavailable,
    WorkerCrashed,
    WorkerStartError,
    WorkerTimeout,
)
from scheduler.events import (
    Arrive,
    Close,
    Configure,
    Died,
    Expire,
    Ready,
    Released,
    Retry,
    StartFailed,
    StopAll,
    Stopped,
    Tick,
)
from scheduler.policy import GpuReading, State

CONFIG = CoreConfig(capacity=2, default_ttl_s=30, model_ttl_s={"quick": 5}, queue_max=3, retry_after_s=2)


def core(**changes: object) -> PoolCore:
    from dataclasses import replace

    return PoolCore(replace(CONFIG, **changes), id_prefix="w")  # type: ignore[arg-type]


def serve(pool: PoolCore, request_id: int, model: str, now: float) -> str:
    """A request that starts a worker, gets it, and gives it back; returns the worker id."""
    (spawn,) = pool.handle(Arrive(request_id, model, now, now + 10))
    assert isinstance(spawn, SpawnWorker) and spawn.request_id == request_id
    (grant,) = pool.handle(Ready(spawn.worker_id, now, spawn_ms=100.0, breakdown={"create": 40.0}))
    assert isinstance(grant, Grant) and grant.cold_start
    assert pool.handle(Released(spawn.worker_id, now)) == []
    return spawn.worker_id


def test_a_miss_spawns_a_worker_reserved_for_the_request() -> None:
    pool = core()
    commands = pool.handle(Arrive(1, "a", 0.0, 10.0))
    assert commands == [SpawnWorker("w0001", "a", None, (), 1)]
    assert pool.workers["w0001"].state is State.STARTING
    grant = pool.handle(Ready("w0001", 1.5, spawn_ms=1500.0, breakdown={"create": 200.0}))
    assert grant == [Grant(1, "w0001", "a", True, 0.0, 1500.0, {"create": 200.0}, "container")]
    assert pool.counters["cold_starts"] == 1


def test_a_hit_reuses_the_most_recently_used_idle_worker() -> None:
    pool = core(capacity=3)
    first = serve(pool, 1, "a", 0.0)
    second = pool.handle(Arrive(2, "a", 1.0, 11.0))[0]
    assert isinstance(second, Grant) and second.worker_id == first and not second.cold_start
    (spawn,) = pool.handle(Arrive(3, "a", 1.0, 11.0))  # the only idle one is busy now
    assert isinstance(spawn, SpawnWorker)
    pool.handle(Ready(spawn.worker_id, 2.0, 1000.0))
    pool.handle(Released(spawn.worker_id, 3.0))
    pool.handle(Released(first, 4.0))  # first is now the most recently used
    (grant,) = pool.handle(Arrive(4, "a", 5.0, 15.0))
    assert isinstance(grant, Grant) and grant.worker_id == first
    assert pool.counters["warm_hits"] == 2


def test_a_full_pool_evicts_the_least_recently_used_idle_worker_of_another_model() -> None:
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    b = serve(pool, 2, "b", 1.0)
    pool.handle(Arrive(3, "a", 2.0, 12.0))  # a is the most recently used
    pool.handle(Released(a, 2.0))
    (spawn,) = pool.handle(Arrive(4, "c", 3.0, 13.0))
    assert isinstance(spawn, SpawnWorker) and spawn.evict == (b,) and spawn.model == "c"
    assert b not in pool.workers and len(pool.workers) == 2  # the slot passed to the new worker
    assert pool.reaps["evicted"] == 1


def test_without_an_idle_worker_requests_wait_in_fifo_order_and_time_out() -> None:
    pool = core(capacity=1)
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0))
    pool.handle(Ready(spawn.worker_id, 0.5, 500.0))  # request 1 has it
    assert pool.handle(Arrive(2, "a", 1.0, 11.0)) == []  # every worker is busy
    assert pool.handle(Arrive(3, "a", 2.0, 5.0)) == []
    (grant,) = pool.handle(Released(spawn.worker_id, 3.0))
    assert isinstance(grant, Grant) and grant.request_id == 2 and grant.queue_ms == 2000.0  # first come
    (fail,) = pool.handle(Expire(3, 5.0))
    assert isinstance(fail, Fail) and isinstance(fail.error, CapacityExhausted)
    assert "no a worker became free within 3.0 s (1/1 workers, 0 waiting)" in str(fail.error)
    assert fail.error.retry_after_s == 2
    assert pool.handle(Expire(3, 6.0)) == []  # it is gone
    assert pool.counters["timeouts"] == 1


def test_the_first_waiter_of_another_model_takes_a_released_worker_by_eviction() -> None:
    pool = core(capacity=1)
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0))
    pool.handle(Ready(spawn.worker_id, 0.5, 500.0))
    pool.handle(Arrive(2, "b", 1.0, 11.0))
    pool.handle(Arrive(3, "a", 2.0, 12.0))
    (evicting,) = pool.handle(Released(spawn.worker_id, 3.0))  # FIFO: b came first
    assert isinstance(evicting, SpawnWorker) and evicting.request_id == 2 and evicting.evict == (spawn.worker_id,)


def test_an_evicting_spawn_goes_to_the_first_waiter() -> None:
    pool = core(capacity=1)
    a = serve(pool, 1, "a", 0.0)
    (first,) = pool.handle(Arrive(2, "b", 1.0, 11.0))
    assert isinstance(first, SpawnWorker) and first.evict == (a,) and first.request_id == 2
    assert pool.handle(Arrive(3, "b", 1.0, 11.0)) == []  # no room: it waits for request 2's worker to free up
    (grant,) = pool.handle(Ready(first.worker_id, 2.0, 1000.0))
    assert isinstance(grant, Grant) and grant.request_id == 2
    (warm,) = pool.handle(Released(first.worker_id, 2.1))
    assert isinstance(warm, Grant) and warm.request_id == 3 and not warm.cold_start


def test_a_full_queue_rejects_at_once() -> None:
    pool = core(capacity=1, queue_max=2)
    pool.handle(Arrive(1, "a", 0.0, 10.0))
    pool.handle(Arrive(2, "a", 0.0, 10.0))
    (fail,) = pool.handle(Arrive(3, "a", 0.0, 10.0))
    assert isinstance(fail, Fail) and "wait queue is full (2 requests)" in str(fail.error)
    assert pool.counters["rejected"] == 1


def test_a_start_under_way_serves_the_next_waiter_when_its_request_times_out() -> None:
    pool = core(capacity=1)
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 1.0))
    assert pool.handle(Arrive(2, "a", 0.5, 30.0)) == []
    pool.handle(Expire(1, 1.0))
    (grant,) = pool.handle(Ready(spawn.worker_id, 3.0, 3000.0))
    assert isinstance(grant, Grant) and grant.request_id == 2 and not grant.cold_start


def test_failed_starts_back_off_doubling_and_reset_on_success() -> None:
    pool = core()
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0))
    error = WorkerStartError("bundle is broken")
    assert pool.handle(StartFailed(spawn.worker_id, 0.5, error)) == [Fail(1, error)]
    (fail,) = pool.handle(Arrive(2, "a", 1.0, 11.0))
    assert isinstance(fail, Fail) and isinstance(fail.error, ModelUnavailable)
    assert "failed to start 1 time(s) in a row; next try in 0.5 s. Last error: bundle is broken" in str(fail.error)
    (spawn,) = pool.handle(Arrive(3, "a", 1.6, 11.6))  # after 1 s
    pool.handle(StartFailed(spawn.worker_id, 2.0, error))
    assert pool.backoff["a"].until == 4.0  # 2 s now
    assert isinstance(pool.handle(Arrive(4, "b", 2.0, 12.0))[0], SpawnWorker)  # other models are not held up
    (spawn,) = pool.handle(Arrive(5, "a", 4.5, 14.5))
    pool.handle(Ready(spawn.worker_id, 5.0, 500.0))
    assert "a" not in pool.backoff and pool.counters["spawn_failures"] == 2


def test_a_failed_call_stops_its_worker_and_its_request_is_tried_once_more_elsewhere() -> None:
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    (warm,) = pool.handle(Arrive(2, "a", 1.0, 11.0))
    assert isinstance(warm, Grant) and warm.worker_id == a and warm.attempt == 1
    crash = WorkerCrashed("worker died mid-call")
    stop, retry, spawn = pool.handle(Released(a, 1.1, ok=False, reason="timeout", error=crash))
    assert stop == StopWorker(a, "a", "timeout") and pool.reaps["timeout"] == 1
    assert retry == Retry(2, 2, 11.1, crash) and pool.counters["retries"] == 1  # a fresh wait of 10 s
    assert isinstance(spawn, SpawnWorker) and spawn.request_id == 2
    assert pool.workers[a].state is State.STOPPING
    assert pool.handle(Expire(2, 11.0, attempt=1)) == []  # the first try's deadline is stale
    (grant,) = pool.handle(Ready(spawn.worker_id, 2.0, 500.0))
    assert isinstance(grant, Grant) and grant.request_id == 2 and grant.attempt == 2
    # The second failure is the request's: it fails with the worker's error, nothing is queued again.
    again = WorkerCrashed("crashed again")
    commands = pool.handle(Released(spawn.worker_id, 2.5, ok=False, error=again))
    assert Fail(2, again) in commands and not any(isinstance(c, Retry) for c in commands)
    assert pool.counters["retries"] == 1 and not pool.queue and 2 not in pool.requests
    assert pool.handle(Stopped(a, 3.0)) == [] and a not in pool.workers


def test_a_request_with_one_try_fails_with_its_workers_error() -> None:
    pool = core()
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0, tries=1))
    pool.handle(Ready(spawn.worker_id, 0.5, 500.0))
    error = WorkerTimeout("too slow")
    commands = pool.handle(Released(spawn.worker_id, 1.0, ok=False, reason="timeout", error=error))
    assert commands == [StopWorker(spawn.worker_id, "a", "timeout"), Fail(1, error)]


def test_a_worker_that_dies_idle_is_stopped_and_one_that_dies_busy_is_not_reused() -> None:
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    assert pool.handle(Died(a, 1.0, "exit 137")) == [StopWorker(a, "a", "crashed", 1.0)]
    b = serve(pool, 2, "b", 2.0)
    pool.handle(Arrive(3, "b", 3.0, 13.0))
    assert pool.handle(Died(b, 3.5, "oom")) == []
    assert pool.handle(Released(b, 4.0, ok=True)) == [StopWorker(b, "b", "crashed")]
    assert pool.reaps["crashed"] == 2


def test_tick_reaps_idle_workers_past_their_ttl_oldest_first() -> None:
    pool = core(capacity=3)
    a = serve(pool, 1, "a", 0.0)
    quick = serve(pool, 2, "quick", 1.0)
    b = serve(pool, 3, "b", 2.0)
    assert pool.next_wakeup() == 6.0  # quick: 1 + 5 s
    assert pool.handle(Tick(6.0)) == []  # not yet: idle longer than the TTL, not as long
    assert pool.handle(Tick(6.5)) == [StopWorker(quick, "quick", "ttl", 5.5)]
    assert pool.next_wakeup() == 30.0
    assert pool.handle(Tick(33.0)) == [StopWorker(a, "a", "ttl", 33.0), StopWorker(b, "b", "ttl", 31.0)]
    assert pool.reaps["ttl"] == 3


def test_a_reused_worker_starts_its_idle_clock_again() -> None:
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    pool.handle(Arrive(2, "a", 20.0, 30.0))
    pool.handle(Released(a, 25.0))
    assert pool.handle(Tick(40.0)) == [] and pool.next_wakeup() == 55.0


def test_gpu_pressure_stops_idle_workers_lru_first_until_below_the_low_watermark() -> None:
    pool = core(capacity=3)
    ids = [serve(pool, i, m, float(i)) for i, m in enumerate("abc", start=1)]
    for worker_id in ids:
        pool.workers[worker_id].gpu_mb, pool.workers[worker_id].device = 3000, "0"
    commands = pool.handle(Tick(4.0, [GpuReading("0", 9500, 10_000)]))
    assert [(c.worker_id, c.reason) for c in commands if isinstance(c, StopWorker)] == [(ids[0], "gpu_pressure")]


def test_close_fails_waiters_and_stop_all_stops_every_worker() -> None:
    pool = core(capacity=1)
    a = serve(pool, 1, "a", 0.0)
    pool.handle(Arrive(2, "a", 1.0, 11.0))
    assert pool.handle(Arrive(3, "b", 1.0, 11.0)) == []
    (fail,) = pool.handle(Close(2.0))
    assert fail.request_id == 3 and isinstance(fail.error, BackendUnavailable)
    assert isinstance(pool.handle(Arrive(4, "a", 2.0, 12.0))[0], Fail)
    assert pool.in_flight()
    assert pool.handle(StopAll(3.0)) == [StopWorker(a, "a", "shutdown")]


def test_a_worker_that_comes_up_after_shutdown_is_stopped() -> None:
    pool = core()
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0))
    pool.handle(Close(1.0))
    pool.handle(StopAll(1.0))
    pool.handle(Stopped(spawn.worker_id, 1.1))
    assert pool.handle(Ready(spawn.worker_id, 2.0, 2000.0)) == [StopWorker(spawn.worker_id, "", "shutdown")]


def test_configure_shrinks_the_pool_and_applies_new_ttls_to_idle_workers() -> None:
    pool = core(capacity=3)
    a = serve(pool, 1, "a", 0.0)
    serve(pool, 2, "b", 1.0)
    commands = pool.handle(Configure(CoreConfig(capacity=1, default_ttl_s=100), 2.0))
    assert commands == [StopWorker(a, "a", "evicted", 2.0)]
    assert pool.next_wakeup() == 101.0


def test_adaptive_keep_alive_unloads_and_prewarms_before_the_expected_request() -> None:
    pool = core(keepalive="adaptive", capacity=2)
    now, worker = 0.0, ""
    for request_id in range(1, 13):  # one request every 600 s: a clear period
        commands = pool.handle(Arrive(request_id, "a", now, now + 10))
        if commands and isinstance(commands[0], SpawnWorker):
            worker = commands[0].worker_id
            pool.handle(Ready(worker, now + 2, 2000.0))
        released = pool.handle(Released(worker, now + 2.1))
        for command in pool.handle(Tick(now + 2.2)):  # fixed fallback (TTL 30 s) until the history is long enough
            released.append(command)
        for command in released:
            if isinstance(command, StopWorker):
                pool.handle(Stopped(command.worker_id, now + 2.5))
        if pool.prewarm_at:
            due = pool.prewarm_at["a"]
            (prewarm,) = pool.handle(Tick(due))
            assert isinstance(prewarm, SpawnWorker) and prewarm.request_id is None
            pool.handle(Ready(prewarm.worker_id, due + 2, 2000.0))
            worker = prewarm.worker_id
        now += 600
    window = pool.window("a")
    assert window.source == "histogram" and 450 < window.prewarm_s < 600
    assert pool.counters["prewarms"] >= 1
    (grant,) = pool.handle(Arrive(99, "a", now, now + 10))  # served by the pre-warmed worker
    assert isinstance(grant, Grant) and not grant.cold_start


def test_unknown_events_for_unknown_workers_change_nothing() -> None:
    pool = core()
    assert pool.handle(Released("nope", 0.0)) == [] and pool.handle(Died("nope", 0.0, "x")) == []
    assert (
        pool.handle(Stopped("nope", 0.0)) == [] and pool.handle(StartFailed("nope", 0.0, WorkerStartError("x"))) == []
    )
    assert pool.handle(Expire(42, 0.0)) == []


def test_capacity_zero_means_unbounded() -> None:
    pool = core(capacity=0, queue_max=64)
    spawns = [pool.handle(Arrive(i, "a", 0.0, 10.0))[0] for i in range(1, 40)]
    assert all(isinstance(s, SpawnWorker) for s in spawns) and len(pool.workers) == 39


def test_a_request_waits_for_a_start_nobody_claimed_instead_of_starting_another() -> None:
    pool = core(capacity=2)
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 1.0))
    pool.handle(Expire(1, 1.0))  # its request gave up; the start goes on
    assert pool.handle(Arrive(2, "a", 1.5, 11.5)) == []  # it claims that start rather than a second one
    (grant,) = pool.handle(Ready(spawn.worker_id, 2.0, 2000.0))
    assert isinstance(grant, Grant) and grant.request_id == 2 and grant.cold_start
    assert len(pool.workers) == 1


def test_stop_all_fails_requests_still_waiting_for_a_start() -> None:
    pool = core()
    (spawn,) = pool.handle(Arrive(1, "a", 0.0, 10.0))
    assert pool.handle(Close(1.0)) == []  # its start is under way: it may still be served within the grace
    stop, fail = pool.handle(StopAll(2.0))
    assert stop == StopWorker(spawn.worker_id, "a", "shutdown") and isinstance(fail, Fail)
    assert isinstance(fail.error, BackendUnavailable) and pool.queue == collections.deque()


def test_a_sound_worker_finishing_during_shutdown_is_stopped_as_shutdown_not_crashed() -> None:
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    pool.handle(Arrive(2, "a", 1.0, 11.0))
    pool.handle(Close(2.0))
    assert pool.handle(Released(a, 2.5)) == [StopWorker(a, "a", "shutdown")]
    assert pool.reaps["crashed"] == 0


def test_prewarms_count_from_the_last_arrival_and_allow_for_the_start_and_a_late_tick() -> None:
    pool = core(keepalive="adaptive", tick_s=1.0)
    worker = ""
    for request_id in range(1, 13):
        now = (request_id - 1) * 600.0
        for command in pool.handle(Arrive(request_id, "a", now, now + 10)):
            if isinstance(command, SpawnWorker):
                worker = command.worker_id
                pool.handle(Ready(worker, now + 2, 2000.0))
        for command in pool.handle(Released(worker, now + 5.0)):  # 5 s after its arrival
            if isinstance(command, StopWorker):
                pool.handle(Stopped(command.worker_id, now + 5.5))
        for command in pool.handle(Tick(now + 6)):
            if isinstance(command, StopWorker):
                pool.handle(Stopped(command.worker_id, now + 6.5))
        due = pool.prewarm_at.get("a")
        if due is not None:
            window = pool.window("a")
            assert due == pytest.approx(now + window.prewarm_s - 2.0 - 1.0)  # arrival + pre-warm - start - tick
            (prewarm,) = pool.handle(Tick(due))
            worker = prewarm.worker_id
            pool.handle(Ready(worker, due + 2, 2000.0))
    assert pool.counters["prewarms"] >= 1


def test_stray_reports_about_a_busy_worker_change_nothing() -> None:
    """A second Ready, a StartFailed or a Stopped for a worker that is serving are stray
    (no shell sends them, but a backend bug might): the worker stays busy with its call,
    nobody else is granted it, and it is not dropped from the table."""
    pool = core()
    a = serve(pool, 1, "a", 0.0)
    (grant,) = pool.handle(Arrive(2, "a", 1.0, 11.0))
    assert isinstance(grant, Grant) and grant.worker_id == a
    assert pool.handle(Ready(a, 1.1, 100.0)) == []
    assert pool.handle(StartFailed(a, 1.2, WorkerStartError("late"))) == []
    assert pool.handle(Stopped(a, 1.3)) == []
    assert pool.workers[a].state is State.BUSY and pool.counters["spawn_failures"] == 0
    (spawn,) = pool.handle(Arrive(3, "a", 1.4, 11.4))  # it is still busy: a new worker for the next request
    assert isinstance(spawn, SpawnWorker)
