"""A replaced bundle is served as replaced: the catalog notices it by its digest, the
pool retires the workers of the old one (idle now, busy once done) and the result cache
never answers with the old bundle's results."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from scheduler.core import CoreConfig, Grant, PoolCore, SpawnWorker, StopWorker
from scheduler.events import Arrive, Ready, Released, Retire, Stopped
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import State
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.images import demo_images
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

IMAGE = next(iter(demo_images(seed=5).values()))


def replace_labels(bundle: Path, labels: tuple[str, ...]) -> None:
    """What ``wanwu bundle create --force`` does to a file: a new one renamed over it."""
    staged = bundle / ".labels.txt.new"
    staged.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    os.replace(staged, bundle / "labels.txt")


# -- the core ------------------------------------------------------------------------------


def test_retire_stops_idle_workers_now_and_busy_ones_when_their_request_is_done() -> None:
    core = PoolCore(CoreConfig(capacity=3, default_ttl_s=60), id_prefix="w")
    (spawn1,) = core.handle(Arrive(1, "m", 0.0, 10.0))
    core.handle(Ready(spawn1.worker_id, 0.0, 10.0))  # type: ignore[union-attr]
    core.handle(Released(spawn1.worker_id, 1.0))  # type: ignore[union-attr]
    (spawn2,) = core.handle(Arrive(2, "m", 1.0, 11.0))
    assert isinstance(spawn2, Grant)  # the idle one is reused: busy now
    (spawn3,) = core.handle(Arrive(3, "m", 1.0, 11.0))
    assert isinstance(spawn3, SpawnWorker)  # a second one is starting
    (other,) = core.handle(Arrive(4, "n", 1.0, 11.0))
    assert isinstance(other, SpawnWorker)

    commands = core.handle(Retire("m", 2.0))
    assert commands == []  # none of m's is idle: the busy and the starting one are marked
    assert core.workers[spawn1.worker_id].retired and core.workers[spawn3.worker_id].retired  # type: ignore[union-attr]
    assert not core.workers[other.worker_id].retired

    done = core.handle(Released(spawn1.worker_id, 3.0))  # type: ignore[union-attr]
    assert StopWorker(spawn1.worker_id, "m", "replaced", None) in done  # type: ignore[union-attr]
    # The starting one may hold the old bundle: it stops, and its request gets a fresh start.
    up = core.handle(Ready(spawn3.worker_id, 3.0, 10.0))  # type: ignore[union-attr]
    assert StopWorker(spawn3.worker_id, "m", "replaced", None) in up  # type: ignore[union-attr]
    assert not any(isinstance(c, Grant) for c in up)
    fresh = core.handle(Stopped(spawn1.worker_id, 3.5)) + core.handle(Stopped(spawn3.worker_id, 3.5))  # type: ignore[union-attr]
    (start,) = [c for c in fresh if isinstance(c, SpawnWorker)]
    assert start.request_id == 3 and start.model == "m"
    assert core.reaps["replaced"] == 2


def test_retire_stops_an_idle_worker_at_once_and_a_new_request_starts_a_new_one() -> None:
    core = PoolCore(CoreConfig(capacity=2, default_ttl_s=60), id_prefix="w")
    (spawn,) = core.handle(Arrive(1, "m", 0.0, 10.0))
    core.handle(Ready(spawn.worker_id, 0.0, 10.0))  # type: ignore[union-attr]
    core.handle(Released(spawn.worker_id, 1.0))  # type: ignore[union-attr]
    (stop,) = core.handle(Retire("m", 2.0))
    assert isinstance(stop, StopWorker) and stop.reason == "replaced" and stop.idle_s == 1.0
    assert core.workers[spawn.worker_id].state is State.STOPPING  # type: ignore[union-attr]
    (again,) = core.handle(Arrive(2, "m", 2.0, 12.0))
    assert isinstance(again, SpawnWorker) and again.worker_id != spawn.worker_id  # type: ignore[union-attr]


# -- the catalog -------------------------------------------------------------------------


def test_the_catalog_notices_a_replaced_bundle_by_its_digest_within_the_rescan_interval(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "m", labels=("cat", "dog"))
    clock = FakeClock()
    catalog = ModelCatalog(tmp_path, rescan_after_s=5.0, clock=clock)
    before, version = catalog.get("m"), catalog.version
    assert len(before.digest) == 32
    replace_labels(bundle, ("dog", "cat"))
    assert catalog.poll() is False and catalog.get("m").labels == ("cat", "dog")  # not yet: within the interval
    clock.advance(5.0)
    assert catalog.poll() is True
    after = catalog.get("m")
    assert after.labels == ("dog", "cat") and after.digest != before.digest and catalog.version == version + 1


def test_a_touched_but_unchanged_bundle_keeps_its_identity(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "m")
    clock = FakeClock()
    catalog = ModelCatalog(tmp_path, rescan_after_s=1.0, clock=clock)
    digest, version = catalog.get("m").digest, catalog.version
    replace_labels(bundle, ("a", "b"))  # same content, new inode and times
    clock.advance(1.0)
    catalog.poll()
    assert catalog.get("m").digest == digest and catalog.version == version


def test_a_change_to_the_model_file_alone_is_a_new_version(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "m")
    clock = FakeClock()
    catalog = ModelCatalog(tmp_path, rescan_after_s=1.0, clock=clock)
    digest = catalog.get("m").digest
    (bundle / "model.pt").write_bytes(b"other weights")
    clock.advance(1.0)
    catalog.poll()
    assert catalog.get("m").digest != digest


# -- the pool and the gateway --------------------------------------------------------------


def test_after_a_replacement_the_gateway_answers_from_a_new_worker_and_not_from_the_cache(tmp_path: Path) -> None:
    from gateway.app import create_app

    bundle = make_bundle(tmp_path, "m", labels=("cat", "dog"))
    backend = FakeBackend()
    backend.answers["m"] = {"predictions": [{"label": "cat", "score": 0.9}]}
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, max_workers=2, stem_cells=0, default_model="m")
    catalog = ModelCatalog(tmp_path, rescan_after_s=5.0, clock=clock)
    pool = WarmPool(backend, catalog, settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE)
    pool.start(background=False)
    try:
        client = create_app(settings, pool, {"TESTING": True}).test_client()

        def ask() -> dict[str, object]:
            answer = client.post("/predict", data={"image": (io.BytesIO(IMAGE), "x.png")})
            assert answer.status_code == 200, answer.get_data(as_text=True)
            body: dict[str, object] = answer.get_json()
            return body

        assert ask()["result"] == "cat"
        assert ask()["cached"] is True
        (old,) = backend.live
        replace_labels(bundle, ("dog", "cat"))
        backend.answers["m"] = {"predictions": [{"label": "dog", "score": 0.9}]}  # what the new bundle answers
        clock.advance(5.0)
        stopped = pool.reap()  # the reaper's pass: the catalog rescans, the pool retires
        assert (old, "replaced") in stopped and old not in backend.live
        fresh = ask()
        assert fresh["result"] == "dog" and fresh["cached"] is False and fresh["cold_start"] is True
        assert old not in backend.live and len(backend.live) == 1
        assert pool.snapshot().reaps["replaced"] == 1
    finally:
        pool.shutdown(grace_s=0)


def test_a_removed_bundle_retires_its_workers(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "m")
    backend = FakeBackend()
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, max_workers=2, stem_cells=0, default_model="m")
    pool = WarmPool(
        backend, ModelCatalog(tmp_path, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    try:
        pool.predict("m", IMAGE)
        (worker,) = backend.live
        config = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
        (bundle / "model.json").unlink()
        assert config["name"] == "m"
        clock.advance(10.0)
        assert (worker, "replaced") in pool.reap()
    finally:
        pool.shutdown(grace_s=0)


def test_a_change_in_a_subdirectory_or_a_hidden_file_is_a_new_version(tmp_path: Path) -> None:
    """An ONNX model's external weights may sit in a subdirectory or under a hidden name:
    the runtime reads them, so they are part of the bundle's identity."""
    bundle = make_bundle(tmp_path, "m")
    (bundle / "weights").mkdir()
    (bundle / "weights" / "w.bin").write_bytes(b"one")
    (bundle / ".w.bin").write_bytes(b"one")
    clock = FakeClock()
    catalog = ModelCatalog(tmp_path, rescan_after_s=1.0, clock=clock)
    seen = {catalog.get("m").digest}
    for changed in (bundle / "weights" / "w.bin", bundle / ".w.bin"):
        changed.write_bytes(b"two")
        clock.advance(1.0)
        catalog.poll()
        seen.add(catalog.get("m").digest)
    assert len(seen) == 3


def test_moving_bytes_between_files_changes_the_digest(tmp_path: Path) -> None:
    from wanwu_worker.bundle import bundle_digest

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "a.txt").write_bytes(b"p\nq")
    (a / "b.txt").write_bytes(b"r")
    (b / "a.txt").write_bytes(b"p\nq\0b.txt\0r")
    assert bundle_digest(a) != bundle_digest(b)
