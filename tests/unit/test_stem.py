"""Stem cells: the worker's /load (in-process, real torch), the core's rules, the shell."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from wanwu_worker.server import WorkerServer
from wanwu_worker.stem import Stem

from scheduler.core import CoreConfig, Fail, Grant, LoadWorker, PoolCore, SpawnWorker, StopWorker
from scheduler.errors import ModelUnavailable, WorkerStartError
from scheduler.events import (
    Arrive,
    Close,
    Configure,
    Died,
    Expire,
    Ready,
    Released,
    StartFailed,
    StopAll,
    Stopped,
    Tick,
)
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import STEM, State
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from scheduler.worker_client import WorkerClient
from tests.images import demo_images
from tests.unit.conftest import serving
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle
from tests.unit.test_server import raw_request

# -- the worker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_root(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_bundle, root / "demo-shapes")
    broken = root / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "model.pt").write_bytes(b"not a TorchScript archive")
    return root


@pytest.fixture
def stem_server(models_root: Path, tmp_path: Path) -> Iterator[WorkerServer]:
    stem = Stem(models_root, device="cpu")
    with serving(WorkerServer(str(tmp_path / "worker.sock"), None, max_body=200_000, stem=stem)) as srv:
        yield srv


@pytest.fixture
def client(stem_server: WorkerServer) -> Iterator[WorkerClient]:
    c = WorkerClient(stem_server.final_path, worker_id="stem", timeout=30)
    yield c
    c.close()


IMAGE = next(iter(demo_images(seed=5).values()))


def test_a_stem_cell_answers_health_but_no_predictions(client: WorkerClient, stem_server: WorkerServer) -> None:
    health = client.health()
    assert health["status"] == "stem" and health["model"] is None and health["device"] == "cpu"
    assert health["onnxruntime"] is True  # primed while it waits
    status, _, body = raw_request(stem_server.final_path, "POST", "/predict", IMAGE)
    assert status == 409 and json.loads(body)["error"]["code"] == "not_loaded"


def test_load_turns_it_into_a_worker_of_that_model(client: WorkerClient) -> None:
    loaded = client.load("demo-shapes", timeout=60)
    assert loaded["status"] == "ready" and loaded["model"] == "demo-shapes"
    assert set(loaded["timing_ms"]) == {"load", "warmup", "total"}
    assert client.health()["model"] == "demo-shapes"
    answer = client.predict(IMAGE, top_k=2)
    assert len(answer.predictions) == 2
    with pytest.raises(WorkerStartError, match="already_loaded: this worker already serves demo-shapes"):
        client.load("demo-shapes", timeout=60)


def test_a_bundle_that_fails_to_load_breaks_the_stem_cell(client: WorkerClient, stem_server: WorkerServer) -> None:
    with pytest.raises(WorkerStartError, match=r"could not load broken: bad_bundle: .*model\.pt"):
        client.load("broken", timeout=60)
    assert client.health()["status"] == "broken"
    with pytest.raises(WorkerStartError, match="broken: an earlier load failed"):
        client.load("demo-shapes", timeout=60)  # never reused half-loaded


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "../etc"}', 400, "bad_model"),
        (b'{"model": ""}', 400, "bad_request"),
        (b"[1, 2]", 400, "bad_request"),
        (b"not json", 400, "bad_request"),
        (b'{"model": "missing"}', 422, "bad_bundle"),
    ],
)
def test_bad_load_requests_get_json_errors(stem_server: WorkerServer, body: bytes, status: int, code: str) -> None:
    got, _, payload = raw_request(stem_server.final_path, "POST", "/load", body, {"Content-Type": "application/json"})
    assert (got, json.loads(payload)["error"]["code"]) == (status, code)


# -- the core ----------------------------------------------------------------------------

CONFIG = CoreConfig(capacity=2, default_ttl_s=30, stem_cells=1, queue_max=8)


def core(**changes: object) -> PoolCore:
    return PoolCore(replace(CONFIG, **changes), id_prefix="w")  # type: ignore[arg-type]


def ready_stem(pool: PoolCore, now: float = 0.0) -> str:
    (spawn,) = pool.handle(Tick(now))
    assert isinstance(spawn, SpawnWorker) and spawn.model == STEM and spawn.request_id is None
    assert pool.handle(Ready(spawn.worker_id, now + 1, 1000.0)) == []
    return spawn.worker_id


def test_a_miss_loads_the_model_into_a_stem_cell_and_a_replacement_starts() -> None:
    pool = core(capacity=3)
    stem = ready_stem(pool)
    load, replacement = pool.handle(Arrive(1, "a", 2.0, 12.0))
    assert load == LoadWorker(stem, "a", 1)
    assert isinstance(replacement, SpawnWorker) and replacement.model == STEM
    (grant,) = pool.handle(Ready(stem, 2.2, 200.0, {"load": 150.0, "warmup": 40.0}))
    assert isinstance(grant, Grant) and grant.cold_start and grant.start == "stem" and grant.spawn_ms == 200.0
    assert pool.counters["stem_starts"] == 1 and pool.counters["cold_starts"] == 1
    assert pool.workers[stem].model == "a"


def test_stem_cells_count_in_n_and_go_first_when_a_slot_is_needed() -> None:
    pool = core(capacity=2)
    stem = ready_stem(pool)
    pool.handle(Arrive(1, "a", 2.0, 12.0))  # a takes the stem cell; one slot left for a new stem
    pool.handle(Ready(stem, 2.2, 200.0))
    new_stem = next(w for w in pool.workers.values() if w.model == STEM)
    pool.handle(Ready(new_stem.id, 3.0, 1000.0))
    pool.handle(Released(stem, 3.1))
    assert len(pool.workers) == 2
    (load,) = pool.handle(Arrive(2, "b", 4.0, 14.0))  # b adopts the new stem; no room for another
    assert load == LoadWorker(new_stem.id, "b", 2) and len(pool.workers) == 2
    pool.handle(Ready(new_stem.id, 4.2, 200.0))
    pool.handle(Released(new_stem.id, 4.3))
    (spawn,) = pool.handle(Arrive(3, "c", 5.0, 15.0))  # full, no stem: evict the LRU idle (a)
    assert isinstance(spawn, SpawnWorker) and spawn.evict == (stem,)


def test_an_idle_stem_cell_is_evicted_before_any_model_worker() -> None:
    pool = core(capacity=2, stem_models=frozenset({"a"}))  # b is not in the models directory
    spawn, stem_spawn = pool.handle(Arrive(1, "a", 0.0, 10.0))  # no stem yet: a container, and a stem in the spare slot
    assert spawn.model == "a" and isinstance(stem_spawn, SpawnWorker) and stem_spawn.model == STEM
    pool.handle(Ready(spawn.worker_id, 1.0, 1000.0))
    pool.handle(Released(spawn.worker_id, 1.5))  # a idle since 1.5: older than the stem
    pool.handle(Ready(stem_spawn.worker_id, 2.0, 1000.0))
    (evicting,) = pool.handle(Arrive(2, "b", 3.0, 13.0))
    assert isinstance(evicting, SpawnWorker) and evicting.evict == (stem_spawn.worker_id,)


def test_a_model_that_fails_to_load_stops_the_stem_cell_and_gets_a_container_instead() -> None:
    pool = core(capacity=3)
    stem = ready_stem(pool)
    pool.handle(Arrive(1, "a", 2.0, 12.0))
    error = WorkerStartError("stem cell w0001 could not load a: bad_bundle: model.pt is broken")
    commands = pool.handle(StartFailed(stem, 2.5, error))
    assert commands[0] == StopWorker(stem, "a", "load_failed")
    (spawn,) = [c for c in commands if isinstance(c, SpawnWorker) and c.model == "a"]
    assert spawn.request_id == 1 and not any(isinstance(c, Fail) for c in commands)  # it waits on
    assert pool.workers[stem].state is State.STOPPING and pool.reaps["load_failed"] == 1
    container_error = WorkerStartError("worker exited with status 2 while starting: not a loadable TorchScript")
    assert Fail(1, container_error) in pool.handle(
        StartFailed(spawn.worker_id, 3.0, container_error)
    )  # broken after all
    (fail,) = [c for c in pool.handle(Arrive(2, "a", 3.1, 13.1)) if isinstance(c, Fail)]
    assert isinstance(fail.error, ModelUnavailable)  # backs off like any failed start
    assert pool.counters["load_failures"] == 1 and pool.counters["spawn_failures"] == 1


def test_stem_cells_are_not_reaped_by_ttl_but_are_stopped_on_shutdown() -> None:
    pool = core()
    stem = ready_stem(pool)
    assert pool.handle(Tick(10_000.0)) == [] and pool.next_wakeup() is None
    pool.handle(Close(10_001.0))
    assert pool.handle(StopAll(10_001.0)) == [StopWorker(stem, STEM, "shutdown", 10_000.0)]


def test_models_a_stem_cell_cannot_see_start_their_own_container() -> None:
    pool = core(capacity=3, stem_models=frozenset({"a"}))
    ready_stem(pool)
    (spawn,) = pool.handle(Arrive(1, "linked", 2.0, 12.0))
    assert isinstance(spawn, SpawnWorker) and spawn.model == "linked"


def test_no_stem_cells_when_turned_off() -> None:
    pool = core(stem_cells=0)
    assert pool.handle(Tick(0.0)) == []


# -- the live shell over the fake backend ---------------------------------------------------------


def test_the_pool_serves_a_miss_from_a_stem_cell_and_never_exceeds_n(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_bundle(tmp_path, name)
    backend, clock = FakeBackend(), FakeClock()
    settings = Settings(models_dir=tmp_path, max_workers=2, stem_cells=1)
    pool = WarmPool(backend, ModelCatalog(tmp_path, clock=clock), settings, clock, GpuMonitor(()), INLINE)
    pool.start(background=False)
    assert [r.model for r in backend.spawns] == [STEM] and backend.spawns[0].model_dir == tmp_path
    first = pool.predict("a", b"x")
    assert first.cold_start and first.start == "stem" and first.timing_ms["spawn_load"] == 1.0
    assert backend.loads == [(first.worker_id, "a")]
    assert [r.model for r in backend.spawns] == [STEM, STEM]  # the replacement
    second = pool.predict("b", b"y")
    assert second.start == "stem" and backend.peak == 2
    assert pool.predict("a", b"z").start == "warm"
    pool.shutdown(grace_s=0)
    assert backend.live == {}


def test_a_failed_load_in_the_pool_is_the_error_a_failed_start_gives(tmp_path: Path) -> None:
    make_bundle(tmp_path, "a")
    backend, clock = FakeBackend(), FakeClock()
    settings = Settings(models_dir=tmp_path, max_workers=2, stem_cells=1)
    pool = WarmPool(backend, ModelCatalog(tmp_path, clock=clock), settings, clock, GpuMonitor(()), INLINE)
    pool.start(background=False)
    stem = backend.spawns[0].worker_id
    backend.fail_next_spawns("a", 2)  # the load into the stem cell, then the container started instead
    with pytest.raises(WorkerStartError, match="bundle is broken"):
        pool.predict("a", b"x")
    assert stem in backend.stops and pool.snapshot().reaps["load_failed"] == 1
    assert [r.model for r in backend.spawns].count("a") == 1  # one container was tried
    pool.shutdown(grace_s=0)


def test_doctor_says_when_stem_cells_cannot_read_the_models_directory(tmp_path: Path) -> None:
    from gateway.doctor import _stem_cells
    from scheduler.backends.docker import DockerBackend

    backend = DockerBackend("wanwu-worker:cpu", "p", tmp_path)  # contacts no engine
    tmp_path.chmod(0o700)
    check = _stem_cells(backend, tmp_path)
    assert not check.ok and f"chmod o+x {tmp_path}" in check.fix
    tmp_path.chmod(0o755)
    assert _stem_cells(backend, tmp_path).ok


def test_a_stem_cell_still_starting_keeps_its_slot_until_it_is_up_then_goes_first() -> None:
    # Stopping a container while another thread still creates it could leave N + 1
    # containers for a moment (the hypothesis machine found that): it is evicted once up.
    pool = core(capacity=1, stem_models=frozenset())
    (stem,) = pool.handle(Tick(0.0))
    assert pool.handle(Arrive(1, "linked", 0.5, 10.5)) == []
    (spawn,) = pool.handle(Ready(stem.worker_id, 1.0, 1000.0))
    assert isinstance(spawn, SpawnWorker) and spawn.model == "linked" and spawn.evict == (stem.worker_id,)


def test_a_request_joins_a_load_nobody_waits_for_instead_of_taking_another_stem_cell() -> None:
    pool = core(capacity=4, stem_cells=2)
    first, second = pool.handle(Tick(0.0))
    pool.handle(Ready(first.worker_id, 1.0, 1000.0))
    pool.handle(Ready(second.worker_id, 1.0, 1000.0))
    (load,) = [c for c in pool.handle(Arrive(1, "a", 2.0, 2.1)) if isinstance(c, LoadWorker)]
    pool.handle(Expire(1, 2.1))
    assert [c for c in pool.handle(Arrive(2, "a", 2.2, 12.2)) if isinstance(c, LoadWorker)] == []  # it joins that load
    (grant,) = pool.handle(Ready(load.worker_id, 2.4, 200.0))[:1]
    assert isinstance(grant, Grant) and grant.request_id == 2 and grant.start == "stem"


def test_a_stem_cell_that_dies_waiting_backs_off_the_next_one() -> None:
    pool = core()
    stem = ready_stem(pool)
    assert pool.handle(Died(stem, 5.0, "exit 139")) == [StopWorker(stem, STEM, "crashed", 4.0)]
    assert pool.handle(Stopped(stem, 5.1)) == []  # no replacement during the backoff
    assert pool.backoff[STEM].failures == 1 and pool.counters["spawn_failures"] == 1
    (replacement,) = pool.handle(Tick(6.5))
    assert isinstance(replacement, SpawnWorker) and replacement.model == STEM


def test_configure_keeps_stem_cells_off_the_ttl_and_trims_them_to_the_new_count() -> None:
    pool = core(capacity=4, stem_cells=2)
    for spawn in pool.handle(Tick(0.0)):
        pool.handle(Ready(spawn.worker_id, 1.0, 1000.0))
    assert pool.handle(Configure(replace(CONFIG, capacity=4, stem_cells=2, default_ttl_s=5), 2.0)) == []
    assert pool.next_wakeup() is None and pool.handle(Tick(100.0)) == []  # still no TTL for stem cells
    (trimmed,) = pool.handle(Configure(replace(CONFIG, capacity=4, stem_cells=1), 101.0))
    assert isinstance(trimmed, StopWorker) and trimmed.model == STEM and trimmed.reason == "evicted"
