"""A real fake backend and a tick-able clock for pool tests."""

from __future__ import annotations

import collections
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask
from wanwu_worker.bundle import labels_digest

from scheduler.backends.base import ManagedWorker, SpawnRequest, Started
from scheduler.errors import WanwuError, WorkerCrashed, WorkerRejected, WorkerStartError, WorkerTimeout
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from scheduler.worker_client import Scores, WorkerAnswer, WorkerBatchAnswer


class FakeClock:
    """Time moves only when told; waiting for an unset event moves it to the deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if not event.is_set() and timeout > 0:
            self.t += timeout
        return event.is_set()


def fake_logit(label: str) -> float:
    """The raw score a fake worker gives ``label``: fixed per label, different between labels."""
    return float(sum(map(ord, label)) % 97) / 10


def fake_scores(scores: Scores | None) -> dict[str, Any]:
    """A fake worker's raw scores for the labels asked, tagged as a real worker tags them."""
    if scores is None:
        return {}
    return {"logits": [fake_logit(label) for label in scores.labels], "logits_of": labels_digest(scores.labels)}


def fake_embedding(image: bytes) -> dict[str, Any]:
    """A fake embedding model's answer (models named embed*): a unit vector from the bytes."""
    raw = [float(len(image) % 7 + 1), float(sum(image[:64]) % 5 + 1), 1.0]
    norm = sum(v * v for v in raw) ** 0.5
    return {"embedding": [v / norm for v in raw], "dim": 3}


