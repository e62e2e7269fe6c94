"""What the pool reports about itself (``WarmPool.snapshot``: ``/pool/status``, the
metrics, ``wanwu replay``): its workers, queue, counters and live settings, read from
the core under the pool's lock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .backends.base import Backend, ReportsReadiness
from .core import PoolCore
from .errors import WanwuError
from .models import ModelCatalog
from .policy import GpuReading, State
from .settings import Settings

__all__ = ["PoolSnapshot", "WorkerInfo", "live_settings", "take_snapshot"]


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    model: str
    state: str
    idle_s: float | None
    age_s: float
    gpu_mb: float
    device: str | None
    requests: int


@dataclass(frozen=True)
class PoolSnapshot:
    capacity: int
    workers: list[WorkerInfo]
    queue_depth: int
    counters: dict[str, int]
    reaps: dict[str, int]
    gpus: list[GpuReading]
    backoff: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)
    keepalive: dict[str, Any] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # by priority


def take_snapshot(core: PoolCore, settings: Settings, now: float) -> PoolSnapshot:
    """The pool as ``core`` holds it at ``now`` (the caller holds the pool's lock)."""
    workers = [
        WorkerInfo(
            w.id,
            w.model,
            w.state.value,
            round(now - w.last_used, 3) if w.state is State.IDLE else None,
            round(now - w.started_at, 3),
            w.gpu_mb,
            "cpu" if w.cpu_fallback else w.device,
            w.served,
        )
        for w in sorted(core.workers.values(), key=lambda w: w.started_at)
    ]
    backoff = {m: round(b.until - now, 3) for m, b in core.backoff.items() if b.until > now}
    return PoolSnapshot(
        settings.max_workers,
        workers,
        len(core.queue),
        dict(core.counters),
        dict(core.reaps),
        list(core.readings),
        backoff,
        live_settings(core, settings),
        core.describe_keepalive(),
        core.waiting(),
    )


def live_settings(core: PoolCore, settings: Settings) -> dict[str, Any]:
    """What a simulator needs to predict this pool (``wanwu replay``)."""
    config = core.config
    return {
        "max_workers": config.capacity,
        "idle_ttl_s": config.default_ttl_s,
        "model_ttl_s": dict(config.model_ttl_s),
        "keepalive": config.keepalive,
        "queue_timeout_s": settings.queue_timeout_s,
        "queue_max": config.queue_max,
        "reap_interval_s": settings.reap_interval_s,
        "stem_cells": config.stem_cells,
        "batching": {
            model: {"max_batch_size": n, "max_wait_ms": wait * 1000} for model, (n, wait) in config.batching.items()
        },
        "interactive_reserve_s": config.interactive_reserve_s,
        "gpu_high_watermark": config.high_watermark,
        "gpu_low_watermark": config.low_watermark,
        "start_ms": dict(core.start_ms),  # the last start of each kind, as measured
    }


def readiness(
    backend: Backend, catalog: ModelCatalog, settings: Settings, closing: bool
) -> dict[str, tuple[bool, str]]:
    """The backend's checks, the default model's bundle, and whether the pool is open."""
    checks = backend.readiness() if isinstance(backend, ReportsReadiness) else {}
    try:
        model = catalog.get(settings.default_model)
        checks["model"] = (True, f"{model.name} ({model.path})")
    except WanwuError as exc:
        checks["model"] = (False, str(exc))
    checks["pool"] = (not closing, "shutting down" if closing else "accepting requests")
    return checks


def runtime_settings(settings: Settings, ttl_overrides: Mapping[str, float]) -> dict[str, Any]:
    """What ``WarmPool.reconfigure`` can change, as it is now."""
    return {
        "max_workers": settings.max_workers,
        "idle_ttl_s": settings.idle_ttl_s,
        "keepalive": settings.keepalive,
        "stem_cells": settings.stem_cells,
        "model_ttl_s": dict(sorted(ttl_overrides.items())),
    }
