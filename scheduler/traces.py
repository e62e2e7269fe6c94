"""Invocation traces for the pool simulator: when each model is asked for, and how long
one request of it runs.

Two sources, chosen by what the path is:

- a directory in the Azure Functions 2019 format (``inv.csv``, and optionally
  ``run.csv`` and ``mem.csv``). Each function is one model, named ``fn-`` and the first
  8 hex characters of its hash (more where two would collide). A minute's N invocations
  are spread uniformly at random over that minute with ``random.Random(seed)``, drawing
  for every function in file order and every minute, whatever is filtered out, so a
  filtered or windowed load equals the full load filtered afterwards.
- a file of JSON lines, the gateway's access log: each POST naming a model is one
  arrival; its durations are the percentiles of the worker times of its fresh answers.

A trace that cannot be read raises TraceError naming the file, and the line where one
line is at fault.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import statistics
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import pairwise
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

from .errors import WanwuError

log = logging.getLogger(__name__)

# The percentiles run.csv carries, and the ones taken of an access log's worker times.
_PERCENTILES = (0.0, 1.0, 25.0, 50.0, 75.0, 99.0, 100.0)
_RUN_COLUMNS = tuple(f"percentile_Average_{p:g}" for p in _PERCENTILES)
_NAME_CHARS = 8
_MINUTES_PER_DAY = 1440
_SECONDS_PER_DAY = 86400.0
_EXPECTED = "expected an Azure Functions trace directory with inv.csv, or the gateway's JSON-lines access log"


class TraceError(WanwuError):
    """A trace cannot be read; the message names the file (and line where it applies)."""


@dataclass(frozen=True)
class ModelProfile:
    """How one model behaves: the memory a loaded worker of it holds, and the
    distribution of its request durations as (percentile 0..100, milliseconds) points.
    """

    name: str
    memory_mb: float
    duration_ms: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        points = self.duration_ms
        if not points:
            raise TraceError(f"model {self.name!r}: a duration profile needs at least one point")
        percentiles = [p for p, _ in points]
        durations = [d for _, d in points]
        if not all(0.0 <= p <= 100.0 for p in percentiles) or any(a >= b for a, b in pairwise(percentiles)):
            raise TraceError(f"model {self.name!r}: percentiles must increase within 0..100, got {percentiles}")
        if not all(math.isfinite(d) and d >= 0.0 for d in durations) or any(a > b for a, b in pairwise(durations)):
            raise TraceError(f"model {self.name!r}: durations must be finite, >= 0 and non-decreasing, got {durations}")
        if not (math.isfinite(self.memory_mb) and self.memory_mb >= 0.0):
            raise TraceError(f"model {self.name!r}: memory_mb must be finite and >= 0, got {self.memory_mb}")

    def sample_ms(self, u: float) -> float:
        """Inverse CDF: the duration at quantile u in [0, 1], linear between the points
        (one point: constant). Below the first point or above the last, that point's
        duration.
        """
        if not 0.0 <= u <= 1.0:
            raise TraceError(f"model {self.name!r}: quantile {u} is outside [0, 1]")
        q = u * 100.0
        points = self.duration_ms
        if q <= points[0][0]:
            return points[0][1]
        for (p0, d0), (p1, d1) in pairwise(points):
            if q <= p1:
                return d0 + (d1 - d0) * (q - p0) / (p1 - p0)
        return points[-1][1]

    @property
    def mean_ms(self) -> float:
        """Rough mean: the integral of sample_ms over [0, 1] (trapezoids between the
        points, flat beyond the ends)."""
        points = self.duration_ms
        area = points[0][1] * points[0][0] + points[-1][1] * (100.0 - points[-1][0])
        area += sum((p1 - p0) * (d0 + d1) / 2.0 for (p0, d0), (p1, d1) in pairwise(points))
        return area / 100.0


@dataclass(frozen=True)
class Trace:
    """Arrivals as (seconds since the trace start, model name), sorted by time, with a
    profile for every model that arrives, over a window of ``span_s`` seconds.
    """

    arrivals: tuple[tuple[float, str], ...]
    profiles: Mapping[str, ModelProfile]
    span_s: float
    source: str

    def __post_init__(self) -> None:
        if not (math.isfinite(self.span_s) and self.span_s >= 0.0):
            raise TraceError(f"{self.source}: span must be finite and >= 0, got {self.span_s}")
        # A private read-only copy: traces are shared between simulator runs.
        object.__setattr__(self, "profiles", MappingProxyType(dict(self.profiles)))

    def models(self) -> list[str]:
        """The models that arrive, in order of first arrival."""
        return list(dict.fromkeys(map(itemgetter(1), self.arrivals)))

    def window(self, start_s: float, end_s: float) -> Trace:
        """The arrivals with start_s <= t < end_s, rebased to 0; span end_s - start_s.
        Every profile is kept."""
        if not start_s < end_s:
            raise TraceError(f"{self.source}: a window must start before it ends, got {start_s}..{end_s} s")
        first = bisect_left(self.arrivals, start_s, key=itemgetter(0))
        stop = bisect_left(self.arrivals, end_s, key=itemgetter(0))
        arrivals = tuple([(t - start_s, name) for t, name in self.arrivals[first:stop]])
        return replace(self, arrivals=arrivals, span_s=end_s - start_s)

    def compressed(self, speedup: float) -> Trace:
        """The same trace played ``speedup`` times faster; durations are unchanged."""
        if not (speedup > 0.0 and math.isfinite(speedup)):
            raise TraceError(f"{self.source}: speedup must be a positive number, got {speedup}")
        arrivals = tuple([(t / speedup, name) for t, name in self.arrivals])
        return replace(self, arrivals=arrivals, span_s=self.span_s / speedup)

    def mapped(self, mapping: Mapping[str, str]) -> Trace:
        """Models renamed by ``mapping`` (unmapped names stay). Where several models
        become one, the profile of the one that arrives first is kept, renamed."""
        order = [*self.models(), *self.profiles]
        new_name = {old: mapping.get(old, old) for old in order}
        arrivals = tuple([(t, new_name[name]) for t, name in self.arrivals])
        profiles: dict[str, ModelProfile] = {}
        for old in order:
            new = new_name[old]
            if new not in profiles and old in self.profiles:
                profiles[new] = replace(self.profiles[old], name=new)
        return replace(self, arrivals=arrivals, profiles=profiles)


def load_trace(
    path: str | Path,
    *,
    max_per_day: float | None = None,
    minutes: tuple[int, int] | None = None,
    seed: int = 0,
) -> Trace:
    """Load an Azure Functions 2019 trace directory or a gateway JSON-lines access log.

    ``max_per_day`` keeps only models invoked at most that often per day over the whole
    source; ``minutes=(A, B)`` keeps minutes A..B-1 (0-based) rebased to 0; ``seed``
    drives the spreading of Azure per-minute counts (access logs have exact times).
    """
    source = Path(path)
    if max_per_day is not None and not max_per_day >= 0.0:
        raise TraceError(f"{source}: max_per_day must be >= 0, got {max_per_day}")
    if source.is_dir():
        if not (source / "inv.csv").is_file():
            raise TraceError(f"{source}: no inv.csv in this directory; {_EXPECTED}")
        return _load_azure(source, max_per_day, minutes, seed)
    if source.is_file():
        return _load_access_log(source, max_per_day, minutes)
    raise TraceError(f"{source}: no such file or directory; {_EXPECTED}")


def _minute_range(source: Path, minutes: tuple[int, int] | None, total: int) -> tuple[int, int]:
    """The 0-based minutes [A, B) to keep, checked against the ``total`` the trace has."""
    if minutes is None:
        return 0, total
    first, stop = minutes
    if not 0 <= first < stop <= total:
        raise TraceError(f"{source}: minutes={minutes} must satisfy 0 <= A < B <= {total} (the trace's minutes)")
    return first, stop


# --- Azure Functions 2019 --------------------------------------------------------------


@dataclass
class _Function:
    app: str
    counts: list[int]


@contextmanager
def _csv_rows(path: Path) -> Iterator[tuple[list[str], Iterator[tuple[int, list[str]]]]]:
    """The header and an iterator of (line number, row) over a CSV file's data rows."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)

        def rows(width: int) -> Iterator[tuple[int, list[str]]]:
            try:
                for row in reader:
                    if not row:
                        continue
                    if len(row) != width:
                        raise TraceError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {width}")
                    yield reader.line_num, row
            except csv.Error as e:
                raise TraceError(f"{path}, line {reader.line_num}: {e}") from e

        try:
            header = next(reader, None)
            if header is None:
                raise TraceError(f"{path}: empty file, expected a header line")
            yield header, rows(len(header))
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text ({e.reason} near line {reader.line_num + 1})") from e