class FakeConnection:
    def __init__(self, backend: FakeBackend, worker_id: str, model: str) -> None:
        self.backend, self.worker_id, self.model = backend, worker_id, model
        self.calls = 0
        self.batches: list[int] = []  # images in each predict_batch call
        self.seen: list[bytes] = []  # every image sent, in order
        self.scores: list[Scores | None] = []  # the raw scores each call asked for
        self.closed = False

    def predict(
        self, image: bytes, top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerAnswer:
        self.calls += 1
        self.scores.append(scores)
        self.seen.append(image)
        outcome = self.backend.next_outcome(self.worker_id, self.model)
        if outcome == "crash":
            raise WorkerCrashed(f"worker {self.worker_id} dropped the connection", self.worker_id)
        if outcome == "timeout":
            raise WorkerTimeout(f"worker {self.worker_id} did not answer", self.worker_id)
        if outcome == "reject":
            raise WorkerRejected("not an image", 400, "not_an_image", self.worker_id)
        if self.model.startswith("embed"):
            return WorkerAnswer([], {"inference": 1.0, "total": 2.0}, 2.5, fake_embedding(image))
        fixed = self.backend.answers.get(self.model)
        if fixed is not None:
            extra = {**{key: value for key, value in fixed.items() if key != "predictions"}, **fake_scores(scores)}
            return WorkerAnswer(fixed["predictions"][:top_k], {"inference": 1.0, "total": 2.0}, 2.5, extra)
        return WorkerAnswer(
            [{"label": f"{self.model}:{image.decode(errors='replace')}", "score": 1.0}],
            {"inference": 1.0, "total": 2.0},
            2.5,
            fake_scores(scores),
        )

    def predict_batch(
        self, images: list[bytes], top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerBatchAnswer:
        """One call for several images: an image ``bad`` gets its own error entry."""
        self.calls += 1
        self.scores.append(scores)
        self.batches.append(len(images))
        self.seen.extend(images)
        if self.backend.on_batch is not None:
            self.backend.on_batch(self.worker_id, images)
        outcome = self.backend.next_outcome(self.worker_id, self.model)
        if outcome == "crash":
            raise WorkerCrashed(f"worker {self.worker_id} dropped the connection", self.worker_id)
        if outcome == "timeout":
            raise WorkerTimeout(f"worker {self.worker_id} did not answer", self.worker_id)
        results: list[dict[str, Any]] = [
            {"error": {"code": "not_an_image", "message": "not an image"}}
            if image == b"bad"
            else fake_embedding(image)
            if self.model.startswith("embed")
            else {**self.backend.answers[self.model], **fake_scores(scores)}
            if self.model in self.backend.answers
            else {
                "predictions": [
                    {"label": f"{self.model}:{image.decode(errors='replace')}", "score": 1.0},
                    {"label": "other", "score": 0.0},
                ][:top_k],
                **fake_scores(scores),
            }
            for image in images
        ]
        return WorkerBatchAnswer(results, {"inference": 1.0, "total": 2.0, "batch": len(images)}, 2.5)

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        return {"status": "ready", "model": self.model}

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    """Records spawns and stops, tracks the most containers alive at once, and can be
    told to fail spawns, to make workers crash or hang, and what GPU memory to report."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spawns: list[SpawnRequest] = []
        self.stops: list[str] = []
        self.live: dict[str, SpawnRequest] = {}
        self.peak = 0
        self.spawn_failures: dict[str, collections.deque[WanwuError]] = collections.defaultdict(collections.deque)
        self.outcomes: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.gpu_mb: dict[str, float] = {}
        self.orphans: list[str] = []
        self.on_stop: Callable[[str], None] | None = None
        self.on_spawn: Callable[[SpawnRequest], None] | None = None
        self.on_batch: Callable[[str, list[bytes]], None] | None = None  # called as a batch call starts
        # A model's fixed answer for every image (predictions, groups), in place of the default.
        self.answers: dict[str, dict[str, Any]] = {}
        self.connections: dict[str, FakeConnection] = {}
        self.loads: list[tuple[str, str]] = []  # (stem cell, model) loads asked for
        self.checked: list[tuple[Path, str | None]] = []  # bundle checks asked for
        self.check_reports: collections.deque[dict[str, Any]] = collections.deque()

    def fail_next_spawns(self, model: str, count: int = 1, error: WanwuError | None = None) -> None:
        for _ in range(count):
            self.spawn_failures[model].append(
                error or WorkerStartError(f"{model}: bundle is broken; last log lines: ...")
            )

    def next_outcome(self, worker_id: str, model: str) -> str:
        with self.lock:
            for key in (worker_id, model):
                if self.outcomes[key]:
                    return self.outcomes[key].popleft()
        return "ok"

    def spawn(self, request: SpawnRequest) -> Started:
        if self.on_spawn:
            self.on_spawn(request)
        with self.lock:
            self.spawns.append(request)
            if self.spawn_failures[request.model]:
                raise self.spawn_failures[request.model].popleft()
            self.live[request.worker_id] = request
            self.peak = max(self.peak, len(self.live))
        return Started(
            request.worker_id, {"gpu_memory_mb": self.gpu_mb.get(request.model)}, {"create": 1.0, "ready": 2.0}
        )

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        """A stem cell loads ``model_dir``: fails as told for that model, like a spawn."""
        model = model_dir.name
        with self.lock:
            self.loads.append((worker_id, model))
            if self.spawn_failures[model]:
                raise self.spawn_failures[model].popleft()
            self.live[worker_id] = SpawnRequest(worker_id, model, model_dir)
        if worker_id in self.connections:
            self.connections[worker_id].model = model
        return Started(worker_id, {"gpu_memory_mb": self.gpu_mb.get(model)}, {"load": 1.0, "warmup": 1.0})

    def stop(self, worker_id: str) -> None:
        if self.on_stop:
            self.on_stop(worker_id)
        with self.lock:
            self.stops.append(worker_id)
            self.live.pop(worker_id, None)

    def list_workers(self) -> list[ManagedWorker]:
        with self.lock:
            return [ManagedWorker(w, r.model, True) for w, r in self.live.items()]

    def remove_orphans(self) -> list[str]:
        removed, self.orphans = self.orphans, []
        return removed

    def connect(self, worker_id: str, timeout: float) -> FakeConnection:
        connection = FakeConnection(self, worker_id, self.live[worker_id].model)
        self.connections[worker_id] = connection
        return connection

    def watch(
        self, on_exit: Callable[[str, str], None], on_reconnect: Callable[[], None], stop: threading.Event
    ) -> None:
        stop.wait()

    def ping(self) -> None:
        pass

    def stem_problem(self, models_dir: Path) -> str | None:
        return None

    def readiness(self) -> dict[str, tuple[bool, str]]:
        return {"backend": (True, "fake")}

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """What a worker's ``check`` of a bundle would print: ``check_reports`` holds
        the next reports to give, else an ``ok`` one for the bundle's name."""
        self.checked.append((bundle_dir, device))
        if self.check_reports:
            return self.check_reports.popleft()
        return {"ok": True, "name": bundle_dir.name, "outputs": 2, "labels": 2, "gpu_memory_mb": None}

    def close(self) -> None:
        pass


class CoreBackend:
    """Only what every backend does (``scheduler.backends.base.Backend``), over a
    FakeBackend (``fake``, which records as ever): no orphan removal, no readiness
    checks of its own, no bundle tools, no remote GPUs."""

    def __init__(self, fake: FakeBackend | None = None) -> None:
        self.fake = fake or FakeBackend()

    def spawn(self, request: SpawnRequest) -> Started:
        return self.fake.spawn(request)

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        return self.fake.load(worker_id, model_dir, timeout)

    def stop(self, worker_id: str) -> None:
        self.fake.stop(worker_id)

    def list_workers(self) -> list[ManagedWorker]:
        return self.fake.list_workers()

    def connect(self, worker_id: str, timeout: float) -> FakeConnection:
        return self.fake.connect(worker_id, timeout)

    def watch(
        self, on_exit: Callable[[str, str], None], on_reconnect: Callable[[], None], stop: threading.Event
    ) -> None:
        self.fake.watch(on_exit, on_reconnect, stop)

    def ping(self) -> None:
        self.fake.ping()

    def stem_problem(self, models_dir: Path) -> str | None:
        return self.fake.stem_problem(models_dir)

    def close(self) -> None:
        self.fake.close()


def make_bundle(
    models_dir: Path,
    name: str,
    gpu_memory_mb: int = 0,
    idle_ttl_s: float | None = None,
    batching: dict[str, float] | None = None,
    labels: tuple[str, ...] = ("a", "b"),
    **extra: Any,
) -> Path:
    """A bundle directory the catalog accepts (the model file is never loaded here);
    ``extra`` goes into model.json (task, subsets, cpu_fallback...)."""
    path = models_dir / name
    path.mkdir(parents=True)
    config: dict[str, Any] = {
        "name": name,
        "format": "torchscript",
        "task": "classify",
        "input_size": [3, 8, 8],
        "resize": 8,
        "mean": [0, 0, 0],
        "std": [1, 1, 1],
        "gpu_memory_mb": gpu_memory_mb,
    }
    if idle_ttl_s is not None:
        config["idle_ttl_s"] = idle_ttl_s
    if batching is not None:
        config["batching"] = batching
    config.update(extra)
    (path / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (path / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    (path / "model.pt").write_bytes(b"")
    return path


@contextlib.contextmanager
def fake_gateway(backend: FakeBackend, settings: Settings) -> Iterator[Flask]:
    """The Flask app over a pool on ``backend`` (fake clock, calls inline), serving the
    bundles in ``settings.models_dir``; the pool is shut down afterwards."""
    from gateway.app import create_app

    clock = FakeClock()
    catalog = ModelCatalog(settings.models_dir, clock=clock)
    pool = WarmPool(backend, catalog, settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE)
    pool.start(background=False)
    try:
        yield create_app(settings, pool, {"TESTING": True})
    finally:
        pool.shutdown(grace_s=0)
