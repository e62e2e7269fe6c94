"""Dynamic batching and priority in the pool core: which requests share a worker call,
when a batch waits for more, and how batch work yields to interactive work."""

from __future__ import annotations

from dataclasses import replace

import pytest

from scheduler.core import BATCH, INTERACTIVE, CoreConfig, Fail, Grant, PoolCore, SpawnWorker
from scheduler.errors import CapacityExhausted
from scheduler.events import Arrive, Expire, Ready, Released, Tick

# Model "b" batches up to 4 images, waiting at most 10 ms; "s" does not batch.
CONFIG = CoreConfig(capacity=2, default_ttl_s=30, batching={"b": (4, 0.010)}, interactive_reserve_s=5.0)


def core(**changes: object) -> PoolCore:
    return PoolCore(replace(CONFIG, **changes), id_prefix="w")  # type: ignore[arg-type]


def warm(pool: PoolCore, model: str, now: float, request_id: int = 900) -> str:
    """Start a worker of ``model`` and leave it idle; returns its id."""
    (spawn,) = pool.handle(Arrive(request_id, model, now, now + 10))
    assert isinstance(spawn, SpawnWorker)
    (grant,) = pool.handle(Ready(spawn.worker_id, now, 100.0))
    assert isinstance(grant, Grant)
    pool.handle(Released(spawn.worker_id, now))
    return spawn.worker_id


def busy_and_idle(pool: PoolCore, model: str, now: float) -> tuple[str, str]:
    """Two workers of ``model``: one serving request 800, one idle."""
    starts = pool.handle(Arrive(800, model, now, now + 10)) + pool.handle(Arrive(801, model, now, now + 10))
    ids = [s.worker_id for s in starts if isinstance(s, SpawnWorker)]
    for worker_id in ids:
        pool.handle(Ready(worker_id, now, 100.0))
    pool.handle(Released(ids[1], now))
    return ids[0], ids[1]


def grants(commands: list[object]) -> list[Grant]:
    return [c for c in commands if isinstance(c, Grant)]


def test_requests_waiting_for_a_busy_worker_go_together_up_to_the_max_batch_size() -> None:
    pool = core(capacity=1)
    worker = warm(pool, "b", 0.0)
    (first,) = grants(pool.handle(Arrive(1, "b", 1.0, 11.0)))  # a lone request on a quiet pool goes at once
    assert first.request_id == 1 and first.batch == () and pool.next_batch_due() is None
    for request_id in range(2, 8):  # six arrive while the worker is busy
        assert pool.handle(Arrive(request_id, "b", 1.02, 11.0)) == []
    batch = grants(pool.handle(Released(worker, 1.05)))
    assert [g.request_id for g in batch] == [2, 3, 4, 5]  # FIFO, four images: full, no waiting
    assert all(g.batch == (2, 3, 4, 5) and g.worker_id == worker for g in batch)
    assert pool.counters["batches"] == 1 and pool.counters["batched_requests"] == 4
    assert pool.workers[worker].served == 6  # requests, not calls (the warm-up one and five)
    rest = grants(pool.handle(Released(worker, 1.06)))  # two left: not full, but they have waited 40 ms
    assert [g.request_id for g in rest] == [6, 7] and rest[0].batch == (6, 7)


def test_while_another_worker_serves_a_batch_that_is_not_full_waits_at_most_max_wait() -> None:
    pool = core()
    busy_and_idle(pool, "b", 0.0)  # traffic: one worker is serving
    assert pool.handle(Arrive(1, "b", 1.000, 11.0)) == []
    assert pool.next_wakeup() is not None and abs(pool.next_batch_due() - 1.010) < 1e-9  # type: ignore[operator]
    assert pool.handle(Arrive(2, "b", 1.004, 11.0)) == []
    assert pool.handle(Tick(1.009)) == []  # not yet: due at the oldest member's arrival + 10 ms
    batch = grants(pool.handle(Tick(1.011)))
    assert [g.request_id for g in batch] == [1, 2] and batch[0].queue_ms == 11.0 and batch[1].queue_ms == 7.0
    assert pool.next_batch_due() is None


def test_a_batch_goes_at_once_when_it_is_full_or_the_next_request_does_not_fit() -> None:
    pool = core(capacity=3)
    busy_and_idle(pool, "b", 0.0)
    assert pool.handle(Arrive(1, "b", 1.0, 11.0, size=3)) == []
    batch = grants(pool.handle(Arrive(2, "b", 1.001, 11.0, size=1)))
    assert [g.request_id for g in batch] == [1, 2]  # 3 + 1 = 4 images: full
    pool2 = core(capacity=3)
    busy_and_idle(pool2, "b", 0.0)
    assert pool2.handle(Arrive(1, "b", 1.0, 11.0, size=3)) == []
    # 3 + 2 > 4: waiting cannot fill this batch, so it goes now; the second waits for a worker.
    commands = pool2.handle(Arrive(2, "b", 1.001, 11.0, size=2))
    assert [g.request_id for g in grants(commands)] == [1]
    assert any(isinstance(c, SpawnWorker) for c in commands)  # the second gets its own worker


