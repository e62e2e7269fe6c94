"""The pool survives a restart of the Docker engine: its event watcher reconnects,
reconciles with the container list, and the next request gets a fresh worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dockerutil import wait_for
from tests.images import demo_images
from tests.integration.pools import PoolFactory

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]


def restart_engine() -> None:
    """Stop dockerd and bring it back with the project's own helper (or systemd)."""
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "restart", "docker"], check=True, timeout=120)
        return
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    subprocess.run(["bash", str(ROOT / "deploy" / "ensure-docker.sh")], check=True, timeout=180)


@pytest.mark.parametrize("pools", ["docker"], indirect=True)
def test_pool_survives_an_engine_restart(pools: PoolFactory) -> None:
    pool = pools()
    label, image = next(iter(demo_images(seed=77).items()))
    first = pool.predict("demo-shapes", image)
    restart_engine()
    wait_for(lambda: pool.snapshot().workers == [], 60, "the pool to forget workers the restart killed", interval=0.2)
    answer = pool.predict("demo-shapes", image)
    assert answer.cold_start and answer.worker_id != first.worker_id
    assert answer.predictions[0]["label"] == label
    assert [w.worker_id for w in pools.running(pool, all=True)] == [answer.worker_id]
