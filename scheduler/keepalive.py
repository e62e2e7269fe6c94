"""Keep-alive policies: how long an idle worker stays, and when to pre-warm one.

Pure, like ``policy.py``: the pool core tells a policy when a model's requests arrive
and asks it, per model, for a ``Window``: stop an idle worker after ``keep_s`` idle
seconds, and, when ``prewarm_s`` > 0, stop it at once instead and start a new one
``prewarm_s`` after the last request, to be kept ``keep_s`` from then.

- ``fixed``: the model's TTL (bundle ``idle_ttl_s``, else ``WANWU_IDLE_TTL_S``), no pre-warm.
- ``hybrid``: the hybrid histogram policy of Shahrad et al., "Serverless in the Wild"
  (USENIX ATC 2020), the reference, per model:
  * a histogram of idle times (gaps between consecutive requests of the model), in
    log-spaced bins from 1 s up to 4 hours (the paper uses 1-minute bins over 4 hours;
    image requests are seconds apart, so the bins are relative instead: 10 % wide);
  * pre-warm window = the 5th percentile of idle times, less 10 %; keep-alive window =
    the 99th percentile plus 10 %, less the pre-warm window (the paper's margins);
  * a pre-warm window shorter than twice the model's measured start-up time is not
    worth a stop and a start: the worker is kept warm instead (pre-warm 0).
- ``adaptive``: the same histogram, but the windows are chosen for cost instead of by
  fixed percentiles. The model's TTL is read as the operator's price of a cold start
  in idle seconds (a fixed TTL T keeps a worker T seconds to save one cold start), and
  the pre-warm p and keep-alive k minimise, over the model's idle times,
  ``E[idle seconds] + T * P(cold start)``: a gap shorter than p or longer than p + k
  is a cold start; a pre-warmed worker holds memory from its start-up on. The fixed
  TTL (p = 0, k = T) is one of the choices, so on the history it has seen adaptive is
  never worse than fixed at the same T; with the bursts and periods of real traffic it
  is cheaper (ski rental with a known distribution; Karlin et al., SODA'90).
- Both fall back to ``fixed`` until a model has ``min_samples`` (10) idle times over a
  history of at least ``min_span_ttls`` (10) TTLs, so that gaps longer than the TTL had
  a chance to show, and when most idle times fall beyond the histogram's range (the
  paper switches to ARIMA there).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

POLICIES = ("fixed", "adaptive", "hybrid")


@dataclass(frozen=True)
class Window:
    """What to do with a model's idle workers: pre-warm after ``prewarm_s`` (0: never
    stop them early), keep ``keep_s`` idle seconds before stopping."""

    prewarm_s: float
    keep_s: float
    source: str  # "ttl" (fixed, or the fallback) or "histogram"


class KeepAlive(Protocol):
    name: str

    def observe(self, model: str, now: float) -> None:
        """A request for ``model`` arrived at ``now`` (retries excluded)."""
        ...

    def window(self, model: str, ttl_s: float, start_s: float) -> Window:
        """The window for ``model``; ``ttl_s`` is its fixed TTL (the fallback) and
        ``start_s`` how long one of its workers takes to start."""
        ...

    def describe(self) -> dict[str, Any]:
        """Per-model state for the pool's status."""
        ...


class FixedKeepAlive:
    """Today's rule: a fixed TTL per model."""

    name = "fixed"

    def observe(self, model: str, now: float) -> None:
        pass

    def window(self, model: str, ttl_s: float, start_s: float) -> Window:
        return Window(0.0, ttl_s, "ttl")

    def describe(self) -> dict[str, Any]:
        return {}


# Bin edges in seconds: 0, then 1 s growing by 10 % up to 4 hours (about 100 bins).
RANGE_S = 4 * 3600.0
_EDGES: tuple[float, ...] = (0.0, *(1.1**i for i in range(int(math.log(RANGE_S) / math.log(1.1)) + 1)))
assert _EDGES[-1] < RANGE_S  # the last bin ends at RANGE_S (``_upper``)