def test_models_without_batching_are_served_one_request_per_call_at_once() -> None:
    pool = core(capacity=1)
    worker = warm(pool, "s", 0.0)
    (grant,) = pool.handle(Arrive(1, "s", 1.0, 11.0))
    assert isinstance(grant, Grant) and grant.batch == () and pool.next_batch_due() is None
    assert pool.handle(Arrive(2, "s", 1.0, 11.0)) == [] and pool.handle(Arrive(3, "s", 1.0, 11.0)) == []
    assert [g.request_id for g in grants(pool.handle(Released(worker, 1.1)))] == [2]


def test_each_member_keeps_its_own_deadline() -> None:
    pool = core(capacity=1)
    worker = warm(pool, "b", 0.0)
    assert len(grants(pool.handle(Arrive(1, "b", 1.0, 11.0)))) == 1  # the worker is busy from here
    pool.handle(Arrive(2, "b", 1.1, 1.5))  # gives up at 1.5
    pool.handle(Arrive(3, "b", 1.2, 11.0))
    (fail,) = pool.handle(Expire(2, 1.5))
    assert isinstance(fail, Fail) and isinstance(fail.error, CapacityExhausted)
    batch = grants(pool.handle(Released(worker, 2.0)))
    assert [g.request_id for g in batch] == [3]  # the expired one is not served
    # A companion whose deadline has passed (its expiry not yet delivered) is left out.
    pool.handle(Arrive(4, "b", 2.1, 12.0))
    pool.handle(Arrive(5, "b", 2.1, 2.2))
    assert [g.request_id for g in grants(pool.handle(Released(worker, 2.5)))] == [4]
    (late,) = pool.handle(Expire(5, 2.5))
    assert isinstance(late, Fail) and isinstance(late.error, CapacityExhausted)


def test_the_worker_started_for_a_request_takes_its_companions_without_waiting() -> None:
    pool = core(capacity=1)
    (spawn,) = pool.handle(Arrive(1, "b", 0.0, 10.0))
    assert pool.handle(Arrive(2, "b", 0.1, 10.0)) == [] and pool.handle(Arrive(3, "b", 0.2, 10.0)) == []
    batch = grants(pool.handle(Ready(spawn.worker_id, 1.0, 1000.0)))
    assert [g.request_id for g in batch] == [1, 2, 3]
    assert [g.cold_start for g in batch] == [True, False, False]  # the start was for request 1
    assert pool.counters["cold_starts"] == 1 and pool.counters["warm_hits"] == 2


def test_interactive_waiters_go_before_batch_waiters_and_are_not_mixed_with_them() -> None:
    pool = core(capacity=1, interactive_reserve_s=0.0)
    worker = warm(pool, "b", 0.0)
    grants(pool.handle(Arrive(1, "b", 1.0, 60.0, size=4, priority=BATCH)))  # takes the worker: full batch
    pool.handle(Arrive(2, "b", 1.1, 60.0, size=2, priority=BATCH))
    pool.handle(Arrive(3, "b", 1.2, 60.0, priority=INTERACTIVE))
    pool.handle(Arrive(4, "b", 1.3, 60.0, size=2, priority=BATCH))
    pool.handle(Arrive(5, "b", 1.4, 60.0, priority=INTERACTIVE))
    first = grants(pool.handle(Released(worker, 2.0)))
    assert [g.request_id for g in first] == [3, 5]  # both interactive, ahead of older batch work
    assert pool.counters["queue_jumps"] == 2  # each went ahead of batch request 2, which came first
    second = grants(pool.handle(Released(worker, 2.1)))
    assert [g.request_id for g in second] == [2, 4]
    grants(pool.handle(Released(worker, 2.2)))
    grants(pool.handle(Arrive(6, "b", 2.3, 60.0, priority=INTERACTIVE)))  # nothing older waits: no jump
    assert pool.counters["queue_jumps"] == 2


def test_batch_work_never_takes_the_last_free_slot_while_interactive_work_waits() -> None:
    pool = core(capacity=2, batching={}, interactive_reserve_s=0.0)
    (spawn_a,) = pool.handle(Arrive(1, "a", 0.0, 60.0))  # interactive: its worker starts in one slot
    assert isinstance(spawn_a, SpawnWorker)
    # The other slot is the last free one, and request 1 is still waiting.
    assert pool.handle(Arrive(2, "c", 0.1, 60.0, priority=BATCH)) == []
    # Once request 1 is served nobody interactive waits: the batch request may start a worker.
    commands = pool.handle(Ready(spawn_a.worker_id, 1.0, 1000.0))
    assert [g.request_id for g in grants(commands)] == [1]
    (spawn_c,) = [c for c in commands if isinstance(c, SpawnWorker)]
    assert spawn_c.model == "c" and spawn_c.request_id == 2


