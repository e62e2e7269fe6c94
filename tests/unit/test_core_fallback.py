"""CPU fallback: a model that no GPU has room for gets a CPU worker in a free slot.

The core with fake GPU readings (events in, commands out), the live pool's leases and
answers, and the simulator's count of fallback serves.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scheduler.backends.docker_container import WorkerSpec, run_options
from scheduler.core import CoreConfig, Fail, Grant, PoolCore, SpawnWorker, StopWorker
from scheduler.errors import CapacityExhausted
from scheduler.events import Arrive, Expire, Ready, Released, Retry, Stopped, Tick
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import GpuReading, State
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from scheduler.sim import Profile, simulate
from scheduler.traces import ModelProfile, Trace
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

CONFIG = CoreConfig(
    capacity=3,
    default_ttl_s=30,
    estimates_mb={"big": 4000, "plain": 4000, "huge": 20_000},
    cpu_fallback=frozenset({"big", "huge"}),
)
FREE = [GpuReading("0", 1000, 10_000)]
FULL = [GpuReading("0", 8000, 10_000)]  # 8000 + 4000 > 9000 (the high watermark)


def core(readings: list[GpuReading], **changes: object) -> PoolCore:
    pool = PoolCore(replace(CONFIG, **changes), id_prefix="w")  # type: ignore[arg-type]
    assert pool.handle(Tick(0.0, readings)) == []
    return pool


def start(pool: PoolCore, request_id: int, model: str, now: float) -> tuple[SpawnWorker, Grant]:
    """A request that starts a worker and gets it (busy until released)."""
    (spawn,) = pool.handle(Arrive(request_id, model, now, now + 10))
    assert isinstance(spawn, SpawnWorker) and spawn.request_id == request_id
    (grant,) = pool.handle(Ready(spawn.worker_id, now + 1, spawn_ms=1000.0))
    assert isinstance(grant, Grant) and grant.cold_start
    return spawn, grant


def test_a_full_gpu_with_a_free_slot_starts_a_cpu_worker() -> None:
    pool = core(FULL)
    spawn, grant = start(pool, 1, "big", 0.0)
    assert spawn == SpawnWorker("w0001", "big", None, (), 1, cpu_fallback=True)
    assert grant.cpu_fallback and grant.start == "container"
    worker = pool.workers["w0001"]
    assert worker.cpu_fallback and worker.device is None and worker.gpu_mb == 0.0
    assert pool.counters["cpu_fallbacks"] == 1 and pool.counters["cold_starts"] == 1


def test_a_model_no_gpu_could_ever_hold_runs_on_the_cpu_instead_of_being_rejected() -> None:
    pool = core(FREE)
    spawn, grant = start(pool, 1, "huge", 0.0)
    assert spawn.cpu_fallback and spawn.device is None and grant.cpu_fallback


def test_a_fallback_model_that_fits_goes_on_the_gpu() -> None:
    pool = core(FREE)
    spawn, grant = start(pool, 1, "big", 0.0)
    assert spawn.device == "0" and not spawn.cpu_fallback and not grant.cpu_fallback
    assert pool.counters["cpu_fallbacks"] == 0


def test_a_model_without_the_flag_waits_or_is_rejected_as_before() -> None:
    pool = core(FULL, estimates_mb={**CONFIG.estimates_mb, "giant": 20_000})
    assert pool.handle(Arrive(1, "plain", 0.0, 5.0)) == []  # waits for GPU memory
    (fail,) = pool.handle(Expire(1, 5.0))
    assert isinstance(fail, Fail) and isinstance(fail.error, CapacityExhausted)
    (reject,) = pool.handle(Arrive(2, "giant", 6.0, 16.0))
    assert isinstance(reject, Fail) and "no GPU has that much" in str(reject.error)
    assert pool.counters["cpu_fallbacks"] == 0 and not pool.workers


def test_at_n_a_fallback_takes_an_idle_workers_slot_never_a_busy_ones() -> None:
    pool = core(FREE, capacity=2)
    start(pool, 1, "plain", 0.0)  # busy on the GPU
    other, _ = start(pool, 2, "small", 1.0)
    pool.handle(Tick(2.0, FULL))
    assert pool.handle(Arrive(3, "big", 2.5, 7.5)) == []  # both busy: no slot to take
    (fail,) = pool.handle(Expire(3, 7.5))
    assert isinstance(fail, Fail) and isinstance(fail.error, CapacityExhausted)
    assert pool.handle(Released(other.worker_id, 8.0)) == []  # now idle: its slot may go, as for a GPU start
    (spawn,) = pool.handle(Arrive(4, "big", 9.0, 19.0))
    assert spawn == SpawnWorker(spawn.worker_id, "big", None, (other.worker_id,), 4, cpu_fallback=True)
    assert pool.counters["cpu_fallbacks"] == 1 and pool.reaps["evicted"] == 1


def test_a_waiting_request_gets_a_cpu_worker_once_a_slot_frees() -> None:
    pool = core(FULL, capacity=1)
    busy, _ = start(pool, 1, "huge", 0.0)  # the one slot, on the CPU
    assert pool.handle(Arrive(2, "big", 2.0, 12.0)) == []  # no slot: it waits
    stop, retry = pool.handle(Released(busy.worker_id, 3.0, ok=False))
    assert isinstance(stop, StopWorker) and isinstance(retry, Retry) and retry.request_id == 1  # it waits behind 2
    (spawn,) = pool.handle(Stopped(busy.worker_id, 3.5))
    assert isinstance(spawn, SpawnWorker) and spawn.cpu_fallback and spawn.request_id == 2


def test_an_idle_stem_cell_gives_its_slot_to_a_fallback() -> None:
    pool = core(FULL, capacity=1, stem_cells=1, estimates_mb={**CONFIG.estimates_mb, "(stem)": 500})
    (stem,) = pool.handle(Tick(0.5, [GpuReading("0", 1000, 10_000)]))
    assert isinstance(stem, SpawnWorker) and stem.model == "(stem)"
    assert pool.handle(Ready(stem.worker_id, 1.0, 500.0)) == []
    pool.handle(Tick(2.0, FULL))
    (spawn,) = pool.handle(Arrive(1, "big", 3.0, 13.0))
    assert spawn == SpawnWorker("w0002", "big", None, (stem.worker_id,), 1, cpu_fallback=True)
    (grant,) = pool.handle(Ready(spawn.worker_id, 4.0, 1000.0))
    assert isinstance(grant, Grant) and grant.cpu_fallback and grant.start == "container"  # not a stem load


def test_an_idle_fallback_worker_is_reused() -> None:
    pool = core(FULL)
    spawn, _ = start(pool, 1, "big", 0.0)
    pool.handle(Released(spawn.worker_id, 2.0))
    (grant,) = pool.handle(Arrive(2, "big", 3.0, 13.0))
    assert isinstance(grant, Grant) and grant.worker_id == spawn.worker_id
    assert grant.cpu_fallback and not grant.cold_start and grant.start == "warm"
    assert pool.counters["cpu_fallbacks"] == 1 and pool.counters["warm_hits"] == 1


def test_no_fallback_while_a_gpu_worker_of_the_model_starts_or_serves() -> None:
    pool = core(FREE)
    (spawn,) = pool.handle(Arrive(1, "big", 0.0, 30.0))
    assert spawn.device == "0"
    pool.handle(Tick(0.5, FULL))  # its start fills the GPU
    assert pool.handle(Arrive(2, "big", 0.6, 30.0)) == []  # waits for it rather than start on the CPU
    grants = pool.handle(Ready(spawn.worker_id, 1.0, spawn_ms=1000.0))
    assert [g.request_id for g in grants] == [1]
    assert pool.handle(Arrive(3, "big", 1.1, 30.0)) == []  # it is busy: the next one waits for it too
    assert [g.request_id for g in pool.handle(Released(spawn.worker_id, 1.2))] == [2]
    assert pool.counters["cpu_fallbacks"] == 0


def test_an_idle_gpu_worker_is_preferred_over_an_idle_fallback() -> None:
    pool = core(FULL)
    cpu, _ = start(pool, 1, "big", 0.0)  # no GPU room: on the CPU
    assert cpu.cpu_fallback
    pool.handle(Tick(1.5, FREE))  # the GPU frees while it serves
    gpu, _ = start(pool, 2, "big", 2.0)
    assert gpu.device == "0" and not gpu.cpu_fallback
    pool.handle(Released(gpu.worker_id, 4.0))
    pool.handle(Released(cpu.worker_id, 5.0))  # the most recently used, but on the CPU
    (grant,) = pool.handle(Arrive(3, "big", 6.0, 16.0))
    assert isinstance(grant, Grant) and grant.worker_id == gpu.worker_id and not grant.cpu_fallback
    (grant,) = pool.handle(Arrive(4, "big", 6.0, 16.0))  # the GPU one is busy: the CPU one serves
    assert isinstance(grant, Grant) and grant.worker_id == cpu.worker_id and grant.cpu_fallback


def test_an_idle_fallback_worker_is_reaped_by_ttl() -> None:
    pool = core(FULL)
    spawn, _ = start(pool, 1, "big", 0.0)
    pool.handle(Released(spawn.worker_id, 2.0))
    assert pool.handle(Tick(20.0, FULL)) == []
    (stop,) = pool.handle(Tick(32.5, FULL))
    assert stop == StopWorker(spawn.worker_id, "big", "ttl", 30.5)
    assert pool.reaps["ttl"] == 1


def test_a_fallback_worker_holds_no_gpu_memory() -> None:
    pool = core(FULL)
    (spawn,) = pool.handle(Arrive(1, "big", 0.0, 10.0))
    assert isinstance(spawn, SpawnWorker)
    pool.handle(Ready(spawn.worker_id, 1.0, 1000.0, gpu_mb=1234.0))  # whatever its health says
    assert pool.workers[spawn.worker_id].gpu_mb == 0.0
    pool.handle(Released(spawn.worker_id, 2.0))
    # GPU pressure stops idle workers on that GPU only: a CPU worker frees nothing there.
    assert pool.handle(Tick(3.0, [GpuReading("0", 9800, 10_000)])) == []
    assert pool.workers[spawn.worker_id].state is State.IDLE


def test_a_prewarm_never_starts_a_cpu_worker() -> None:
    pool = core(FULL, keepalive="adaptive")
    pool.prewarm_at["big"] = 1.0
    assert pool.handle(Tick(2.0, FULL)) == [] and pool.counters["prewarms"] == 0


def test_without_gpu_readings_nothing_changes() -> None:
    pool = core([])
    spawn, grant = start(pool, 1, "big", 0.0)
    assert spawn == SpawnWorker("w0001", "big", None, (), 1) and not grant.cpu_fallback
    assert pool.counters["cpu_fallbacks"] == 0


# -- the live pool: leases, answers and the snapshot say so ---------------------------------------


def make_pool(models: Path, backend: FakeBackend, gpus: tuple[str, ...]) -> WarmPool:
    make_bundle(models, "big", gpu_memory_mb=4000, cpu_fallback=True)
    make_bundle(models, "plain", gpu_memory_mb=4000)
    clock = FakeClock()
    settings = Settings(models_dir=models, max_workers=3, queue_timeout_s=5.0, stem_cells=0, gpus=gpus)
    catalog = ModelCatalog(models, clock=clock)
    pool = WarmPool(backend, catalog, settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE)
    pool.start(background=False)
    return pool


def test_the_pool_serves_a_fallback_model_on_the_cpu_and_says_so(tmp_path: Path) -> None:
    backend = FakeBackend()
    pool = make_pool(tmp_path, backend, gpus=("0",))
    assert pool.core.config.cpu_fallback == frozenset({"big"})
    pool._readings = FULL
    answer = pool.predict("big", b"1")
    assert answer.cpu_fallback and answer.cold_start and answer.predictions[0]["label"] == "big:1"
    assert backend.spawns[-1].device is None
    lease = pool.acquire("big", pool.clock.now() + 5)
    assert lease.cpu_fallback and not lease.cold_start
    pool.release(lease)
    assert pool.predict_batch("big", [b"1", b"2"]).cpu_fallback
    snapshot = pool.snapshot()
    assert [(w.model, w.device, w.gpu_mb) for w in snapshot.workers] == [("big", "cpu", 0.0)]
    assert snapshot.counters["cpu_fallbacks"] == 1
    with pytest.raises(CapacityExhausted):
        pool.predict("plain", b"1")  # no flag: it waits for GPU memory, as before
    pool.shutdown(grace_s=0)


def test_a_pool_without_gpus_never_falls_back(tmp_path: Path) -> None:
    backend = FakeBackend()
    pool = make_pool(tmp_path, backend, gpus=())
    assert pool.core.config.cpu_fallback == frozenset()
    answer = pool.predict("big", b"1")
    assert not answer.cpu_fallback and pool.snapshot().counters["cpu_fallbacks"] == 0
    assert pool.snapshot().workers[0].device is None
    pool.shutdown(grace_s=0)


def test_a_container_without_a_device_sees_no_gpu() -> None:
    def spec(gpus: tuple[str, ...]) -> WorkerSpec:
        return WorkerSpec("wanwu-worker:cuda", "unit", "big", "w1", Path("/models/big"), Path("/run/w1"), gpus)

    cpu = run_options(spec(()))
    assert "device_requests" not in cpu and cpu["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in run_options(spec(("0",)))["environment"]  # the runtime sets it


# -- the simulator ---------------------------------------------------------------------------------


def trace(*arrivals: tuple[float, str], memory_mb: float = 6000.0) -> Trace:
    profiles = {m: ModelProfile(m, memory_mb, ((50.0, 100.0),)) for _, m in arrivals}
    return Trace(tuple(arrivals), profiles, max(t for t, _ in arrivals), "test")


def test_the_simulator_serves_on_the_cpu_what_the_gpu_cannot_hold() -> None:
    # Two 6 GB models at once on a 10 GB GPU: the second cannot share it.
    two = trace((0, "first"), (0, "big"))
    profile = Profile(spawn_ms=1000, stop_ms=0, infer_ms=100, gpus={"0": 10_000})
    config = CoreConfig(capacity=2, default_ttl_s=30)
    waits = simulate(two, config, profile)
    assert (waits.served, waits.fallback_serves) == (2, 0)
    # The second waits for the first to finish, then takes its place on the GPU (1 s start).
    assert sorted(waits.latencies_ms) == pytest.approx([1100, 2100])
    falls = simulate(two, replace(config, cpu_fallback=frozenset({"big"})), profile)
    assert (falls.served, falls.fallback_serves, falls.cold_starts) == (2, 1, 2)
    assert sorted(falls.latencies_ms) == pytest.approx([1100, 1800])  # 100 ms at the assumed 8x slowdown
    metrics = falls.metrics()
    assert metrics["fallback_serves"] == 1 and metrics["fallback_rate"] == 0.5
    # Idle: both 1.1 -> 31.1 s (30 s), only the GPU worker's 6 GB counts.
    assert falls.idle_worker_s == pytest.approx(2 * 30, abs=1e-3)
    assert falls.idle_mb_s == pytest.approx(30 * 6000, abs=1)
    slower = simulate(two, replace(config, cpu_fallback=frozenset({"big"})), replace(profile, cpu_slowdown=20))
    assert sorted(slower.latencies_ms) == pytest.approx([1100, 3000])


def test_without_gpus_the_simulator_never_falls_back() -> None:
    two = trace((0, "big"), (0, "big"))
    config = CoreConfig(capacity=2, default_ttl_s=30, cpu_fallback=frozenset({"big"}))
    result = simulate(two, config, Profile(spawn_ms=1000, stop_ms=0, infer_ms=100))
    assert result.fallback_serves == 0 and sorted(result.latencies_ms) == pytest.approx([1100, 1100])