def _columns(path: Path, header: Sequence[str], names: Iterable[str]) -> list[int]:
    """The indexes of the named columns; TraceError naming the ones missing."""
    missing = [n for n in names if n not in header]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
    return [header.index(n) for n in names]


def _minute_columns(path: Path, header: Sequence[str]) -> list[int]:
    """The indexes of minute_1..minute_M, in minute order."""
    found: dict[int, int] = {}
    for index, name in enumerate(header):
        if name.startswith("minute_"):
            try:
                found[int(name.removeprefix("minute_"))] = index
            except ValueError:
                raise TraceError(f"{path}: column {name!r} is not minute_<number>") from None
    if not found:
        raise TraceError(f"{path}: missing columns minute_1..minute_N (invocations per minute)")
    if sorted(found) != list(range(1, len(found) + 1)):
        raise TraceError(f"{path}: minute columns must be minute_1..minute_{len(found)} without gaps")
    return [found[m] for m in range(1, len(found) + 1)]


def _is_count(text: str) -> bool:
    try:
        return int(text) >= 0
    except ValueError:
        return False


def _counts(path: Path, line: int, row: list[str], header: list[str], columns: list[int]) -> list[int]:
    try:
        counts = [int(row[i]) for i in columns]
    except ValueError:
        counts = []
    if len(counts) == len(columns) and min(counts) >= 0:
        return counts
    # Slow path, for the message only: name the first bad cell.
    bad = next(i for i in columns if not _is_count(row[i]))
    raise TraceError(f"{path}, line {line}: {header[bad]}={row[bad]!r} is not a non-negative integer count")