def test_after_interactive_traffic_batch_work_leaves_one_slot_free_for_a_while() -> None:
    pool = core(capacity=2, batching={}, interactive_reserve_s=5.0)
    starts = pool.handle(Arrive(900, "s", 0.0, 10.0)) + pool.handle(
        Arrive(901, "s", 0.0, 10.0)
    )  # two interactive at t=0
    ids = [spawn.worker_id for spawn in starts if isinstance(spawn, SpawnWorker)]
    for worker_id in ids:
        pool.handle(Ready(worker_id, 0.0, 100.0))
    for worker_id in ids:
        pool.handle(Released(worker_id, 0.0))
    assert grants(pool.handle(Arrive(1, "s", 1.0, 60.0, priority=BATCH)))  # two idle: one may go to batch work
    assert pool.handle(Arrive(2, "s", 1.0, 60.0, priority=BATCH)) == []  # the last one stays free...
    (grant,) = pool.handle(Arrive(3, "s", 1.5, 60.0))  # ...for the interactive request that comes
    assert isinstance(grant, Grant) and grant.request_id == 3
    worker = grant.worker_id
    assert grants(pool.handle(Released(worker, 6.4))) == []  # 4.9 s after it: still kept
    assert [g.request_id for g in grants(pool.handle(Tick(6.5)))] == [2]  # 5 s of no interactive traffic


def test_on_a_pool_of_one_batch_work_runs_whenever_no_interactive_request_waits() -> None:
    pool = core(capacity=1, batching={}, interactive_reserve_s=5.0)
    worker = warm(pool, "s", 0.0)  # interactive traffic just now
    (grant,) = pool.handle(Arrive(1, "s", 0.1, 60.0, priority=BATCH))  # the reserve needs two slots
    assert isinstance(grant, Grant)
    pool.handle(Arrive(2, "s", 0.2, 60.0, priority=BATCH))
    pool.handle(Arrive(3, "s", 0.3, 60.0))
    assert [g.request_id for g in grants(pool.handle(Released(worker, 0.5)))] == [3]  # one batch call, then it


def test_a_worker_started_for_batch_work_serves_a_waiting_interactive_request_first() -> None:
    pool = core(capacity=1, batching={}, interactive_reserve_s=0.0)
    (spawn,) = pool.handle(Arrive(1, "s", 0.0, 60.0, priority=BATCH))
    assert isinstance(spawn, SpawnWorker)
    pool.handle(Arrive(2, "s", 0.5, 60.0))  # interactive, while the batch request's worker starts
    (grant,) = grants(pool.handle(Ready(spawn.worker_id, 1.0, 1000.0)))
    assert grant.request_id == 2
    assert [g.request_id for g in grants(pool.handle(Released(spawn.worker_id, 1.1)))] == [1]


def test_an_unknown_priority_is_refused() -> None:
    with pytest.raises(ValueError, match="priority"):
        core().handle(Arrive(1, "s", 0.0, 1.0, priority="urgent"))


def test_a_worker_kept_for_a_held_batch_is_not_evicted_for_another_model() -> None:
    pool = core()
    _, idle = busy_and_idle(pool, "b", 0.0)
    assert pool.handle(Arrive(1, "b", 1.0, 11.0)) == []  # held on the idle worker
    assert pool.handle(Arrive(2, "s", 1.001, 11.0)) == []  # it waits: the idle worker is spoken for
    assert idle in pool.workers and pool.reaps["evicted"] == 0
    (grant,) = grants(pool.handle(Tick(1.011)))
    assert grant.request_id == 1 and grant.worker_id == idle


def test_batch_work_held_back_by_the_reserve_is_woken_when_the_reserve_ends() -> None:
    pool = core(capacity=2, batching={}, interactive_reserve_s=5.0)
    warm(pool, "s", 0.0)  # interactive traffic at t=0; one idle worker, one empty slot
    assert grants(pool.handle(Arrive(1, "s", 1.0, 60.0, priority=BATCH)))  # two slots free: one may go to batch work
    assert pool.handle(Arrive(2, "s", 1.0, 60.0, priority=BATCH)) == []  # the last one is kept
    assert pool.next_batch_due() == 5.0 and pool.next_wakeup() == 5.0  # the live batcher ticks then
    (started,) = pool.handle(Tick(5.0))
    assert isinstance(started, SpawnWorker) and started.request_id == 2


def test_waiting_batch_work_never_fills_the_queue_for_interactive_requests() -> None:
    pool = core(capacity=1, queue_max=2, batching={})
    warm(pool, "s", 0.0)
    pool.handle(Arrive(1, "s", 0.1, 60.0))  # busy now
    assert pool.handle(Arrive(2, "s", 0.2, 60.0, priority=BATCH)) == []
    assert pool.handle(Arrive(3, "s", 0.3, 60.0, priority=BATCH)) == []
    (full,) = pool.handle(Arrive(4, "s", 0.4, 60.0, priority=BATCH))
    assert isinstance(full, Fail) and "queue is full (2 requests)" in str(full.error)
    assert pool.handle(Arrive(5, "s", 0.5, 60.0)) == []  # interactive has its own room
