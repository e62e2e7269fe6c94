"""The warm pool driving real workers through each backend: Docker containers and
local processes (the ``pools`` fixture runs every test once per backend)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from scheduler.errors import WorkerCrashed, WorkerStartError
from tests.dockerutil import IMAGE, wait_for
from tests.images import demo_images
from tests.integration.pools import PoolFactory, make_broken_bundle, make_garbage_bundle, white_png

pytestmark = pytest.mark.docker


def test_two_sequential_requests_create_one_container(pools: PoolFactory) -> None:
    pool = pools()
    label, image = next(iter(demo_images().items()))
    first = pool.predict("demo-shapes", image)
    second = pool.predict("demo-shapes", image)
    assert first.predictions[0]["label"] == second.predictions[0]["label"] == label
    assert first.cold_start and not second.cold_start
    assert len(pools.running(pool, all=True)) == 1
    assert first.timing_ms["spawn"] > 0 and second.timing_ms["spawn"] == 0


def test_a_miss_spawns_a_second_container(pools: PoolFactory) -> None:
    pool = pools()
    image = next(iter(demo_images().values()))
    pool.predict("demo-shapes", image)
    answer = pool.predict("demo-other", image)
    assert answer.cold_start
    assert sorted(w.model for w in pools.running(pool)) == ["demo-other", "demo-shapes"]


def test_concurrent_requests_never_exceed_n_containers(pools: PoolFactory) -> None:
    pool = pools(max_workers=2)
    images = list(demo_images(seed=4242).items())
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(len(pools.running(pool, all=True)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        model = ("demo-shapes", "demo-other")[i % 2]
        try:
            results[i] = pool.predict(model, images[i % len(images)][1]).predictions[0]["label"]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stop.set()
    watcher.join()
    assert not errors
    assert results == {i: images[i % len(images)][0] for i in range(6)}
    assert seen and max(seen) <= 2


def test_idle_workers_are_reaped_after_the_ttl(pools: PoolFactory) -> None:
    pool = pools(idle_ttl_s=2.0)  # long enough to see the worker before the reaper takes it, under load too
    pool.predict("demo-shapes", next(iter(demo_images().values())))
    assert len(pools.running(pool)) == 1
    # The worker is gone from the backend a moment before the pool hears its stop returned.
    wait_for(lambda: not pools.running(pool, all=True) and not pool.snapshot().workers, 15, "the idle worker to go")
    assert pool.snapshot().reaps["ttl"] == 1


def test_a_full_pool_evicts_an_idle_worker_of_another_model(pools: PoolFactory) -> None:
    pool = pools(max_workers=1)
    image = next(iter(demo_images().values()))
    pool.predict("demo-shapes", image)
    pool.predict("demo-other", image)
    assert [w.model for w in pools.running(pool, all=True)] == ["demo-other"]
    assert pool.snapshot().reaps["evicted"] == 1


HOLDER = """
import sys, time
from pathlib import Path
from scheduler.assembly import build_backend
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
models, sockets, pool_id, image, backend = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[6]
settings = Settings(
    backend=backend, models_dir=models, socket_dir=sockets, pool_id=pool_id, worker_image=image, stem_cells=0,
    worker_user="gateway" if backend == "process" else "",  # as PoolFactory.settings
)
pool = WarmPool(build_backend(settings), ModelCatalog(models), settings)
pool.start()
pool.predict("demo-shapes", Path(sys.argv[5]).read_bytes())
print("ready", flush=True)
time.sleep(600)
"""


def test_orphans_of_a_killed_process_are_removed_by_the_next_pool(pools: PoolFactory, tmp_path: Path) -> None:
    pool_id = "orph" + uuid.uuid4().hex[:6]
    picture = tmp_path / "a.png"
    picture.write_bytes(next(iter(demo_images().values())))
    arguments = [str(pools.models), str(pools.sockets), pool_id, IMAGE, str(picture), pools.backend]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *arguments],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        assert len(pools.running(pool_id)) == 1  # orphaned, still running
        pool = pools(pool_id=pool_id)
        assert pools.running(pool_id, all=True) == []
        assert pool.snapshot().workers == []
    finally:
        if holder.poll() is None:
            holder.kill()
        pools.remove_leftovers(pool_id)  # when an assertion above failed before the new pool cleaned up


@pytest.mark.parametrize("pools", ["process"], indirect=True)  # pid records are the process backend's
def test_an_orphan_record_whose_pid_was_reused_kills_nothing(pools: PoolFactory) -> None:
    """A worker record left by an earlier run names a pid that now belongs to another
    process: the next pool must not kill that process."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pool_id = "reuse" + uuid.uuid4().hex[:6]
        record_dir = pools.sockets / pool_id / "deadbeef"
        record_dir.mkdir(parents=True)
        start_time = int(Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        record = {"worker_id": "deadbeef", "model": "demo-shapes", "pid": bystander.pid, "boot_id": boot}
        (record_dir / "worker.json").write_text(json.dumps({**record, "start_time": start_time - 1}))
        pools(pool_id=pool_id)
        assert bystander.poll() is None, "a process with the recorded pid but another start time was killed"
        assert not record_dir.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_killing_a_worker_mid_request_still_answers(pools: PoolFactory) -> None:
    # The retry computes the slow picture from the start: a few seconds on one core, more on a
    # loaded machine, and this test is about the retry, not the timeout.
    pool = pools(max_workers=2, request_timeout_s=150.0)
    pool.predict("slow", demo_images()["红色圆形"])  # warm a worker (a dark picture: fast)
    answers: list[object] = []
    thread = threading.Thread(target=lambda: answers.append(pool.predict("slow", white_png())))
    thread.start()
    wait_for(lambda: any(w.state == "busy" for w in pool.snapshot().workers), 10, "the request to reach the worker")
    time.sleep(0.5)  # let the worker start computing
    (busy,) = [w for w in pool.snapshot().workers if w.state == "busy"]
    pools.kill(pool, busy.id)
    thread.join(300)
    assert answers, "the request was not answered"
    answer = answers[0]
    assert answer.attempts == 2 and answer.worker_id != busy.id  # type: ignore[attr-defined]
    assert answer.predictions[0]["label"] in ("亮", "暗")  # type: ignore[attr-defined]
    assert pool.snapshot().reaps["crashed"] == 1


def test_a_hung_worker_times_out_and_is_replaced(pools: PoolFactory) -> None:
    pool = pools(request_timeout_s=2.0)
    image = next(iter(demo_images().values()))
    first = pool.predict("demo-shapes", image).worker_id
    pools.freeze(pool, first)
    answer = pool.predict("demo-shapes", image)
    assert answer.attempts == 2 and answer.worker_id != first
    assert pool.snapshot().reaps["timeout"] == 1
    wait_for(lambda: first not in {w.worker_id for w in pools.running(pool, all=True)}, 15, "the hung worker to go")


def test_a_worker_stopped_from_outside_leaves_the_pool(pools: PoolFactory) -> None:
    pool = pools()
    worker = pool.predict("demo-shapes", next(iter(demo_images().values()))).worker_id
    pools.kill(pool, worker)
    wait_for(lambda: pool.snapshot().workers == [], 10, "the pool to notice the dead worker")
    assert pool.snapshot().reaps["crashed"] == 1
    wait_for(lambda: not pools.running(pool, all=True), 10, "the dead worker to be removed")


def test_shutdown_stops_every_worker(pools: PoolFactory) -> None:
    pool = pools(max_workers=2)
    image = next(iter(demo_images().values()))
    pool.predict("demo-shapes", image)
    pool.predict("demo-other", image)
    assert len(pools.running(pool)) == 2
    pool.shutdown(grace_s=1)
    assert pools.running(pool, all=True) == []
    assert pool.snapshot().workers == []


def test_a_broken_bundle_reports_its_logs_and_backs_off(pools: PoolFactory, models_dir: Path) -> None:
    broken = make_broken_bundle(models_dir, "broken")
    try:
        pool = pools()
        with pytest.raises(
            WorkerStartError,
            match=r"exited with status 2 while starting; last log lines:\n(.|\n)*not a loadable TorchScript",
        ):
            pool.predict("broken", b"x")
        from scheduler.errors import ModelUnavailable

        with pytest.raises(ModelUnavailable):
            pool.predict("broken", b"x")
        assert pool.snapshot().counters["spawn_failures"] == 1
    finally:
        shutil.rmtree(broken)


def test_garbage_from_real_workers_is_a_clean_error_and_leaves_the_pool_whole(
    pools: PoolFactory, models_dir: Path
) -> None:
    made = [make_garbage_bundle(models_dir, "nan-scores", "nan"), make_garbage_bundle(models_dir, "too-wide", "wide")]
    try:
        pool = pools(max_workers=2)
        image = next(iter(demo_images().values()))
        with pytest.raises(WorkerCrashed, match="NaN is not a number"):
            pool.predict("nan-scores", image)  # on one worker, then on another: both replaced
        with pytest.raises(WorkerCrashed, match="more than the 2097152 allowed"):
            pool.predict("too-wide", image)
        snapshot = pool.snapshot()
        assert snapshot.reaps["crashed"] == 4
        assert [w.id for w in snapshot.workers if w.state == "busy"] == []
        label, image = next(iter(demo_images().items()))
        answers = [pool.predict("demo-shapes", image), pool.predict("demo-other", image)]  # every slot serves
        assert [a.predictions[0]["label"] for a in answers] == [label, label]
        wait_for(lambda: len(pools.running(pool, all=True)) == 2, 15, "the replaced workers to be removed")
    finally:
        for bundle in made:
            shutil.rmtree(bundle)
