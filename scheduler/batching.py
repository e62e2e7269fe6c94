"""Who shares a worker call, and when batch work may take a slot: pure functions of the
wait queue (``scheduler.rules`` applies them).

Waiters are served interactive first, then batch, FIFO within each. For a model with
batching, a free worker gets the waiting requests of one priority together, up to
``max_batch_size`` images, once the batch is full or its oldest member has waited
``max_wait`` (it only waits while another worker of the model is serving: a lone request
on a quiet pool goes at once). Batch work never takes the last free slot (an empty slot
or an idle worker) while an interactive request waits or, on a pool of two or more,
while interactive requests arrived within ``interactive_reserve_s``: so an interactive
request waits at most for one batch's inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .events import BATCH, INTERACTIVE


@dataclass(eq=False, slots=True)
class Request:
    id: int
    model: str
    deadline: float
    enqueued: float
    spawning: str | None = None  # the worker started for it, if any
    size: int = 1  # images it carries
    priority: str = INTERACTIVE
    done: bool = False  # granted or failed (a dispatch walk may still hold it)
    attempt: int = 1  # its try: 2 once a worker failed it and it waits for another
    wait_s: float = 0.0  # how long it may wait for a worker, each try
    tries: int = 2  # how many workers may try it
    seq: int = 0  # its place in the queue (set when queued)


class WaitQueue:
    """The requests waiting, indexed so that serving them costs what can be served, not
    how many wait: by priority in queue order, by (model, priority), and apart, per
    model, those whose start is under way ("parked": only a free worker of their model
    or a failed start changes anything for them). Iterating gives queue order."""

    def __init__(self) -> None:
        self._all: dict[int, Request] = {}  # id -> request, in queue order
        self._in: dict[str, dict[int, Request]] = {INTERACTIVE: {}, BATCH: {}}  # by priority, in queue order
        self._open: dict[str, dict[int, Request]] = {INTERACTIVE: {}, BATCH: {}}  # no start under way
        self._parked: dict[str, dict[int, Request]] = {}  # model -> requests whose start is under way
        self._of: dict[tuple[str, str], dict[int, Request]] = {}  # (model, priority) -> requests
        self._seq = 0

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._all.values()))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Iterable) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def add(self, request: Request) -> None:
        self._seq += 1
        request.seq = self._seq
        self._all[request.id] = request
        self._of.setdefault((request.model, request.priority), {})[request.id] = request
        self._in[request.priority][request.id] = request
        self._place(request)

    def remove(self, request: Request) -> None:
        del self._all[request.id]
        group = self._of[(request.model, request.priority)]
        del group[request.id]
        if not group:
            del self._of[(request.model, request.priority)]
        del self._in[request.priority][request.id]
        self._displace(request)

    def park(self, request: Request, worker_id: str | None) -> None:
        """``request`` waits for the start of ``worker_id`` (None: for none)."""
        queued = request.id in self._all
        if queued:
            self._displace(request)
        request.spawning = worker_id
        if queued:
            self._place(request)

    def count(self, priority: str) -> int:
        return len(self._in[priority])

    def opened(self) -> bool:
        """Whether a request waits with no start under way for it."""
        return bool(self._open[INTERACTIVE] or self._open[BATCH])

    def of(self, model: str, priority: str) -> Iterator[Request]:
        """The requests for ``model`` at ``priority``, in queue order."""
        return iter(list(self._of.get((model, priority), {}).values()))

    def waits(self, model: str, priority: str) -> bool:
        return bool(self._of.get((model, priority)))

    def first(self, priority: str) -> Request | None:
        return next(iter(self._in[priority].values()), None)

    def parked(self, model: str) -> bool:
        return bool(self._parked.get(model))

    def parked_models(self) -> list[str]:
        return list(self._parked)

    def candidates(self, models: Iterable[str]) -> list[Request]:
        """In the order they are served (interactive first, FIFO within a priority):
        every request with no start under way, and the parked ones of ``models``."""
        chosen = [*self._open[INTERACTIVE].values(), *self._open[BATCH].values()]
        chosen += [r for model in models for r in self._parked.get(model, {}).values()]
        if len(chosen) < 2:
            return chosen
        return sorted(chosen, key=_served_first)

    def _place(self, request: Request) -> None:
        if request.spawning is None:
            self._open[request.priority][request.id] = request
        else:
            self._parked.setdefault(request.model, {})[request.id] = request

    def _displace(self, request: Request) -> None:
        if request.spawning is None:
            del self._open[request.priority][request.id]
        else:
            group = self._parked[request.model]
            del group[request.id]
            if not group:
                del self._parked[request.model]


def _served_first(request: Request) -> tuple[bool, int]:
    return request.priority != INTERACTIVE, request.seq


def members(
    queue: Iterable[Request], head: Request, spec: tuple[int, float], now: float, hold: bool, busy: bool
) -> tuple[list[Request], float | None]:
    """The requests one worker call serves with ``head`` (a model with batching, whose
    ``spec`` is max images and max wait): waiters of the same model and priority in FIFO
    order up to the max. With ``hold``, while the batch may still grow (not full, a
    worker of the model is ``busy``, so traffic is not a lone request, and its oldest
    member has waited less than the max), no members but when the batch is due."""
    max_size, max_wait = spec
    chosen, total, left_out = [head], head.size, False
    for request in queue:
        if total >= max_size:
            break
        if request is head or request.done or request.model != head.model or request.priority != head.priority:
            continue
        if request.deadline <= now:
            continue  # its expiry is on its way
        if total + request.size > max_size:
            left_out = True  # it goes in the next batch: waiting would not fill this one
            continue
        chosen.append(request)
        total += request.size
    due = min(r.enqueued for r in chosen) + max_wait
    if not hold or total >= max_size or left_out or now >= due or not busy:
        return chosen, None
    return [], due


def batch_may_take(
    capacity: int, taken: int, interactive_waits: bool, last_interactive: float, reserve_s: float, now: float
) -> tuple[bool, float | None]:
    """Whether batch work may take a slot (an empty one or an idle worker not kept for a
    held batch) with ``taken`` of ``capacity`` slots serving or starting: always while
    two are free; the last one only if no interactive request waits and, on a pool of
    two or more, none arrived within ``reserve_s``. Second: when it may, if it is only
    the reserve that holds it back."""
    if capacity - taken >= 2:
        return True, None
    if interactive_waits:
        return False, None
    until = last_interactive + reserve_s
    if capacity < 2 or now >= until:
        return True, None
    return False, until


def is_batch(request: Request) -> bool:
    return request.priority == BATCH