class _Histogram:
    __slots__ = ("counts", "first", "last", "oob", "sums", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_EDGES)
        self.sums = [0.0] * len(_EDGES)  # idle seconds per bin: exact means where bins are coarse
        self.total = 0
        self.oob = 0  # idle times beyond the range
        self.first: float | None = None  # the first request seen
        self.last: float | None = None

    def add(self, idle_s: float) -> None:
        if idle_s > RANGE_S:
            self.oob += 1
        else:
            index = bisect.bisect_right(_EDGES, idle_s) - 1
            self.counts[index] += 1
            self.sums[index] += idle_s
            self.total += 1

    def percentile_bin(self, fraction: float) -> int:
        """The bin holding the ``fraction`` quantile of in-range idle times."""
        wanted = max(1, math.ceil(fraction * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= wanted:
                return index
        return len(self.counts) - 1


def _upper(index: int) -> float:
    return _EDGES[index + 1] if index + 1 < len(_EDGES) else RANGE_S


class _HistogramPolicy:
    """What both histogram policies share: per-model idle times, the fallback to the TTL
    while a model has little history or most of it is out of range, and a cache."""

    name = ""

    def __init__(self, min_samples: int = 10, min_span_ttls: float = 10.0, max_oob_fraction: float = 0.5) -> None:
        self.min_samples = min_samples
        self.min_span_ttls = min_span_ttls
        self.max_oob_fraction = max_oob_fraction
        self._models: dict[str, _Histogram] = {}
        # model -> (ttl, start, samples it was computed from, (prewarm, keep) or None: fall back)
        self._cache: dict[str, tuple[float, float, int, tuple[float, float] | None]] = {}

    def observe(self, model: str, now: float) -> None:
        hist = self._models.get(model)
        if hist is None:
            hist = self._models[model] = _Histogram()
        if hist.last is not None:
            hist.add(max(0.0, now - hist.last))
        else:
            hist.first = now
        hist.last = now

    def window(self, model: str, ttl_s: float, start_s: float) -> Window:
        hist = self._models.get(model)
        if hist is None or not self._representative(hist, ttl_s):
            return Window(0.0, ttl_s, "ttl")
        samples = hist.total + hist.oob
        cached = self._cache.get(model)
        if cached is None or cached[:2] != (ttl_s, start_s) or self._stale(cached[2], samples):
            cached = (ttl_s, start_s, samples, self._choose(hist, ttl_s, start_s))
            self._cache[model] = cached
        chosen = cached[3]
        if chosen is None:
            return Window(0.0, ttl_s, "ttl")
        return Window(chosen[0], max(chosen[1], 1.0), "histogram")

    def _representative(self, hist: _Histogram, ttl_s: float) -> bool:
        """Enough idle times, over a long enough history (several TTLs: room for gaps
        longer than the TTL to have shown up), and most of them within range."""
        if hist.total < self.min_samples or hist.first is None or hist.last is None:
            return False
        if hist.last - hist.first < self.min_span_ttls * ttl_s:
            return False
        return hist.oob <= self.max_oob_fraction * (hist.total + hist.oob)

    @staticmethod
    def _stale(computed_from: int, samples: int) -> bool:
        """Recompute on every new idle time at first, then as the history grows by 5 %:
        a busy model's window settles, and recomputing it per request would cost."""
        return samples - computed_from >= max(1.0, 0.05 * computed_from)

    def _choose(self, hist: _Histogram, ttl_s: float, start_s: float) -> tuple[float, float] | None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {}
        for model, hist in self._models.items():
            cached = self._cache.get(model)
            chosen = cached[3] if cached is not None else None
            described[model] = {
                "idle_times": hist.total + hist.oob,
                "source": "histogram" if chosen is not None else "ttl",
                "prewarm_s": None if chosen is None else round(chosen[0], 1),
                "keep_s": None if chosen is None else round(chosen[1], 1),
            }
        return described


class HybridKeepAlive(_HistogramPolicy):
    """The hybrid histogram policy of Shahrad et al. (ATC'20), the reference (module doc)."""

    name = "hybrid"

    def __init__(self, head: float = 0.05, tail: float = 0.99, margin: float = 0.10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head, self.tail, self.margin = head, tail, margin

    def _choose(self, hist: _Histogram, ttl_s: float, start_s: float) -> tuple[float, float] | None:
        prewarm = _EDGES[hist.percentile_bin(self.head)] * (1 - self.margin)
        keep = _upper(hist.percentile_bin(self.tail)) * (1 + self.margin) - prewarm
        if prewarm < 2 * start_s:
            return 0.0, keep + prewarm  # too close to be worth a stop and a start: keep it warm
        return prewarm, keep


class AdaptiveKeepAlive(_HistogramPolicy):
    """Cost-aware windows from the same histogram (module doc): the pre-warm and
    keep-alive windows that minimise expected idle seconds + TTL x P(cold start)."""

    name = "adaptive"

    def _choose(self, hist: _Histogram, ttl_s: float, start_s: float) -> tuple[float, float] | None:
        counts, n_bins = hist.counts, len(hist.counts)
        total = hist.total + hist.oob
        below = [0] * (n_bins + 1)  # idle times in bins before i
        mass = [0.0] * (n_bins + 1)  # and their sum of seconds
        for i, count in enumerate(counts):
            below[i + 1] = below[i] + count
            mass[i + 1] = mass[i] + hist.sums[i]
        # Optimal windows start and end at occupied bins (an empty bin only adds idle time),
        # or keep for the whole range: a few hundred pairs, not ten thousand.
        occupied = [i for i, count in enumerate(counts) if count]
        ends = sorted({0, *occupied, n_bins - 1})  # 0: hardly keep it at all
        best: tuple[float, float, float] | None = None  # (cost, prewarm, keep)
        for a in [0, *occupied]:
            prewarm = _EDGES[a]
            if 0 < prewarm < 2 * start_s:
                continue  # a pre-warm that close is a stop and a start for nothing
            started = start_s * (total - below[a]) if a else 0.0  # a pre-warmed worker's start-up holds memory
            early = below[a]  # requests before the pre-warm: cold
            for b in ends:
                if b < a:
                    continue
                until = _upper(b)
                inside = below[b + 1] - below[a]
                late = total - below[b + 1]  # requests after the window: cold (the worker idled it all)
                idle = (mass[b + 1] - mass[a]) - prewarm * inside + late * (until - prewarm) + started
                cost = idle + ttl_s * (early + late)
                if best is None or cost < best[0]:
                    best = (cost, prewarm, until - prewarm)
        return None if best is None else (best[1], best[2])


def make(name: str) -> KeepAlive:
    """The policy called ``name``: ``fixed``, ``adaptive`` or ``hybrid``."""
    factories: dict[str, Callable[[], KeepAlive]] = {
        "fixed": FixedKeepAlive,
        "adaptive": AdaptiveKeepAlive,
        "hybrid": HybridKeepAlive,
    }
    if name not in factories:
        raise ValueError(f"unknown keep-alive policy {name!r}; expected one of {', '.join(POLICIES)}")
    return factories[name]()
