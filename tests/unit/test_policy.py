"""Every rule of the pure policy, with symbols and fixed timestamps."""

from __future__ import annotations

import pytest

from scheduler.policy import (
    GpuReading,
    Limits,
    Reject,
    Reuse,
    Spawn,
    State,
    Wait,
    WorkerView,
    batch_calls,
    decide,
    expired,
    projected_used_mb,
    under_pressure,
)

IDLE, BUSY, STARTING, STOPPING = State.IDLE, State.BUSY, State.STARTING, State.STOPPING
LIMITS = Limits(capacity=2, default_ttl_s=30)


def w(
    worker_id: str,
    model: str = "a",
    state: State = IDLE,
    last_used: float = 0,
    gpu_mb: float = 0,
    device: str | None = None,
) -> WorkerView:
    return WorkerView(worker_id, model, state, last_used, gpu_mb, device)


def test_reuses_the_most_recently_used_idle_worker_of_the_model() -> None:
    workers = [w("old", last_used=10), w("new", last_used=20), w("other", "b", last_used=30)]
    assert decide("a", workers, Limits(3, 30)) == Reuse("new")


def test_spawns_on_a_miss_with_room() -> None:
    assert decide("a", [w("x", "b", BUSY)], LIMITS) == Spawn()
    assert decide("a", [], LIMITS) == Spawn()


def test_full_pool_evicts_the_least_recently_used_idle_worker_of_another_model() -> None:
    workers = [w("b1", "b", last_used=50), w("c1", "c", last_used=10)]
    assert decide("a", workers, LIMITS) == Spawn(evict=("c1",))


def test_full_pool_of_busy_or_starting_workers_waits() -> None:
    assert isinstance(decide("a", [w("b1", "b", BUSY), w("c1", "c", STARTING)], LIMITS), Wait)
    assert isinstance(decide("a", [w("a1", "a", BUSY), w("a2", "a", BUSY)], LIMITS), Wait)


def test_stopping_workers_count_against_capacity() -> None:
    assert isinstance(decide("a", [w("b1", "b", BUSY), w("c1", "c", STOPPING)], LIMITS), Wait)


def test_busy_worker_of_own_model_is_never_reused() -> None:
    assert decide("a", [w("a1", "a", BUSY)], LIMITS) == Spawn()


def test_ttl_expires_idle_workers_with_per_model_override() -> None:
    limits = Limits(4, default_ttl_s=30, model_ttl_s={"fast": 5})
    workers = [w("a1", "a", last_used=100), w("f1", "fast", last_used=100), w("b1", "a", BUSY, last_used=0)]
    assert expired(workers, 106, limits) == ["f1"]
    assert expired(workers, 130, limits) == ["f1"]  # exactly the TTL is not past it
    assert expired(workers, 131, limits) == ["a1", "f1"]


def test_gpu_pressure_stops_idle_lru_first_until_below_low_watermark() -> None:
    gpu = [GpuReading("0", used_mb=9500, total_mb=10000)]
    workers = [
        w("recent", last_used=30, gpu_mb=1000, device="0"),
        w("oldest", last_used=10, gpu_mb=500, device="0"),
        w("middle", last_used=20, gpu_mb=1000, device="0"),
        w("busy", "b", BUSY, last_used=0, gpu_mb=3000, device="0"),
    ]
    # 9500 -> 9000 (oldest) -> 8000 (middle) = low watermark 0.8 reached; recent stays.
    assert under_pressure(workers, gpu, Limits(4, 30)) == ["oldest", "middle"]


def test_no_pressure_below_high_watermark_or_on_other_devices() -> None:
    assert under_pressure([w("a1", device="0")], [GpuReading("0", 8999, 10000)], Limits(4, 30)) == []
    assert under_pressure([w("a1", device="1")], [GpuReading("0", 9999, 10000)], Limits(4, 30)) == []


def test_model_estimate_must_fit_evicting_idle_workers_to_make_room() -> None:
    gpu = [GpuReading("0", used_mb=8000, total_mb=10000)]
    workers = [w("b1", "b", last_used=5, gpu_mb=2000, device="0"), w("c1", "c", BUSY, gpu_mb=5000, device="0")]
    # 8000 + 2000 > 9000: the idle b1 must go first.
    assert decide("a", workers, Limits(4, 30), gpu, {"a": 2000}) == Spawn("0", ("b1",))
    # Small enough to fit as is.
    assert decide("a", workers, Limits(4, 30), gpu, {"a": 900}) == Spawn("0")


def test_waits_when_only_busy_workers_hold_the_memory_and_rejects_what_never_fits() -> None:
    gpu = [GpuReading("0", used_mb=8000, total_mb=10000)]
    workers = [w("c1", "c", BUSY, gpu_mb=8000, device="0")]
    assert isinstance(decide("a", workers, Limits(4, 30), gpu, {"a": 2000}), Wait)
    assert isinstance(decide("a", workers, Limits(4, 30), gpu, {"a": 9500}), Reject)


def test_placement_prefers_the_gpu_with_most_headroom() -> None:
    gpus = [GpuReading("0", 6000, 10000), GpuReading("1", 2000, 10000)]
    assert decide("a", [], Limits(4, 30), gpus, {"a": 1000}) == Spawn("1")


