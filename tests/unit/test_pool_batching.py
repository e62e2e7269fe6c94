"""Dynamic batching and priority in the live pool (fake backend, real threads): one
worker call for several callers, each with its own answer; batch work behind interactive."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from wanwu_worker.bundle import labels_digest

from scheduler.clock import MonotonicClock
from scheduler.errors import WanwuError, WorkerRejected
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import BATCH, INLINE, LabelSubset, PoolAnswer, WarmPool
from scheduler.scoring import subset_predictions
from scheduler.settings import Settings
from scheduler.worker_client import Scores
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle


@pytest.fixture
def models(tmp_path: Path) -> Path:
    make_bundle(tmp_path, "b", batching={"max_batch_size": 8, "max_wait_ms": 50})
    make_bundle(tmp_path, "now", batching={"max_batch_size": 4, "max_wait_ms": 0})
    make_bundle(tmp_path, "s")
    labels = ("甲", "乙", "丙", "丁")
    make_bundle(
        tmp_path, "sub", batching={"max_batch_size": 8, "max_wait_ms": 50}, labels=labels, subsets={"前": ["甲", "乙"]}
    )
    return tmp_path


def live_pool(backend: FakeBackend, models: Path, **settings: object) -> WarmPool:
    """Real time and threads (the batcher ticks held batches), one worker by default."""
    config = Settings(models_dir=models, **{"max_workers": 1, "stem_cells": 0, **settings})  # type: ignore[arg-type]
    pool = WarmPool(backend, ModelCatalog(models), config, clock=MonotonicClock(), gpu=GpuMonitor(()))
    pool.start()
    return pool


def in_threads(calls: list[Callable[[], Any]], pool: WarmPool) -> tuple[list[threading.Thread], list[Any]]:
    """Start ``calls`` one after another, each once the previous one waits in the queue."""
    results: list[Any] = [None] * len(calls)
    threads = []
    for i, call in enumerate(calls):

        def run(i: int = i, call: Callable[[], Any] = call) -> None:
            try:
                results[i] = call()
            except WanwuError as exc:
                results[i] = exc

        depth = pool.snapshot().queue_depth
        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)
        while pool.snapshot().queue_depth == depth:
            threading.Event().wait(0.001)
    return threads, results


def test_callers_waiting_together_share_one_worker_call_and_get_their_own_answers(
    models: Path,
) -> None:
    backend = FakeBackend()
    pool = live_pool(backend, models)
    lease = pool.acquire("b", pool.clock.now() + 5)  # the only worker is busy
    calls = [lambda i=i: pool.predict("b", str(i).encode(), top_k=1 + i % 2) for i in range(6)]
    calls.append(lambda: pool.predict("b", b"bad"))
    threads, results = in_threads(calls, pool)
    pool.release(lease)
    for thread in threads:
        thread.join(10)
    connection = backend.connections[lease.worker_id]
    assert connection.batches == [7]  # one call for all seven
    for i in range(6):
        answer = results[i]
        assert isinstance(answer, PoolAnswer), answer
        assert answer.predictions[0]["label"] == f"b:{i}" and len(answer.predictions) == 1 + i % 2
        assert answer.batch_size == 7 and not answer.cold_start
    assert isinstance(results[6], WorkerRejected) and results[6].status == 415  # only its own image failed
    counters = pool.snapshot().counters
    assert counters["batches"] == 1 and counters["batched_requests"] == 7
    pool.shutdown(grace_s=0)


def test_a_request_waits_for_companions_only_while_another_worker_serves(models: Path) -> None:
    backend = FakeBackend()
    pool = live_pool(backend, models, max_workers=2)
    busy = pool.acquire("b", pool.clock.now() + 5)
    other = pool.acquire("b", pool.clock.now() + 5)  # a second worker, given back idle
    pool.release(other)
    started = pool.clock.now()
    held = pool.predict("b", b"1")
    assert held.predictions[0]["label"] == "b:1" and held.batch_size == 1 and held.worker_id == other.worker_id
    assert held.timing_ms["queue"] >= 45  # waited its 50 ms for companions: traffic is going on
    assert pool.clock.now() - started < 5  # and then went: the batcher does not sleep through it
    pool.release(busy)
    quiet = pool.predict("b", b"2")  # nothing is serving: a lone request goes at once
    assert quiet.timing_ms["queue"] < 45
    pool.shutdown(grace_s=0)


def test_a_crash_in_a_batch_call_retries_every_member_on_another_worker(models: Path) -> None:
    backend = FakeBackend()
    pool = live_pool(backend, models)
    lease = pool.acquire("b", pool.clock.now() + 5)
    threads, results = in_threads([lambda i=i: pool.predict("b", str(i).encode()) for i in range(3)], pool)
    backend.outcomes["b"].append("crash")
    pool.release(lease)
    for thread in threads:
        thread.join(10)
    assert all(isinstance(r, PoolAnswer) and r.attempts == 2 for r in results), results
    assert [r.predictions[0]["label"] for r in results] == ["b:0", "b:1", "b:2"]
    assert len(backend.spawns) == 2 and pool.snapshot().reaps["crashed"] == 1
    pool.shutdown(grace_s=0)


def test_interactive_requests_are_served_before_batch_work_queued_earlier(models: Path) -> None:
    backend = FakeBackend()
    pool = live_pool(backend, models, interactive_reserve_s=0)
    lease = pool.acquire("s", pool.clock.now() + 5)
    calls: list[Callable[[], Any]] = [
        lambda: pool.predict("s", b"batch-1", priority=BATCH),
        lambda: pool.predict("s", b"batch-2", priority=BATCH),
        lambda: pool.predict("s", b"interactive"),
    ]
    threads, results = in_threads(calls, pool)
    pool.release(lease)
    for thread in threads:
        thread.join(10)
    assert all(isinstance(r, PoolAnswer) for r in results), results
    assert backend.connections[lease.worker_id].seen == [b"interactive", b"batch-1", b"batch-2"]
    pool.shutdown(grace_s=0)


def inline_pool(backend: FakeBackend, models: Path, **settings: object) -> WarmPool:
    clock = FakeClock()
    config = Settings(models_dir=models, **{"max_workers": 2, "stem_cells": 0, **settings})  # type: ignore[arg-type]
    pool = WarmPool(
        backend, ModelCatalog(models, clock=clock), config, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    return pool


def test_predict_batch_splits_into_even_calls_of_the_max_batch_size_and_keeps_the_order(models: Path) -> None:
    backend = FakeBackend()
    pool = inline_pool(backend, models)
    images = [str(i).encode() for i in range(10)]
    images[5] = b"bad"
    answer = pool.predict_batch("now", images, top_k=1)
    assert answer.calls == 3 and answer.cold_start
    (connection,) = backend.connections.values()
    assert connection.batches == [4, 3, 3]  # at most 4 (the bundle's max), as even as can be
    labels = [r["predictions"][0]["label"] if "predictions" in r else r["error"]["code"] for r in answer.results]
    assert labels == ["now:0", "now:1", "now:2", "now:3", "now:4", "not_an_image", "now:6", "now:7", "now:8", "now:9"]
    pool.shutdown(grace_s=0)


def test_predict_batch_without_batching_sends_one_image_per_call_and_isolates_failures(models: Path) -> None:
    backend = FakeBackend()
    pool = inline_pool(backend, models)
    backend.outcomes["s"].extend(["ok", "reject", "ok"])
    answer = pool.predict_batch("s", [b"1", b"2", b"3"])
    assert answer.calls == 3
    first, second, third = answer.results
    assert isinstance(first, dict) and first["predictions"][0]["label"] == "s:1"
    assert isinstance(second, WorkerRejected)
    assert isinstance(third, dict) and third["predictions"][0]["label"] == "s:3"
    assert backend.connections[backend.spawns[0].worker_id].batches == []  # single-image calls only
    pool.shutdown(grace_s=0)


def test_members_with_different_subsets_share_a_call_and_are_each_scored_over_their_own(models: Path) -> None:
    from tests.unit.fakes import fake_logit

    backend = FakeBackend()
    pool = live_pool(backend, models)
    lease = pool.acquire("sub", pool.clock.now() + 5)  # the only worker is busy
    named = LabelSubset(("甲", "乙"), "前")
    listed = LabelSubset(("丁", "甲"))
    calls = [
        lambda: pool.predict("sub", b"1", top_k=2, subset=named),
        lambda: pool.predict("sub", b"2", top_k=1),  # over all labels
        lambda: pool.predict("sub", b"3", top_k=2, subset=listed),
    ]
    threads, results = in_threads(calls, pool)
    pool.release(lease)
    for thread in threads:
        thread.join(10)
    connection = backend.connections[lease.worker_id]
    assert connection.batches == [3]
    # One call: the named subset by name, the listed labels by column, each label once.
    assert connection.scores == [Scores(("前",), (0, 3), 4, ("甲", "乙", "丁"), labels_digest(("甲", "乙", "丁")))]
    everything = ("甲", "乙", "丁")
    logits = [fake_logit(label) for label in everything]
    assert results[0].predictions == subset_predictions(logits, everything, named.labels, 2)
    assert results[1].predictions == [{"label": "sub:2", "score": 1.0}]
    assert results[2].predictions == subset_predictions(logits, everything, listed.labels, 2)
    assert {p["label"] for p in results[2].predictions} == {"丁", "甲"}
    assert sum(p["score"] for p in results[0].predictions) == pytest.approx(1.0, abs=1e-5)


def test_a_batch_is_spread_over_the_models_warm_workers_and_no_further(models: Path) -> None:
    """Two warm workers of the model share a batch of 4 (on the CPU a batched pass costs
    each image what it costs alone); with one warm worker and free slots, the batch
    starts nobody: spreading over empty slots would cost a cold start per call."""
    backend = FakeBackend()
    pool = WarmPool(
        backend,
        ModelCatalog(models, clock=FakeClock()),
        Settings(models_dir=models, max_workers=4, stem_cells=0),
        clock=FakeClock(),
        gpu=GpuMonitor(()),
    )
    pool.start(background=False)
    try:
        pool.predict("now", b"1")  # one warm worker of four slots
        answer = pool.predict_batch("now", [b"1", b"2", b"3", b"4"], top_k=1)
        assert answer.calls == 1 and not answer.cold_start and len(backend.spawns) == 1
        first = backend.spawns[0].worker_id
        assert backend.connections[first].batches == [4]
    finally:
        pool.shutdown(grace_s=0)
