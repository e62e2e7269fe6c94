"""Invariants of the pool under random operations (hypothesis state machine):

- never more than N live containers;
- a busy worker is never stopped;
- a lease is never handed to two requests;
- every acquire ends in a lease or an error, by its deadline.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.errors import CapacityExhausted, ModelUnavailable, WanwuError, WorkerStartError
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import GpuReading
from scheduler.pool import INLINE, Lease, WarmPool
from scheduler.settings import Settings
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

MODELS = ("a", "b", "c")
_models_dir = Path(tempfile.mkdtemp(prefix="wanwu-prop-"))
atexit.register(shutil.rmtree, _models_dir, True)  # made at import for the state machine; gone at exit
for _name in MODELS:
    make_bundle(_models_dir, _name, gpu_memory_mb=2000, idle_ttl_s=10 if _name == "c" else None)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.capacity = 2
        self.clock = FakeClock()
        self.backend = FakeBackend()
        self.leases: list[Lease] = []
        self.violations: list[str] = []
        self.backend.on_stop = self._check_stop
        config = Settings(models_dir=_models_dir, max_workers=self.capacity, queue_timeout_s=3, gpus=("0",))
        self.pool = WarmPool(
            self.backend,
            ModelCatalog(_models_dir, clock=self.clock),
            config,
            clock=self.clock,
            gpu=GpuMonitor(()),
            executor=INLINE,
        )
        self.pool.start(background=False)
        self.pool._readings = [GpuReading("0", 0, 10_000)]

    def _check_stop(self, worker_id: str) -> None:
        if any(lease.worker_id == worker_id for lease in self.leases):
            self.violations.append(f"stopped busy worker {worker_id}")

    @rule(model=st.sampled_from(MODELS), wait=st.floats(0, 4))
    def acquire(self, model: str, wait: float) -> None:
        deadline = self.clock.now() + wait
        try:
            lease = self.pool.acquire(model, deadline)
        except (CapacityExhausted, ModelUnavailable, WorkerStartError):
            assert self.clock.now() <= deadline + 1e-9
            return
        assert self.clock.now() <= deadline + 1e-9
        assert lease.model == model
        self.leases.append(lease)

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 10), ok=st.booleans())
    def release(self, index: int, ok: bool) -> None:
        lease = self.leases.pop(index % len(self.leases))
        self.pool.release(lease, ok=ok, reason="crashed")

    @rule(seconds=st.floats(0, 40))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(used=st.floats(0, 10_000))
    def reap(self, used: float) -> None:
        self.pool.reap(readings=[GpuReading("0", used, 10_000)])

    @rule(model=st.sampled_from(MODELS))
    def break_next_spawn(self, model: str) -> None:
        self.backend.fail_next_spawns(model)

    @precondition(lambda self: self.backend.live)
    @rule(index=st.integers(0, 10))
    def worker_dies(self, index: int) -> None:
        worker_id = sorted(self.backend.live)[index % len(self.backend.live)]
        self.pool.on_worker_exit(worker_id, "exit 137")

    @invariant()
    def never_more_than_n_live(self) -> None:
        assert self.backend.peak <= self.capacity
        assert len(self.pool.snapshot().workers) <= self.capacity

    @invariant()
    def a_lease_is_held_once(self) -> None:
        ids = [lease.worker_id for lease in self.leases]
        assert len(ids) == len(set(ids))

    @invariant()
    def busy_workers_are_leased(self) -> None:
        busy = {w.id for w in self.pool.snapshot().workers if w.state == "busy"}
        assert busy == {lease.worker_id for lease in self.leases}

    @invariant()
    def no_busy_worker_was_stopped(self) -> None:
        assert not self.violations, self.violations

    def teardown(self) -> None:
        for lease in self.leases:
            self.pool.release(lease)
        self.pool.shutdown(grace_s=0)
        assert self.backend.live == {}


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_concurrent_requests_never_exceed_capacity() -> None:
    """Real threads and the real clock: 24 requests over 3 models on 2 slots."""
    from scheduler.clock import MonotonicClock

    backend = FakeBackend()
    pool = WarmPool(
        backend,
        ModelCatalog(_models_dir),
        Settings(models_dir=_models_dir, max_workers=2, queue_timeout_s=30),
        clock=MonotonicClock(),
        gpu=GpuMonitor(()),
    )
    pool.start(background=False)
    errors: list[WanwuError] = []
    answers: list[str] = []

    def client(i: int) -> None:
        model = MODELS[i % 3]
        try:
            answer = pool.predict(model, str(i).encode())
            answers.append(answer.predictions[0]["label"])
            assert answer.predictions[0]["label"] == f"{model}:{i}"
        except WanwuError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    pool.shutdown(grace_s=5)
    assert not errors and len(answers) == 24
    assert backend.peak <= 2 and backend.live == {}
