"""Prometheus metrics. Request metrics are recorded as requests finish; pool state
(workers, reaps, GPU memory, queue depth) is read from the pool when scraped, so it is
never stale. Each app has its own registry (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.snapshot import PoolSnapshot

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PoolCollector(Collector):
    def __init__(self, snapshot: Callable[[], PoolSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        snap = self._snapshot()
        workers = GaugeMetricFamily("wanwu_workers", "Worker containers by model and state", labels=["model", "state"])
        counts: dict[tuple[str, str], int] = {}
        for worker in snap.workers:
            counts[(worker.model, worker.state)] = counts.get((worker.model, worker.state), 0) + 1
        for (model, state), count in sorted(counts.items()):
            workers.add_metric([model, state], count)
        yield workers
        yield GaugeMetricFamily("wanwu_pool_capacity", "Most worker containers at once", value=snap.capacity)
        live = snap.settings
        if "idle_ttl_s" in live:
            yield GaugeMetricFamily("wanwu_idle_ttl_seconds", "Default idle TTL now", value=live["idle_ttl_s"])
            yield GaugeMetricFamily("wanwu_stem_cells_target", "Stem cells to keep ready now", value=live["stem_cells"])
        yield GaugeMetricFamily("wanwu_queue_depth", "Requests waiting for a worker", value=snap.queue_depth)
        reaps = CounterMetricFamily("wanwu_reaps", "Workers stopped, by reason", labels=["reason"])
        for reason, count in sorted(snap.reaps.items()):
            reaps.add_metric([reason], count)
        yield reaps
        batches = CounterMetricFamily("wanwu_batches", "Worker calls that carried several requests (dynamic batching)")
        batches.add_metric([], snap.counters.get("batches", 0))
        yield batches
        batched = CounterMetricFamily("wanwu_batched_requests", "Requests served in those calls")
        batched.add_metric([], snap.counters.get("batched_requests", 0))
        yield batched
        failures = CounterMetricFamily("wanwu_spawn_failures", "Workers that failed to start")
        failures.add_metric([], snap.counters.get("spawn_failures", 0))
        yield failures
        used = GaugeMetricFamily("wanwu_gpu_memory_used_bytes", "GPU memory in use", labels=["device"])
        total = GaugeMetricFamily("wanwu_gpu_memory_total_bytes", "GPU memory in all", labels=["device"])
        for gpu in snap.gpus:
            used.add_metric([gpu.device], gpu.used_mb * 2**20)
            total.add_metric([gpu.device], gpu.total_mb * 2**20)
        yield used
        yield total


class Metrics:
    def __init__(self, snapshot: Callable[[], PoolSnapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wanwu_requests", "Prediction requests by model and outcome", ["model", "outcome"], registry=r
        )
        self.cold_starts = Counter(
            "wanwu_cold_starts", "Requests served by a newly started worker", ["model"], registry=r
        )
        self.stem_starts = Counter(
            "wanwu_stem_starts", "Cold starts served by a stem cell that loaded the model", ["model"], registry=r
        )
        self.warm_hits = Counter("wanwu_warm_hits", "Requests served by a warm worker", ["model"], registry=r)
        self.batch_images = Counter(
            "wanwu_batch_images", "Images sent to predict:batch by model and outcome", ["model", "outcome"], registry=r
        )
        self.cache_hits = Counter("wanwu_cache_hits", "Requests answered from the result cache", ["model"], registry=r)
        self.queue = Histogram(
            "wanwu_queue_seconds", "Time waiting for a worker", ["model"], buckets=BUCKETS, registry=r
        )
        self.spawn = Histogram(
            "wanwu_spawn_seconds", "Worker start time on cold starts", ["model"], buckets=BUCKETS, registry=r
        )
        self.inference = Histogram(
            "wanwu_inference_seconds",
            "Worker time (decode, preprocess, inference)",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.total = Histogram(
            "wanwu_request_seconds", "Whole request as the gateway saw it", ["model"], buckets=BUCKETS, registry=r
        )
        self.settings_changes = Counter(
            "wanwu_settings_changes",
            "Settings changed at run time (PATCH /v1/pool/settings), by setting",
            ["setting"],
            registry=r,
        )
        self.client_refused = Counter(
            "wanwu_client_requests_refused",
            "Requests refused (429) because their client had client_max_requests in flight",
            registry=r,
        )
        r.register(PoolCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)
