"""Prometheus metrics. Request metrics are recorded in one place, ``Metrics.record``,
as each request finishes, from the ``RequestRecord`` its route filled in; pool state
(workers, reaps, GPU memory, queue depth) is read from the pool when scraped, so it is
never stale. Each app has its own registry (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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


@dataclass
class RequestRecord:
    """What one request did, as the routes learn it: what ``Metrics.record`` counts and
    the access log writes when the request finishes."""

    request_id: str
    started: float  # time.perf_counter() at arrival
    arrived: float  # time.time() at arrival
    model: str | None = None  # the model the request named, as it named it
    label: str | None = None  # the metrics label of a prediction: its model once known to exist, else "-"
    batch: bool = False  # a predict:batch or embed:batch request
    cached: bool | None = None  # answered from the result cache
    cold_start: bool | None = None
    start: str | None = None  # how the worker that answered started
    timing: dict[str, float] | None = None  # the pool's timing of a worker's answer (ms)
    total_ms: float | None = None  # the answer's timing_ms.total
    images: list[str] = field(default_factory=list)  # a batch's images: "ok" or each one's error code
    error: str | None = None  # the code of the error answered
    refused: bool = False  # the client already had client_max_requests in flight (429)
    settings_changed: list[str] = field(default_factory=list)  # settings a PATCH changed

    @property
    def counted(self) -> bool:
        """A prediction request: counted in ``wanwu_requests`` however it ended."""
        return self.label is not None


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

    def record(self, rec: RequestRecord, status: int) -> None:
        """Count a finished request: the one place request metrics are recorded."""
        if rec.refused:
            self.client_refused.inc()
        for key in rec.settings_changed:
            self.settings_changes.labels(key).inc()
        if rec.label is None:
            return
        model = rec.label
        self.requests.labels(model, "ok" if status < 400 else rec.error or str(status)).inc()
        for outcome in rec.images:
            self.batch_images.labels(model, outcome).inc()
        if status >= 400:
            return
        if rec.cached:
            self.cache_hits.labels(model).inc()
        elif rec.timing is not None and not rec.batch:
            self._served(model, rec.timing, bool(rec.cold_start), rec.start)
        if rec.total_ms is not None:
            self.total.labels(model).observe(rec.total_ms / 1000)

    def _served(self, model: str, timing: dict[str, float], cold: bool, start: str | None) -> None:
        """A worker's answer to a single request: how its worker was had and how long it took."""
        (self.cold_starts if cold else self.warm_hits).labels(model).inc()
        if start == "stem":
            self.stem_starts.labels(model).inc()
        self.queue.labels(model).observe(timing["queue"] / 1000)
        if cold:
            self.spawn.labels(model).observe(timing["spawn"] / 1000)
        self.inference.labels(model).observe(timing["worker"] / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
