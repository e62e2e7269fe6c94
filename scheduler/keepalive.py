"""Keep-alive policies: how long an idle worker stays, and when to pre-warm one.

Pure, like ``policy.py``: the pool core tells a policy when a model's requests arrive
and asks it, per model, for a ``Window``: stop an idle worker after ``keep_s`` idle
seconds, and, when ``prewarm_s`` > 0, stop it at once instead and start a new one
``prewarm_s`` after the last request, to be kept ``keep_s`` from then.

- ``fixed``: the model's TTL (bundle ``idle_ttl_s``, else ``WANWU_IDLE_TTL_S``), no pre-warm.
- ``adaptive``: the hybrid histogram policy of Shahrad et al., "Serverless in the Wild"
  (USENIX ATC 2020), per model:
  * a histogram of idle times (gaps between consecutive requests of the model), in
    log-spaced bins from 1 s up to 4 hours (the paper uses 1-minute bins over 4 hours;
    image requests are seconds apart, so the bins are relative instead: 10 % wide);
  * pre-warm window = the 5th percentile of idle times, less 10 %; keep-alive window =
    the 99th percentile plus 10 %, less the pre-warm window (the paper's margins);
  * a pre-warm window shorter than twice the model's measured start-up time is not
    worth a stop and a start: the worker is kept warm instead (pre-warm 0);
  * until a model has ``min_samples`` idle times, or when most of them fall beyond the
    histogram's range (the paper switches to ARIMA there), it falls back to ``fixed``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

POLICIES = ("fixed", "adaptive")


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
_EDGES: tuple[float, ...] = (0.0, *(1.1**i for i in range(int(math.log(RANGE_S) / math.log(1.1)) + 2)))


class _Histogram:
    __slots__ = ("counts", "last", "oob", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_EDGES)
        self.total = 0
        self.oob = 0  # idle times beyond the range
        self.last: float | None = None

    def add(self, idle_s: float) -> None:
        if idle_s > RANGE_S:
            self.oob += 1
        else:
            self.counts[bisect.bisect_right(_EDGES, idle_s) - 1] += 1
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


class AdaptiveKeepAlive:
    """The hybrid histogram policy (module doc)."""

    name = "adaptive"

    def __init__(
        self,
        min_samples: int = 10,
        head: float = 0.05,
        tail: float = 0.99,
        margin: float = 0.10,
        max_oob_fraction: float = 0.5,
    ) -> None:
        self.min_samples = min_samples
        self.head, self.tail, self.margin = head, tail, margin
        self.max_oob_fraction = max_oob_fraction
        self._models: dict[str, _Histogram] = {}
        self._windows: dict[str, tuple[float, float] | None] = {}  # cache of (prewarm, keep), None: fall back

    def observe(self, model: str, now: float) -> None:
        hist = self._models.get(model)
        if hist is None:
            hist = self._models[model] = _Histogram()
        if hist.last is not None:
            hist.add(max(0.0, now - hist.last))
            self._windows.pop(model, None)
        hist.last = now

    def window(self, model: str, ttl_s: float, start_s: float) -> Window:
        if model not in self._windows:
            self._windows[model] = self._from_histogram(self._models.get(model))
        cached = self._windows[model]
        if cached is None:
            return Window(0.0, ttl_s, "ttl")
        prewarm, keep = cached
        if prewarm < 2 * start_s:
            # Too close to be worth a stop and a start: keep it warm through the head too.
            return Window(0.0, keep + prewarm, "histogram")
        return Window(prewarm, keep, "histogram")

    def _from_histogram(self, hist: _Histogram | None) -> tuple[float, float] | None:
        if hist is None or hist.total < self.min_samples:
            return None
        if hist.oob > self.max_oob_fraction * (hist.total + hist.oob):
            return None
        prewarm = _EDGES[hist.percentile_bin(self.head)] * (1 - self.margin)
        keep = _upper(hist.percentile_bin(self.tail)) * (1 + self.margin) - prewarm
        return prewarm, max(keep, 1.0)

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {}
        for model, hist in self._models.items():
            window = self.window(model, float("nan"), 0.0)
            described[model] = {
                "idle_times": hist.total + hist.oob,
                "source": window.source,
                "prewarm_s": None if window.source == "ttl" else round(window.prewarm_s, 1),
                "keep_s": None if window.source == "ttl" else round(window.keep_s, 1),
            }
        return described


def make(name: str) -> KeepAlive:
    """The policy called ``name`` (``fixed`` or ``adaptive``)."""
    factories: dict[str, Callable[[], KeepAlive]] = {"fixed": FixedKeepAlive, "adaptive": AdaptiveKeepAlive}
    if name not in factories:
        raise ValueError(f"unknown keep-alive policy {name!r}; expected one of {', '.join(POLICIES)}")
    return factories[name]()
