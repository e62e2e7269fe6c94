"""What happens to the pool (events, into the core) and what the pool must do about it
(commands, out of it): closed unions, so every consumer handles every kind
(``assert_never`` under mypy strict) and nothing is dispatched by name.

Every event carries ``now``, the time it happened; nothing in the core reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .coreconfig import CoreConfig
from .errors import WanwuError
from .policy import GpuReading

INTERACTIVE, BATCH = "interactive", "batch"
PRIORITIES = (INTERACTIVE, BATCH)

# -- events --------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrive:
    """A request for ``model`` (``size`` images, one worker call) that must be served
    or failed by ``deadline``."""

    request_id: int
    model: str
    now: float
    deadline: float
    size: int = 1
    priority: str = INTERACTIVE
    tries: int | None = None  # how many workers may try it (None: the config's ``attempts``)


@dataclass(frozen=True)
class Expire:
    """A waiting request's deadline passed. ``attempt``: the try it was the deadline of
    (a request the core sent round again has a new one: the old deadline is stale)."""

    request_id: int
    now: float
    attempt: int = 1


@dataclass(frozen=True)
class Ready:
    """A worker started (or a stem cell loaded its model) and answered its health check."""

    worker_id: str
    now: float
    spawn_ms: float
    breakdown: Mapping[str, float] | None = None
    gpu_mb: float | None = None


@dataclass(frozen=True)
class StartFailed:
    worker_id: str
    now: float
    error: WanwuError


@dataclass(frozen=True)
class Released:
    """A worker call finished. ``ok=False``: the worker failed it (``reason`` crashed or
    timeout, ``error`` what the requests on it get if they are not tried again)."""

    worker_id: str
    now: float
    ok: bool = True
    reason: str = "crashed"
    error: WanwuError | None = None


@dataclass(frozen=True)
class Died:
    """The backend saw a worker exit (crash, OOM kill, removal from outside)."""

    worker_id: str
    now: float
    reason: str


@dataclass(frozen=True)
class Stopped:
    """A worker's container is gone: its slot is free."""

    worker_id: str
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed (keep-alive ends, pre-warms, held batches), with fresh GPU readings
    when ``readings`` is not None."""

    now: float
    readings: list[GpuReading] | None = None


@dataclass(frozen=True)
class Configure:
    """Settings changed (``config``); ``digests``: the bundles as the catalog now has
    them (model -> digest), given when the models directory changed: a model whose
    digest changed or that is gone has its workers retired."""

    config: CoreConfig
    now: float
    digests: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Retire:
    """``model``'s bundle was replaced or removed."""

    model: str
    now: float


@dataclass(frozen=True)
class Reconcile:
    """What the backend lists after it lost contact with its engine: worker id ->
    whether it runs."""

    listed: Mapping[str, bool]
    now: float


@dataclass(frozen=True)
class Close:
    """Shutting down: refuse new requests."""

    now: float


@dataclass(frozen=True)
class StopAll:
    """The end of a shutdown: stop every worker."""

    now: float


Event = (
    Arrive
    | Expire
    | Ready
    | StartFailed
    | Released
    | Died
    | Stopped
    | Tick
    | Configure
    | Retire
    | Reconcile
    | Close
    | StopAll
)

# -- commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class SpawnWorker:
    """Start a worker of ``model`` (a stem cell when it is STEM), after stopping ``evict``."""

    worker_id: str
    model: str
    device: str | None = None
    evict: tuple[str, ...] = ()
    request_id: int | None = None  # the request it is started for; None: a pre-warm or a stem cell
    cpu_fallback: bool = False  # on the CPU (``device`` None) because no GPU has room for the model


@dataclass(frozen=True)
class LoadWorker:
    """Turn the stem cell ``worker_id`` into a worker of ``model``, then report ``Ready``
    (or ``StartFailed``: the stem cell is then stopped)."""

    worker_id: str
    model: str
    request_id: int | None = None


@dataclass(frozen=True)
class StopWorker:
    worker_id: str
    model: str
    reason: str
    idle_s: float | None = None  # how long it had been idle, for TTL and pressure reaps


@dataclass(frozen=True)
class RemoveStray:
    """Remove a container of this pool that the core does not track (a removal that
    failed while the engine was down left it)."""

    worker_id: str


@dataclass(frozen=True)
class Grant:
    request_id: int
    worker_id: str
    model: str
    cold_start: bool
    queue_ms: float
    spawn_ms: float
    spawn_breakdown: Mapping[str, float]
    start: str = "warm"  # how its worker started: warm (reused), container, or stem (a stem cell loaded it)
    batch: tuple[int, ...] = ()  # the requests sharing this worker call, in order; (): this one alone
    cpu_fallback: bool = False  # its worker runs on the CPU because no GPU had room for the model
    attempt: int = 1  # 2: the request's first worker failed it and this is its second try


@dataclass(frozen=True)
class Retry:
    """The worker serving ``request_id`` failed it: it waits again, for another worker,
    until ``deadline`` (its ``attempt``-th try)."""

    request_id: int
    attempt: int
    deadline: float
    error: WanwuError


@dataclass(frozen=True)
class Fail:
    request_id: int
    error: WanwuError


Command = SpawnWorker | LoadWorker | StopWorker | RemoveStray | Grant | Retry | Fail
