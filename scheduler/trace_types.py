"""The trace the simulator replays, :class:`Trace`, with a :class:`ModelProfile` per
model, and what both of its readers (:mod:`scheduler.trace_azure`,
:mod:`scheduler.trace_access_log`) share. ``scheduler.traces`` loads one and re-exports
these types.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import pairwise
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType

from .errors import WanwuError

# The percentiles run.csv carries, and the ones taken of an access log's worker times.
_PERCENTILES = (0.0, 1.0, 25.0, 50.0, 75.0, 99.0, 100.0)
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


# --- shared by the readers -----------------------------------------------------------


def _minute_range(source: Path, minutes: tuple[int, int] | None, total: int) -> tuple[int, int]:
    """The 0-based minutes [A, B) to keep, checked against the ``total`` the trace has."""
    if minutes is None:
        return 0, total
    first, stop = minutes
    if not 0 <= first < stop <= total:
        raise TraceError(f"{source}: minutes={minutes} must satisfy 0 <= A < B <= {total} (the trace's minutes)")
    return first, stop


def _running_max(values: Iterable[float]) -> list[float]:
    # Percentiles of per-interval averages, or interpolated ones, can dip by a rounding
    # error; the inverse CDF needs them non-decreasing.
    out: list[float] = []
    for v in values:
        out.append(max(v, out[-1]) if out else v)
    return out
