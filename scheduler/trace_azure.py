"""Reading an Azure Functions 2019 trace directory (``inv.csv``, and optionally
``run.csv`` and ``mem.csv``) as a :class:`Trace`.

Each function is one model, named ``fn-`` and the first 8 hex characters of its hash
(more where two would collide). A minute's N invocations are spread uniformly at random
over that minute with ``random.Random(seed)``, drawing for every function in file order
and every minute, whatever is filtered out, so a filtered or windowed load equals the
full load filtered afterwards. Durations come from ``run.csv`` by function, memory from
``mem.csv`` by app; what is missing takes the median, with a warning.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

from .trace_types import _PERCENTILES, ModelProfile, Trace, TraceError, _minute_range, _running_max

# The loader's log lines keep the logger name they had before scheduler.traces was split.
log = logging.getLogger("scheduler.traces")

_RUN_COLUMNS = tuple(f"percentile_Average_{p:g}" for p in _PERCENTILES)
_NAME_CHARS = 8
_MINUTES_PER_DAY = 1440


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


def load_azure(directory: Path, max_per_day: float | None, minutes: tuple[int, int] | None, seed: int) -> Trace:
    """The trace in an Azure Functions 2019 ``directory``; the arguments are load_trace's."""
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
