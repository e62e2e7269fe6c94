"""Stem cells with real workers on each backend: a miss is served by loading the model
into a worker that already has the runtime up."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import pytest

from scheduler.errors import ModelUnavailable, WorkerStartError
from scheduler.policy import STEM
from scheduler.pool import WarmPool
from tests.dockerutil import wait_for
from tests.images import demo_images
from tests.integration.pools import PoolFactory, make_broken_bundle

pytestmark = pytest.mark.docker


def ready_stems(pool: WarmPool) -> list[str]:
    return [w.id for w in pool.snapshot().workers if w.model == STEM and w.state == "idle"]


@contextmanager
def most_containers(pools: PoolFactory, pool: WarmPool) -> Iterator[list[int]]:
    """Watch `docker ps` for the pool every 20 ms; yields a list that ends up holding the
    largest count seen."""
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], len(pools.running(pool, all=True)))
            stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(5)


def test_a_miss_is_served_by_a_stem_cell_and_a_replacement_appears(pools: PoolFactory) -> None:
    pool = pools(max_workers=2, stem_cells=1)
    wait_for(lambda: ready_stems(pool), 60, "a stem cell to be ready")
    (stem,) = ready_stems(pool)
    label, image = next(iter(demo_images().items()))
    with most_containers(pools, pool) as peak:
        answer = pool.predict("demo-shapes", image)
        assert answer.worker_id == stem and answer.cold_start and answer.start == "stem"
        assert answer.predictions[0]["label"] == label
        assert {"spawn_load", "spawn_warmup"} <= set(answer.timing_ms)
        wait_for(lambda: ready_stems(pool), 60, "a replacement stem cell")
        assert pool.predict("demo-shapes", image).start == "warm"
    assert peak[0] == 2
    assert len(pools.running(pool)) == 2  # (labels are set at creation: the adopted one still says stem)
    assert sorted(w.model for w in pool.snapshot().workers) == [STEM, "demo-shapes"]
    assert pool.snapshot().counters["stem_starts"] == 1


def test_two_models_start_from_stem_cells_in_turn_within_n(pools: PoolFactory) -> None:
    pool = pools(max_workers=2, stem_cells=1)
    image = next(iter(demo_images().values()))
    with most_containers(pools, pool) as peak:
        wait_for(lambda: ready_stems(pool), 60, "a stem cell to be ready")
        assert pool.predict("demo-shapes", image).start == "stem"
        wait_for(lambda: ready_stems(pool), 60, "a replacement stem cell")
        assert pool.predict("demo-other", image).start == "stem"
        assert ready_stems(pool) == []  # no slot left for another
        assert pool.predict("demo-shapes", image).start == "warm"
    assert peak[0] <= 2


@pytest.mark.parametrize("pools", ["docker"], indirect=True)  # container hardening
def test_a_stem_cell_is_hardened_like_any_worker(pools: PoolFactory, docker_client: docker.DockerClient) -> None:
    pool = pools(max_workers=1, stem_cells=1)
    wait_for(lambda: ready_stems(pool), 60, "a stem cell to be ready")
    (row,) = docker_client.api.containers(filters={"label": f"wanwu.pool={pool.settings.pool_id}"})
    config = docker_client.api.inspect_container(row["Id"])
    host = config["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] > 0 and host["PidsLimit"] > 0 and config["Config"]["User"] == "10001:10001"
    mounts = {m["Destination"]: m for m in config["Mounts"]}
    assert mounts["/models"]["RW"] is False and "/model" not in mounts
    assert row["Labels"]["wanwu.stem"] == "true"


def test_a_stem_cell_told_to_load_a_broken_bundle_is_removed(pools: PoolFactory, models_dir: Path) -> None:
    broken = make_broken_bundle(models_dir, "broken-stem")
    try:
        pool = pools(max_workers=2, stem_cells=1)
        wait_for(lambda: ready_stems(pool), 60, "a stem cell to be ready")
        (stem,) = ready_stems(pool)
        # The load fails, the stem cell goes, a container is tried instead and fails the
        # way any start of a broken bundle fails: the request gets that error.
        with pytest.raises(
            WorkerStartError, match=r"exited with status 2 while starting; last log lines:\n(.|\n)*TorchScript"
        ):
            pool.predict("broken-stem", b"x")
        wait_for(
            lambda: stem not in {w.worker_id for w in pools.running(pool, all=True)},
            10,
            "the broken stem cell to be removed",
        )
        counters = pool.snapshot().counters
        assert pool.snapshot().reaps["load_failed"] == 1
        assert (counters["load_failures"], counters["spawn_failures"]) == (1, 1)
        with pytest.raises(ModelUnavailable):  # backs off like a container that failed to start
            pool.predict("broken-stem", b"x")
        image = next(iter(demo_images().values()))
        wait_for(lambda: ready_stems(pool), 60, "a new stem cell")
        assert pool.predict("demo-shapes", image).start == "stem"  # the replacement is sound
    finally:
        shutil.rmtree(broken)


def test_shutdown_removes_stem_cells(pools: PoolFactory) -> None:
    pool = pools(max_workers=2, stem_cells=2)
    wait_for(lambda: len(ready_stems(pool)) == 2, 90, "two stem cells to be ready")
    pool.shutdown(grace_s=1)
    assert pools.running(pool, all=True) == []