def test_starting_workers_count_with_their_estimate() -> None:
    gpu = GpuReading("0", 1000, 10000)
    workers = [w("s1", "big", STARTING, device="0")]
    assert projected_used_mb(gpu, workers, {"big": 7000}) == 8000
    # 8000 projected + 2000 > 9000: the starting worker's memory is not free.
    assert isinstance(decide("a", workers, Limits(4, 30), [gpu], {"big": 7000, "a": 2000}), Wait)


def test_full_pool_eviction_credits_the_victims_memory() -> None:
    gpu = [GpuReading("0", 8500, 10000)]
    workers = [w("b1", "b", last_used=1, gpu_mb=4000, device="0"), w("c1", "c", BUSY, gpu_mb=4500, device="0")]
    assert decide("a", workers, LIMITS, gpu, {"a": 3000}) == Spawn("0", ("b1",))


# -- CPU fallback ---------------------------------------------------------------------------------


def test_a_fallback_model_that_does_not_fit_spawns_on_the_cpu_in_a_free_slot() -> None:
    gpu = [GpuReading("0", used_mb=8000, total_mb=10000)]
    workers = [w("c1", "c", BUSY, gpu_mb=8000, device="0")]
    limits = Limits(4, 30)
    assert decide("a", workers, limits, gpu, {"a": 2000}, cpu_fallback=True) == Spawn(cpu_fallback=True)
    # What could never fit on a GPU runs on the CPU instead of being rejected.
    assert decide("a", workers, limits, gpu, {"a": 9500}, cpu_fallback=True) == Spawn(cpu_fallback=True)
    # What fits (or fits by evicting idle workers) still goes on the GPU.
    assert decide("a", workers, limits, gpu, {"a": 900}, cpu_fallback=True) == Spawn("0")
    idle = [w("b1", "b", last_used=5, gpu_mb=2000, device="0"), w("c1", "c", BUSY, gpu_mb=6000, device="0")]
    assert decide("a", idle, limits, gpu, {"a": 2000}, cpu_fallback=True) == Spawn("0", ("b1",))


def test_a_fallback_takes_a_free_slot_or_an_idle_ones_never_a_busy_ones() -> None:
    gpu = [GpuReading("0", used_mb=9000, total_mb=10000)]
    busy = w("c1", "c", BUSY, gpu_mb=9000, device="0")
    idle = w("b1", "b", last_used=5)
    decision = decide("a", [busy, idle], LIMITS, gpu, {"a": 2000}, cpu_fallback=True)
    assert decision == Spawn(None, ("b1",), cpu_fallback=True)
    assert isinstance(decide("a", [busy, w("c2", "c", BUSY)], LIMITS, gpu, {"a": 9500}, cpu_fallback=True), Wait)
    own = w("a1", "a", STARTING, gpu_mb=2000, device="0")  # its own GPU worker is on the way: wait for it
    assert isinstance(decide("a", [own], LIMITS, gpu, {"a": 2000}, cpu_fallback=True), Wait)
    stem = w("s1", "(stem)", gpu_mb=500, device="0")
    decision = decide("a", [busy, stem], LIMITS, gpu, {"a": 2000, "(stem)": 500}, cpu_fallback=True)
    assert decision == Spawn(None, ("s1",), cpu_fallback=True)


def test_without_gpus_there_is_nothing_to_fall_back_from() -> None:
    assert decide("a", [], LIMITS, [], {"a": 99_999}, cpu_fallback=True) == Spawn()
    assert decide("a", [w("b1", "b", last_used=1), w("c1", "c", BUSY)], LIMITS, cpu_fallback=True) == Spawn(
        evict=("b1",)
    )


def test_an_idle_gpu_worker_is_reused_before_an_idle_cpu_fallback() -> None:
    gpu_worker = w("g1", last_used=10, device="0")
    cpu_worker = WorkerView("c1", "a", IDLE, last_used=20, cpu_fallback=True)
    assert decide("a", [cpu_worker, gpu_worker], Limits(3, 30)) == Reuse("g1")
    assert decide("a", [cpu_worker], Limits(3, 30)) == Reuse("c1")


@pytest.mark.parametrize(
    ("images", "max_batch", "up", "sizes"),
    [
        (10, 4, 0, [4, 3, 3]),  # at most the max, as even as can be
        (8, 16, 2, [4, 4]),  # two warm workers share a batch the max would give one
        (8, 16, 1, [8]),
        (8, 16, 0, [8]),  # nothing up: one call starts one worker
        (32, 16, 2, [16, 16]),
        (32, 16, 4, [8, 8, 8, 8]),
        (3, 16, 8, [1, 1, 1]),  # never more calls than images
        (5, 1, 2, [1, 1, 1, 1, 1]),  # a model without batching: one image a call
        (1, 16, 4, [1]),
    ],
)
def test_batch_calls(images: int, max_batch: int, up: int, sizes: list[int]) -> None:
    assert batch_calls(images, max_batch, up) == sizes


@pytest.mark.parametrize(("images", "max_batch"), [(0, 4), (4, 0)])
def test_batch_calls_refuses_nothing_to_carry(images: int, max_batch: int) -> None:
    with pytest.raises(ValueError):
        batch_calls(images, max_batch, 1)
