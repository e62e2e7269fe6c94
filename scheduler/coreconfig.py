"""What the pool core decides with (``CoreConfig``), and how it follows from the
settings and the models catalog (``CoreConfig.from_settings``): pure, so the live pool, the
simulator and ``wanwu replay`` derive the same values (the Retry-After a full pool
answers, which models a stem cell can load, which may fall back to the CPU).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import policy

if TYPE_CHECKING:  # the core imports this module: it stays free of the catalog's and settings' imports
    from .models import ModelInfo
    from .settings import Settings

UNBOUNDED = sys.maxsize
STEM = policy.STEM


@dataclass(frozen=True)
class CoreConfig:
    """Everything the core needs to decide; ``capacity`` 0 means unbounded."""

    capacity: int
    default_ttl_s: float
    model_ttl_s: Mapping[str, float] = field(default_factory=dict)
    estimates_mb: Mapping[str, float] = field(default_factory=dict)
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    queue_max: int = 64
    retry_after_s: float = 5.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    keepalive: str = "fixed"
    tick_s: float = 0.0  # how late a tick may come: pre-warms start that early (0: ticks are exact)
    stem_cells: int = 0  # stem cells to keep ready (capacity permitting)
    stem_models: frozenset[str] | None = None  # models a stem cell can load; None: all
    batching: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # model -> (max images, max wait s)
    interactive_reserve_s: float = 10.0  # batch work leaves a slot free this long after an interactive request
    cpu_fallback: frozenset[str] = frozenset()  # models a CPU worker serves when no GPU has room (GPU pools only)
    attempts: int = 2  # tries a request gets: a worker that crashes or times out on it, and it goes to another

    @property
    def limits(self) -> policy.Limits:
        capacity = self.capacity if self.capacity > 0 else UNBOUNDED
        return policy.Limits(capacity, self.default_ttl_s, self.model_ttl_s, self.high_watermark, self.low_watermark)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        models: Iterable[ModelInfo] | None = None,
        ttl_overrides: Mapping[str, float] | None = None,
        backoff: tuple[float, float] = (1.0, 60.0),
        batching: Mapping[str, tuple[int, float]] | None = None,
    ) -> CoreConfig:
        """The core's config for ``settings`` and the catalog's ``models``, with per-model
        TTLs set at run time (``ttl_overrides``, over the bundles' own); ``models`` None:
        no catalog at hand (``wanwu tune``, ``wanwu replay``), so a stem cell may load
        any model, where an empty catalog has none for it. The one way
        settings become a CoreConfig: the live pool, ``wanwu tune``, ``wanwu replay`` and
        the tests all come here. ``batching`` (model: max images, max wait s) stands in
        for the bundles' own where only a live gateway's report of them is at hand."""
        catalog = models is not None
        models = list(models or ())
        s = settings
        return cls(
            capacity=s.max_workers,
            default_ttl_s=s.idle_ttl_s,
            model_ttl_s={**{m.name: m.idle_ttl_s for m in models if m.idle_ttl_s is not None}, **(ttl_overrides or {})},
            estimates_mb={**{m.name: float(m.gpu_memory_mb) for m in models}, STEM: s.stem_gpu_mb if s.gpus else 0.0},
            high_watermark=s.gpu_high_watermark,
            low_watermark=s.gpu_low_watermark,
            queue_max=s.queue_max,
            retry_after_s=retry_after(s.queue_timeout_s),
            backoff_base_s=backoff[0],
            backoff_max_s=backoff[1],
            keepalive=s.keepalive,
            stem_cells=s.stem_cells,
            batching=dict(batching)
            if batching is not None
            else {m.name: (m.batching.max_batch_size, m.batching.max_wait_ms / 1000) for m in models if m.batching},
            interactive_reserve_s=s.interactive_reserve_s,
            # Without GPUs every worker is a CPU one: there is nothing to fall back from.
            cpu_fallback=frozenset(m.name for m in models if m.cpu_fallback) if s.gpus else frozenset(),
            stem_models=stem_models(models, s.models_dir) if catalog else None,
        )


def retry_after(queue_timeout_s: float) -> float:
    """The Retry-After a full pool answers: the queue timeout, between 1 and 5 s (a
    client that waited that long for a worker tries again about when one may be free)."""
    return max(1.0, min(queue_timeout_s, 5.0))


def stem_models(models: Iterable[ModelInfo], models_dir: Path) -> frozenset[str]:
    """The models a stem cell can load: it sees the models directory, so a bundle linked
    in from elsewhere starts its own container."""
    root = models_dir.resolve()
    return frozenset(m.name for m in models if m.path.parent == root)
