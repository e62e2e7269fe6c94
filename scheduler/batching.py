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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .events import BATCH, INTERACTIVE


@dataclass(eq=False)
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


def in_order(queue: Sequence[Request]) -> list[Request]:
    """The queue as it is served: interactive requests first, FIFO within each priority."""
    if all(r.priority == INTERACTIVE for r in queue):
        return list(queue)
    return [r for r in queue if r.priority == INTERACTIVE] + [r for r in queue if r.priority != INTERACTIVE]


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