def _read_invocations(path: Path) -> tuple[dict[str, _Function], int]:
    """Functions by hash in file order (duplicate rows summed), and the minutes covered."""
    functions: dict[str, _Function] = {}
    with _csv_rows(path) as (header, rows):
        fn_col, app_col = _columns(path, header, ("HashFunction", "HashApp"))
        minute_cols = _minute_columns(path, header)
        for line, row in rows:
            key = row[fn_col].strip()
            if not key:
                raise TraceError(f"{path}, line {line}: empty HashFunction")
            counts = _counts(path, line, row, header, minute_cols)
            seen = functions.get(key)
            if seen is None:
                functions[key] = _Function(row[app_col].strip(), counts)
            else:
                seen.counts = [a + b for a, b in zip(seen.counts, counts, strict=True)]
    return functions, len(minute_cols)


def _number(path: Path, line: int, column: str, text: str) -> float:
    """A finite, non-negative number from a CSV cell."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0.0):
        raise TraceError(f"{path}, line {line}: {column}={text!r} is not a non-negative number")
    return value


def _running_max(values: Iterable[float]) -> list[float]:
    # Percentiles of per-interval averages, or interpolated ones, can dip by a rounding
    # error; the inverse CDF needs them non-decreasing.
    out: list[float] = []
    for v in values:
        out.append(max(v, out[-1]) if out else v)
    return out


def _read_durations(path: Path) -> tuple[dict[str, tuple[tuple[float, float], ...]], list[float]]:
    """Duration points by function hash (the first row of each wins), and every Average."""
    points: dict[str, tuple[tuple[float, float], ...]] = {}
    averages: list[float] = []
    with _csv_rows(path) as (header, rows):
        fn_col, avg_col, *pct_cols = _columns(path, header, ("HashFunction", "Average", *_RUN_COLUMNS))
        for line, row in rows:
            averages.append(_number(path, line, "Average", row[avg_col]))
            values = [_number(path, line, header[i], row[i]) for i in pct_cols]
            points.setdefault(row[fn_col].strip(), tuple(zip(_PERCENTILES, _running_max(values), strict=True)))
    return points, averages


def _read_memory(path: Path) -> dict[str, float]:
    """AverageAllocatedMb by app hash (the first row of each wins)."""
    memory: dict[str, float] = {}
    with _csv_rows(path) as (header, rows):
        app_col, mb_col = _columns(path, header, ("HashApp", "AverageAllocatedMb"))
        for line, row in rows:
            memory.setdefault(row[app_col].strip(), _number(path, line, "AverageAllocatedMb", row[mb_col]))
    return memory


def _shared_prefix(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _model_names(hashes: Iterable[str]) -> dict[str, str]:
    """``fn-`` + the shortest prefix (at least 8 characters) no other hash shares."""
    ordered = sorted(hashes)
    names: dict[str, str] = {}
    for i, h in enumerate(ordered):
        # In sorted order the longest prefix h shares with any hash, it shares with a neighbour.
        length = _NAME_CHARS
        for other in ordered[max(i - 1, 0) : i] + ordered[i + 1 : i + 2]:
            length = max(length, _shared_prefix(h, other) + 1)
        names[h] = "fn-" + h[:length]
    return names


def _spread(
    functions: Mapping[str, _Function], names: Mapping[str, str], keep: set[str], first: int, stop: int, seed: int
) -> list[tuple[float, str]]:
    """Arrivals of the kept functions in minutes [first, stop), rebased, sorted.

    Draws for every function and minute so that filters do not shift the random stream.
    """
    draw = random.Random(seed).random
    offset = 60.0 * first
    arrivals: list[tuple[float, str]] = []
    for key, fn in functions.items():
        name = names[key]
        kept = key in keep
        for minute, n in enumerate(fn.counts):
            if not n:
                continue
            start = 60.0 * minute
            if kept and first <= minute < stop:
                arrivals.extend([((start + 60.0 * draw()) - offset, name) for _ in range(n)])
            else:
                for _ in range(n):
                    draw()
    # By time alone: float keys sort faster than tuples, and ties keep the draw order.
    arrivals.sort(key=itemgetter(0))
    return arrivals


def _load_azure(directory: Path, max_per_day: float | None, minutes: tuple[int, int] | None, seed: int) -> Trace:
    functions, total_minutes = _read_invocations(directory / "inv.csv")
    first, stop = _minute_range(directory, minutes, total_minutes)
    days = total_minutes / _MINUTES_PER_DAY
    keep = {k for k, fn in functions.items() if max_per_day is None or sum(fn.counts) / days <= max_per_day}
    names = _model_names(functions)
    arrivals = _spread(functions, names, keep, first, stop, seed)
    profiles = _azure_profiles(directory, {k: fn for k, fn in functions.items() if k in keep}, names)
    return Trace(tuple(arrivals), profiles, 60.0 * (stop - first), str(directory))


def _azure_profiles(
    directory: Path, functions: Mapping[str, _Function], names: Mapping[str, str]
) -> dict[str, ModelProfile]:
    """A profile per function: durations from run.csv, memory from mem.csv by app."""
    run_path, mem_path = directory / "run.csv", directory / "mem.csv"
    points: dict[str, tuple[tuple[float, float], ...]] = {}
    averages: list[float] = []
    if run_path.is_file():
        points, averages = _read_durations(run_path)
    fallback_ms = statistics.median(averages) if averages else 0.0
    missing = [k for k in functions if k not in points]
    if missing:
        log.warning(
            "%s: %d of %d functions have no durations in run.csv; they take the median average, %.1f ms",
            directory,
            len(missing),
            len(functions),
            fallback_ms,
        )
    memory = _read_memory(mem_path) if mem_path.is_file() else {}
    fallback_mb = statistics.median(memory.values()) if memory else 0.0
    apps_missing = {fn.app for fn in functions.values() if fn.app not in memory}
    if apps_missing:
        log.warning(
            "%s: %d apps have no memory in mem.csv; they take the median, %.1f MB",
            directory,
            len(apps_missing),
            fallback_mb,
        )
    return {
        names[k]: ModelProfile(names[k], memory.get(fn.app, fallback_mb), points.get(k, ((50.0, fallback_ms),)))
        for k, fn in functions.items()
    }


# --- the gateway's access log -------------------------------------------------------


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


def _load_access_log(path: Path, max_per_day: float | None, minutes: tuple[int, int] | None) -> Trace:
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
