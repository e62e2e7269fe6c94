"""The pool's decisions, as pure functions.

No docker, no threads, no clock: workers, the time and GPU readings are arguments, so
the live pool and the trace simulator take the same decisions, and tests state rules
with symbols and fixed timestamps.

Rules (DESIGN.md, "The pool"):

- Capacity N counts every live container: starting, idle, busy, and stopping (a stopping
  container still exists until its removal completes).
- A request for model M reuses M's most recently used idle worker.
- Otherwise, with room (fewer than N live) and the model's GPU estimate fitting: spawn.
- Without room: stop the least recently used idle worker of another model and spawn in
  its place. If the estimate does not fit, idle workers are evicted (least recently used
  first) until it does.
- No idle worker to take: wait. A model that could never fit is rejected.
- A model with CPU fallback that does not fit on any GPU (now or ever) starts a CPU
  worker in a free slot (or an idle stem cell's) instead of waiting or being rejected;
  without a slot it waits. Idle GPU workers of the model are reused before idle CPU ones.
- Idle longer than the model's TTL (or the default): stop.
- GPU memory used above the high watermark: stop idle workers, least recently used
  first, until the projection is below the low watermark.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .workers import STEM, State

__all__ = ["STEM", "State"]  # re-exported: what the policy reads of a worker's life is defined there


class Worker(Protocol):
    """What the policy reads of a worker (``WorkerView``, or the core's own records,
    which it reads in place: no copies on the hot path)."""

    @property
    def id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def last_used(self) -> float: ...
    @property
    def gpu_mb(self) -> float: ...
    @property
    def device(self) -> str | None: ...
    @property
    def cpu_fallback(self) -> bool: ...


@dataclass(frozen=True)
class WorkerView:
    """What the policy knows of one worker, as a value (tests build these)."""

    id: str
    model: str
    state: State
    last_used: float
    gpu_mb: float = 0.0
    device: str | None = None
    cpu_fallback: bool = False  # a CPU worker of a model that did not fit on a GPU


@dataclass(frozen=True)
class GpuReading:
    """Memory of one GPU, in MB."""

    device: str
    used_mb: float
    total_mb: float

    @property
    def fraction(self) -> float:
        return self.used_mb / self.total_mb if self.total_mb else 0.0


@dataclass(frozen=True)
class Limits:
    capacity: int
    default_ttl_s: float
    model_ttl_s: Mapping[str, float] = field(default_factory=dict)
    high_watermark: float = 0.90
    low_watermark: float = 0.80

    def ttl(self, model: str) -> float:
        return self.model_ttl_s.get(model, self.default_ttl_s)


@dataclass(frozen=True)
class Reuse:
    worker_id: str


@dataclass(frozen=True)
class Adopt:
    """Load the model into this idle stem cell."""

    worker_id: str


@dataclass(frozen=True)
class Spawn:
    """Start a worker, after stopping ``evict`` (whose slots and memory it takes);
    ``cpu_fallback``: on the CPU (no device) because no GPU has room for the model."""

    device: str | None = None
    evict: tuple[str, ...] = ()
    cpu_fallback: bool = False


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Reject:
    reason: str


Decision = Reuse | Adopt | Spawn | Wait | Reject
W = TypeVar("W", bound=Worker)


class Indexed(Protocol[W]):
    """The workers as the policy looks them up (the core's ``Workers`` index, or
    ``Listed`` over a plain sequence): by model and state, by state, and idle ones in
    eviction order, so a decision costs O(log n) in the workers held, not a scan."""

    def __len__(self) -> int: ...
    def of(self, model: str, state: State) -> Iterator[W]: ...
    def in_state(self, state: State) -> Iterator[W]: ...
    def oldest_idle(self) -> W | None: ...
    def idle_lru(self) -> list[W]: ...


class Listed(Generic[W]):
    """``Indexed`` over a sequence of workers, by scanning it (tests, small pools)."""

    def __init__(self, workers: Sequence[W]) -> None:
        self.workers = workers

    def __len__(self) -> int:
        return len(self.workers)

    def of(self, model: str, state: State) -> Iterator[W]:
        return (w for w in self.workers if w.model == model and w.state is state)

    def in_state(self, state: State) -> Iterator[W]:
        return (w for w in self.workers if w.state is state)

    def oldest_idle(self) -> W | None:
        return next(iter(self.idle_lru()), None)

    def idle_lru(self) -> list[W]:
        return _lru(self.in_state(State.IDLE))


def indexed(workers: Sequence[W] | Indexed[W]) -> Indexed[W]:
    if isinstance(workers, list | tuple):  # the common case first: an ABC check costs more than a decision
        return Listed(workers)
    return Listed(workers) if isinstance(workers, Sequence) else workers


def _lru(workers: Iterable[W]) -> list[W]:
    """Least recently used first, stem cells before all (they go first when a slot is needed)."""
    return sorted(workers, key=lambda w: (w.model != STEM, w.last_used, w.id))


def _idle(workers: Iterable[W]) -> list[W]:
    return [w for w in workers if w.state is State.IDLE]


def projected_used_mb(reading: GpuReading, workers: Iterable[W], estimates: Mapping[str, float]) -> float:
    """GPU memory in use once every starting worker on the device has loaded: a reading
    does not yet show what a starting worker is about to allocate."""
    starting = sum(
        estimates.get(w.model, 0.0) for w in workers if w.state is State.STARTING and w.device == reading.device
    )
    return reading.used_mb + starting


def _place(
    starting: Sequence[W],
    estimate_mb: float,
    gpus: Sequence[GpuReading],
    estimates: Mapping[str, float],
    limits: Limits,
    evictable: list[W],
) -> tuple[str | None, tuple[str, ...]] | None:
    """Pick a GPU for a new worker and the idle workers to evict so its estimate fits
    under the high watermark: the device needing the fewest evictions, then the one with
    the most headroom. None if no device can make room."""
    if not gpus:
        return (None, ())
    best: tuple[int, float, str, tuple[str, ...]] | None = None
    for gpu in gpus:
        ceiling = limits.high_watermark * gpu.total_mb
        used = projected_used_mb(gpu, starting, estimates)
        victims: list[str] = []
        for victim in evictable:
            if used + estimate_mb <= ceiling:
                break
            if victim.device == gpu.device:
                used -= victim.gpu_mb
                victims.append(victim.id)
        if used + estimate_mb <= ceiling:
            key = (len(victims), -(ceiling - used), gpu.device, tuple(victims))
            if best is None or key < best:
                best = key
    return None if best is None else (best[2], best[3])


def decide(
    model: str,
    workers: Sequence[W] | Indexed[W],
    limits: Limits,
    gpus: Sequence[GpuReading] = (),
    estimates: Mapping[str, float] | None = None,
    stem_ok: bool = False,
    cpu_fallback: bool = False,
) -> Decision:
    """What to do for one request for ``model`` given the pool as it is now;
    ``stem_ok``: an idle stem cell may load it; ``cpu_fallback``: a CPU worker may
    serve it when no GPU has room (only with GPUs: without, every worker is a CPU one)."""
    pool = indexed(workers)
    estimates = estimates or {}
    own_idle = list(pool.of(model, State.IDLE))
    if own_idle:  # a GPU worker before a CPU fallback, then the most recently used
        return Reuse(max(own_idle, key=lambda w: (not w.cpu_fallback, w.last_used, w.id)).id)
    if stem_ok:
        stem = _stem_for(model, pool, limits, gpus, estimates)
        if stem is not None:
            return Adopt(stem.id)
    room = limits.capacity - len(pool)
    if room > 0 and not gpus:
        return Spawn()  # the common case on CPU: nothing to place, nobody to evict

    estimate = estimates.get(model, 0.0)
    never_fits = bool(gpus) and all(estimate > limits.high_watermark * g.total_mb for g in gpus)
    # A GPU worker of the model that is starting or busy serves the next request sooner
    # than a CPU worker started for it, and would lose its traffic to the CPU one after.
    if cpu_fallback and any(
        not w.cpu_fallback for state in (State.STARTING, State.BUSY) for w in pool.of(model, state)
    ):
        cpu_fallback = False
    if never_fits and not cpu_fallback:
        return Reject(
            f"model {model} needs {estimate:g} MB of GPU memory; no GPU has that much under the high watermark"
        )

    # Own idle workers there are none (they would have been reused): every idle one is another model's.
    if room <= 0:
        return _in_a_slot_freed(model, pool, limits, gpus, estimates, cpu_fallback, never_fits)
    starting = list(pool.in_state(State.STARTING)) if gpus else []
    others_idle = pool.idle_lru() if gpus else []
    placed = None if never_fits else _place(starting, estimate, gpus, estimates, limits, others_idle)
    if placed is None:
        if cpu_fallback:
            return Spawn(cpu_fallback=True)
        return Wait(f"model {model} does not fit in GPU memory until busy workers finish")
    device, evict = placed
    return Spawn(device, evict)


def _in_a_slot_freed(
    model: str,
    pool: Indexed[W],
    limits: Limits,
    gpus: Sequence[GpuReading],
    estimates: Mapping[str, float],
    cpu_fallback: bool,
    never_fits: bool,
) -> Spawn | Wait:
    """A full pool: a start in the slot (and the memory) of the least recently used idle
    worker, and more idle workers of its GPU if the model needs their memory too."""
    first = pool.oldest_idle()
    if first is None:
        return Wait("every worker is busy or starting")
    # The evicted worker's memory is free for the new one.
    starting = list(pool.in_state(State.STARTING)) if gpus else []
    rest = pool.idle_lru()[1:] if gpus else []
    estimate = estimates.get(model, 0.0)
    placed = None if never_fits else _place(starting, estimate, _credit(gpus, first), estimates, limits, rest)
    if placed is None:
        if not cpu_fallback:
            return Wait(f"model {model} does not fit in GPU memory yet")
        # The least recently used idle worker gives its slot, as for a GPU start.
        return Spawn(None, (first.id,), cpu_fallback=True)
    device, more = placed
    return Spawn(device, (first.id, *more))


def _stem_for(
    model: str, pool: Indexed[W], limits: Limits, gpus: Sequence[GpuReading], estimates: Mapping[str, float]
) -> W | None:
    """An idle stem cell the model fits on (its GPU keeps the stem's context and gains
    the model's estimate), most recently started first."""
    stems = list(pool.of(STEM, State.IDLE))
    if not stems:
        return None
    estimate = estimates.get(model, 0.0)
    starting = list(pool.in_state(State.STARTING)) if gpus else []
    for stem in sorted(stems, key=lambda w: (w.last_used, w.id), reverse=True):
        reading = next((g for g in gpus if g.device == stem.device), None)
        if reading is None or projected_used_mb(reading, starting, estimates) + estimate <= (
            limits.high_watermark * reading.total_mb
        ):
            return stem
    return None


def room_for(
    model: str,
    workers: Sequence[W] | Indexed[W],
    limits: Limits,
    gpus: Sequence[GpuReading],
    estimates: Mapping[str, float],
) -> Spawn | None:
    """A spawn for ``model`` that needs no eviction (room and GPU memory to spare), or None."""
    pool = indexed(workers)
    if len(pool) >= limits.capacity:
        return None
    starting = list(pool.in_state(State.STARTING)) if gpus else []
    placed = _place(starting, estimates.get(model, 0.0), gpus, estimates, limits, [])
    return None if placed is None else Spawn(placed[0])


def _credit(gpus: Sequence[GpuReading], leaving: W) -> list[GpuReading]:
    """Readings as they will be once ``leaving`` has stopped."""
    return [
        GpuReading(g.device, max(0.0, g.used_mb - leaving.gpu_mb), g.total_mb) if g.device == leaving.device else g
        for g in gpus
    ]


def batch_calls(images: int, max_batch: int, up: int) -> list[int]:
    """The sizes, in order, of the worker calls that carry a batch of ``images``: at
    most ``max_batch`` each, as even as they can be, and at least as many as ``up``, the
    workers of the model that are up (idle or serving), where there are enough images.
    On the CPU a batched pass costs each image about what it costs alone, so 8 images as
    one call kept one of two warm workers busy while the other waited. Spreading goes
    no further than the workers already up: empty slots would mean starting workers
    (or evicting others) that a warm worker would have served sooner."""
    if images < 1 or max_batch < 1:
        raise ValueError(f"a batch of {images} images in calls of at most {max_batch}")
    count = max(-(-images // max_batch), min(up, images))
    base, extra = divmod(images, count)
    return [base + (index < extra) for index in range(count)]


def expired(workers: Sequence[W], now: float, limits: Limits, keep_s: Mapping[str, float] | None = None) -> list[str]:
    """Idle workers whose idle time exceeds their keep-alive (``keep_s`` by worker id,
    else their model's TTL), oldest first."""
    keep = keep_s or {}
    return [w.id for w in _lru(w for w in _idle(workers) if now - w.last_used > keep.get(w.id, limits.ttl(w.model)))]


def under_pressure(workers: Sequence[W], gpus: Sequence[GpuReading], limits: Limits) -> list[str]:
    """Idle workers to stop because their GPU is above the high watermark: least
    recently used first, until the device is projected below the low watermark."""
    victims: list[str] = []
    for gpu in gpus:
        if gpu.fraction <= limits.high_watermark:
            continue
        used = gpu.used_mb
        target = limits.low_watermark * gpu.total_mb
        for worker in _lru(w for w in _idle(workers) if w.device == gpu.device):
            if used <= target:
                break
            victims.append(worker.id)
            used -= worker.gpu_mb
    return victims
