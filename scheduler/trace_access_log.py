"""Reading the gateway's JSON-lines access log as a :class:`Trace`.

Each POST naming a model that reached the pool (not answered from the result cache, not
refused at the edge) is one arrival at its exact time; a model's durations are the
percentiles of the worker times of its fresh answers.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeGuard

from .trace_types import _EXPECTED, _PERCENTILES, ModelProfile, Trace, TraceError, _minute_range, _running_max

_SECONDS_PER_DAY = 86400.0


def _is_number(value: Any) -> TypeGuard[float]:
    # JSON true/false decode to bool, which is an int to Python: not a time.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _worker_ms(entry: Mapping[str, Any]) -> float | None:
    """The worker time of a fresh (status 200, not cached) answer, else None."""
    if entry.get("status") != 200 or entry.get("cached") is True:
        return None
    timing = entry.get("timing_ms")
    worker = timing.get("worker") if isinstance(timing, dict) else None
    return float(worker) if _is_number(worker) and worker >= 0 else None


def _percentile_points(samples: Sequence[float]) -> tuple[tuple[float, float], ...]:
    """The _PERCENTILES of ``samples``, linear between order statistics (numpy's default)."""
    xs = sorted(samples)
    last = len(xs) - 1
    values = []
    for p in _PERCENTILES:
        position = p / 100.0 * last
        low = math.floor(position)
        high = min(low + 1, last)
        values.append(xs[low] + (xs[high] - xs[low]) * (position - low))
    return tuple(zip(_PERCENTILES, _running_max(values), strict=True))


def _reached_pool(entry: Mapping[str, Any]) -> bool:
    """Whether a request asked the pool for a worker: not answered from the result cache,
    not refused at the edge (4xx: bad upload, unknown model); 2xx and 5xx did."""
    status = entry.get("status")
    if entry.get("cached") is True or not isinstance(status, int):
        return False
    return not 400 <= status < 500


def _read_access_log(path: Path) -> tuple[list[float], list[str], dict[str, list[float]]]:
    """Times and models of the POSTs that reached the pool, and worker times by model."""
    times: list[float] = []
    models: list[str] = []
    worker: dict[str, list[float]] = {}
    seen_object = False
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary files
                hint = "" if seen_object else f"; {_EXPECTED}"
                raise TraceError(f"{path}, line {line_no}: not JSON ({e}){hint}") from e
            if not isinstance(entry, dict):
                raise TraceError(f"{path}, line {line_no}: expected a JSON object, got {type(entry).__name__}")
            seen_object = True
            model = entry.get("model")
            if not isinstance(model, str) or not model or entry.get("method") != "POST" or not _reached_pool(entry):
                continue
            ts = entry.get("ts")
            if not _is_number(ts):
                raise TraceError(f'{path}, line {line_no}: "ts" must be a number of seconds, got {ts!r}')
            times.append(float(ts))
            models.append(model)
            ms = _worker_ms(entry)
            if ms is not None:
                worker.setdefault(model, []).append(ms)
    return times, models, worker


def load_access_log(path: Path, max_per_day: float | None, minutes: tuple[int, int] | None) -> Trace:
    """The trace in the access log at ``path``; the arguments are load_trace's."""
    times, models, worker = _read_access_log(path)
    if not times:
        raise TraceError(f'{path}: no usable line (a POST naming a "model"); {_EXPECTED}')
    start = min(times)
    span = max(max(times) - start, 1.0)
    if max_per_day is not None:
        days = max(span / _SECONDS_PER_DAY, 1.0)
        counts = Counter(models)
        kept = {m for m, n in counts.items() if n / days <= max_per_day}
        pairs = [(t, m) for t, m in zip(times, models, strict=True) if m in kept]
        times, models = [t for t, _ in pairs], [m for _, m in pairs]
    first, stop = _minute_range(path, minutes, int(span // 60.0) + 1)
    arrivals = sorted(zip([t - start for t in times], models, strict=True), key=itemgetter(0))
    every = [ms for samples in worker.values() for ms in samples]
    fallback = ((50.0, statistics.median(every)),) if every else ((50.0, 0.0),)
    profiles = {
        m: ModelProfile(m, 0.0, _percentile_points(worker[m]) if m in worker else fallback)
        for m in dict.fromkeys(name for _, name in arrivals)
    }
    trace = Trace(tuple(arrivals), profiles, span, str(path))
    return trace if minutes is None else trace.window(60.0 * first, 60.0 * stop)
