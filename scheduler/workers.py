"""A worker's life as a table, and the core's workers indexed by what it looks up.

One state enum and its allowed moves, in one place (as h11's ``_state.py`` and
OpenWhisk's ``ContainerProxy`` do): every change of a worker's state goes through
``Workers.move``, which refuses a move the table does not list. ``GONE`` is not a state a
worker is in but the move out of the table (its record is dropped).

    STARTING --ready--> IDLE --grant--> BUSY --released--> IDLE
        |                |  \\--adopt (a stem cell loads a model)--> STARTING
        |                |--reap, evict, trim, retire--> STOPPING --stopped--> GONE
        |                \\--evicted for a spawn (its slot passes at once)--> GONE
        |--failed start (the backend removed it)--> GONE
        \\--failed load, retired or shut down while starting--> STOPPING
    BUSY --failed, retired, shut down--> STOPPING

Two marks say how a worker's request will end, not what it is doing, and are set only
here: ``dead`` (the backend saw it exit while busy: its request fails) and ``retired``
(its bundle was replaced while it started or served: it stops once done).

``Workers`` is a mapping of worker id to record that also keeps, up to date on every
move, the workers of each (model, state), counts by state, and a heap of idle workers
in eviction order (stem cells first, then least recently used): so an event costs
O(log n) in the workers held, not a scan of them all.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

STEM = "(stem)"  # the model of a stem cell: a container with the runtime ready and no model


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"

    # Members are singletons compared by identity: hash them so too (Enum's own hash is
    # Python code, and the indexes hash a state on every lookup).
    __hash__ = object.__hash__


GONE = None  # the move out of the table: the worker's record is dropped

MOVES: Mapping[State | None, frozenset[State | None]] = {
    GONE: frozenset({State.STARTING}),  # a spawn
    State.STARTING: frozenset({State.IDLE, State.STOPPING, GONE}),
    State.IDLE: frozenset({State.BUSY, State.STARTING, State.STOPPING, GONE}),
    State.BUSY: frozenset({State.IDLE, State.STOPPING}),
    # A start that outlived a shutdown's stop is stopped again when it comes up.
    State.STOPPING: frozenset({State.STOPPING, GONE}),
}
"""Each state's allowed next states (GONE: dropped)."""

MARKS: Mapping[str, frozenset[State]] = {
    "dead": frozenset({State.BUSY}),
    "retired": frozenset({State.STARTING, State.BUSY}),
}
"""The states in which each mark may be set."""


def _name(state: State | None) -> str:
    return "gone" if state is None else state.value


class IllegalMove(RuntimeError):
    """A move the table does not list: a bug in the core, never the user's input."""


@dataclass(slots=True)
class Worker:
    id: str
    model: str
    state: State
    last_used: float
    started_at: float
    device: str | None = None
    gpu_mb: float = 0.0
    served: int = 0
    dead: str | None = None  # why, if it died while busy (a mark: ``Workers.mark``)
    reserved_for: int | None = None  # request id its start is for
    spawn_ms: float = 0.0
    spawn_breakdown: Mapping[str, float] = field(default_factory=dict)
    keep_s: float = 0.0  # how long it may stay idle, decided when it went idle
    adopted: bool = False  # a stem cell that loads or serves a model
    cpu_fallback: bool = False  # a CPU worker started because no GPU had room (holds no GPU memory)
    retired: bool = False  # a mark: its bundle was replaced while it ran; stopped once its request is done

    @property
    def stem(self) -> bool:
        return self.model == STEM


