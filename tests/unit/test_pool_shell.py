"""The live shell's threads against the core's decisions: a call killed by a shutdown,
batch members whose sender's call fails, and the timer with a TTL of "never"."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from scheduler.clock import MonotonicClock
from scheduler.errors import BackendUnavailable
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.unit.fakes import FakeBackend, FakeConnection, make_bundle


def leftovers(pool: WarmPool) -> tuple[list[int], list[int], dict[str, tuple[int, ...]]]:
    """What the shell and the core still hold for requests: nothing once all are answered."""
    return list(pool._waiters), list(pool.core.requests), dict(pool.core.serving)


def test_a_call_killed_by_a_shutdown_fails_its_request_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grace period ends with a call in flight: the shutdown stops its worker, the call
    then fails, and the core must still settle the request (it once ignored the release
    of a worker no longer busy, and the request's thread spun on Expire for ever)."""
    make_bundle(tmp_path, "a")
    backend = FakeBackend()
    backend.outcomes["a"].append("crash")  # the killed container drops the connection
    entered, gate = threading.Event(), threading.Event()
    predict = FakeConnection.predict

    def held(self: FakeConnection, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(10)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(FakeConnection, "predict", held)
    settings = Settings(models_dir=tmp_path, max_workers=1, stem_cells=0, queue_timeout_s=0.3)
    pool = WarmPool(backend, ModelCatalog(tmp_path), settings, MonotonicClock(), GpuMonitor(()), INLINE)
    pool.start(background=False)
    events: list[str] = []
    pool.recorder = lambda event, commands: events.append(type(event).__name__)
    outcome: list[Any] = []

    def request() -> None:
        try:
            outcome.append(pool.predict("a", b"x"))
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            outcome.append(exc)

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    assert entered.wait(10)
    pool.shutdown(grace_s=0)
    gate.set()
    thread.join(5)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], BackendUnavailable)
    assert events.count("Expire") <= 1 and leftovers(pool) == ([], [], {})


def test_batch_members_wait_for_their_senders_failed_call_and_are_served_again(tmp_path: Path) -> None:
    """The sender's batch call outlives the request timeout and then crashes: each member
    waits for it (none gives up and leaves its request to the core with nobody waiting),
    goes round again, and nothing is left behind; the pool serves the next request warm."""
    make_bundle(tmp_path, "b", batching={"max_batch_size": 4, "max_wait_ms": 0})
    backend = FakeBackend()
    backend.outcomes["b"].append("crash")
    backend.on_batch = lambda worker_id, images: time.sleep(0.5)
    settings = Settings(models_dir=tmp_path, max_workers=1, stem_cells=0, queue_timeout_s=5, request_timeout_s=0.2)
    pool = WarmPool(backend, ModelCatalog(tmp_path), settings, MonotonicClock(), GpuMonitor(()))
    pool.start(background=False)
    busy = pool.acquire("b", pool.clock.now() + 5)  # the worker serves: the next three gather behind it
    answers: dict[int, Any] = {}

    def request(index: int) -> None:
        try:
            answers[index] = pool.predict("b", bytes([index]))
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            answers[index] = exc

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while pool.snapshot().queue_depth < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.release(busy)
    for thread in threads:
        thread.join(15)
    try:
        assert all(not thread.is_alive() for thread in threads)
        assert all(getattr(answers[i], "attempts", None) == 2 for i in range(3)), answers
        assert pool.snapshot().counters["retries"] == 3 and leftovers(pool) == ([], [], {})
        assert not pool.predict("b", b"c").cold_start
    finally:
        pool.shutdown(grace_s=0)


def test_the_timer_outlives_a_ttl_of_never_and_still_sends_held_batches(tmp_path: Path) -> None:
    """A bundle whose idle_ttl_s was 1e10 (a TTL of "never") put the timer's next wake-up
    past what a wait can take, and its thread died; held batches then waited for the
    reaper. Bundles now take at most a week (the settings table's bound, which
    test_bundle.py holds them to), and the timer sleeps at most an hour at a time; with
    the longest TTL a bundle may have, held batches still go at their own time."""
    make_bundle(tmp_path, "forever", idle_ttl_s=7 * 86400)
    make_bundle(tmp_path, "b", batching={"max_batch_size": 8, "max_wait_ms": 50})
    settings = Settings(models_dir=tmp_path, max_workers=3, stem_cells=0, reap_interval_s=30)
    pool = WarmPool(FakeBackend(), ModelCatalog(tmp_path), settings, MonotonicClock(), GpuMonitor(()))
    pool.start()
    try:
        timer = next(t for t in pool._threads if t.name == "wanwu-timer")
        pool.predict("forever", b"x")
        time.sleep(0.2)
        assert timer.is_alive()
        busy = pool.acquire("b", pool.clock.now() + 5)  # a worker of b serves: a lone request is held
        pool.release(pool.acquire("b", pool.clock.now() + 5))  # and a second one is idle for it
        started = time.monotonic()
        answer = pool.predict("b", b"1", queue_timeout_s=3)
        assert answer.model == "b" and time.monotonic() - started < 1.0  # its 50 ms, not the reaper's 30 s
        pool.release(busy)
    finally:
        pool.shutdown(grace_s=0)