class Workers(Mapping[str, Worker]):
    """The core's workers by id, indexed (module doc). Read it as a mapping; change it
    only with ``add``, ``move`` and ``mark``."""

    def __init__(self) -> None:
        self._by_id: dict[str, Worker] = {}
        self._of: dict[tuple[str, State], dict[str, Worker]] = {}  # (model, state) -> workers, in order of arrival
        self._in: dict[State, dict[str, Worker]] = {state: {} for state in State}
        self._lru: list[tuple[bool, float, str]] = []  # idle: (not a stem cell, idle since, id), lazily pruned

    # -- the mapping -----------------------------------------------------------------

    def __getitem__(self, worker_id: str) -> Worker:
        return self._by_id[worker_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # -- changes ---------------------------------------------------------------------

    def add(self, worker: Worker) -> None:
        """A new worker (a spawn): it starts in STARTING."""
        if worker.id in self._by_id:
            raise IllegalMove(f"worker {worker.id} is already in the table")
        self._check(worker, GONE, worker.state)
        self._by_id[worker.id] = worker
        self._enter(worker)

    def move(self, worker: Worker, to: State | None, at: float | None = None) -> None:
        """Move ``worker`` to ``to`` (GONE drops it); ``at``: it was last used then
        (a move to IDLE starts its idle time)."""
        self._check(worker, worker.state, to)
        self._leave(worker)
        if to is GONE:
            del self._by_id[worker.id]
            return
        worker.state = to
        if at is not None:
            worker.last_used = at
        self._enter(worker)

    def rename(self, worker: Worker, model: str) -> None:
        """A stem cell takes a model (it is moved to STARTING by the caller next)."""
        self._leave(worker)
        worker.model = model
        self._enter(worker)

    def mark(self, worker: Worker, mark: str, value: str | bool) -> None:
        """Set ``dead`` (the reason) or ``retired`` where ``MARKS`` allows it."""
        if worker.state not in MARKS[mark]:
            raise IllegalMove(f"worker {worker.id} cannot be marked {mark} while {worker.state.value}")
        setattr(worker, mark, value)

    # -- lookups ---------------------------------------------------------------------

    def of(self, model: str, state: State) -> Iterator[Worker]:
        """``model``'s workers in ``state``, in the order they entered it."""
        return iter(list(self._of.get((model, state), {}).values()))

    def has(self, model: str, state: State) -> bool:
        return (model, state) in self._of  # a group is dropped once empty

    def first(self, model: str, state: State, unreserved: bool = False) -> Worker | None:
        """``model``'s first worker in ``state`` (with ``unreserved``: the first no
        request's start is for), without copying the group."""
        for worker in self._of.get((model, state), {}).values():
            if not unreserved or worker.reserved_for is None:
                return worker
        return None

    def counting(self, *states: State) -> int:
        return sum(len(self._in[s]) for s in states)

    def live_of(self, model: str) -> bool:
        """Whether ``model`` has a worker that is not stopping."""
        return any(self.has(model, s) for s in (State.STARTING, State.IDLE, State.BUSY))

    def in_state(self, state: State) -> Iterator[Worker]:
        return iter(list(self._in[state].values()))

    def oldest_idle(self, skip: frozenset[str] = frozenset()) -> Worker | None:
        """The idle worker to evict first (stem cells first, then least recently used;
        none in ``skip``), in O(log n) amortised."""
        lru = self._lru
        while lru and not self._current(lru[0]):
            heapq.heappop(lru)
        if not lru:
            return None
        if lru[0][2] not in skip:
            return self._by_id[lru[0][2]]
        return next(iter(self.idle_lru(skip)), None)

    def idle_lru(self, skip: frozenset[str] = frozenset()) -> list[Worker]:
        """Every idle worker not in ``skip``, in eviction order (O(k log k) in the idle)."""
        idle = (w for w in self.in_state(State.IDLE) if w.id not in skip)
        return sorted(idle, key=lambda w: (not w.stem, w.last_used, w.id))

    # -- the indexes -----------------------------------------------------------------

    def _check(self, worker: Worker, source: State | None, to: State | None) -> None:
        if to not in MOVES[source]:
            raise IllegalMove(f"worker {worker.id} ({worker.model}) cannot go from {_name(source)} to {_name(to)}")

    def _enter(self, worker: Worker) -> None:
        self._of.setdefault((worker.model, worker.state), {})[worker.id] = worker
        self._in[worker.state][worker.id] = worker
        if worker.state is State.IDLE:
            lru = self._lru
            heapq.heappush(lru, (not worker.stem, worker.last_used, worker.id))
            if len(lru) > 2 * len(self._in[State.IDLE]) + 64:  # mostly stale: rebuild (amortised O(1))
                self._lru = [entry for entry in lru if self._current(entry)]
                heapq.heapify(self._lru)

    def _leave(self, worker: Worker) -> None:
        key = (worker.model, worker.state)
        group = self._of[key]
        del group[worker.id]
        if not group:
            del self._of[key]
        del self._in[worker.state][worker.id]

    def _current(self, entry: tuple[bool, float, str]) -> bool:
        worker = self._by_id.get(entry[2])
        return (
            worker is not None
            and worker.state is State.IDLE
            and worker.last_used == entry[1]
            and worker.stem is not entry[0]
        )

    def hiding(self, kept: frozenset[str]) -> Workers | Hiding:
        """The workers as a request sees them while ``kept`` (idle workers held for a
        batch that may still grow) are spoken for: those look busy."""
        return self if not kept else Hiding(self, kept)


class Hiding:
    """``Workers`` with some idle workers looking busy (``Workers.hiding``)."""

    def __init__(self, workers: Workers, kept: frozenset[str]) -> None:
        self.workers, self.kept = workers, kept

    def __len__(self) -> int:
        return len(self.workers)

    def of(self, model: str, state: State) -> Iterator[Worker]:
        if state is State.IDLE:
            return (w for w in self.workers.of(model, state) if w.id not in self.kept)
        if state is State.BUSY:
            held = [w for w in self.workers.of(model, State.IDLE) if w.id in self.kept]
            return iter([*self.workers.of(model, state), *held])
        return self.workers.of(model, state)

    def in_state(self, state: State) -> Iterator[Worker]:
        if state is State.IDLE:
            return (w for w in self.workers.in_state(state) if w.id not in self.kept)
        if state is State.BUSY:
            return iter([*self.workers.in_state(state), *(self.workers[k] for k in self.kept)])
        return self.workers.in_state(state)

    def oldest_idle(self) -> Worker | None:
        return self.workers.oldest_idle(self.kept)

    def idle_lru(self) -> list[Worker]:
        return self.workers.idle_lru(self.kept)
