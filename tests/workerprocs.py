"""What the process backend really runs, read from /proc (the `docker ps` of process
workers): every process whose environment names a wanwu pool and worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerProcess:
    pid: int
    pool_id: str
    worker_id: str
    model: str  # the bundle directory's name, or "(stem)"


def live_processes(field: str) -> Iterator[tuple[int, bytes]]:
    """Each live process (zombies are not) with its /proc/<pid>/``field`` (e.g.
    environ, cmdline); processes that vanish or cannot be read are left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / field).read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            yield int(entry.name), raw


def worker_processes(pool_id: str | None = None) -> list[WorkerProcess]:
    """Live worker processes of ``pool_id`` (any pool when None)."""
    found = []
    for pid, raw in live_processes("environ"):
        env = dict(item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0") if "=" in item)
        pool, worker = env.get("WANWU_POOL_ID"), env.get("WANWU_WORKER_ID")
        if not pool or not worker or (pool_id is not None and pool != pool_id):
            continue
        model = "(stem)" if env.get("WANWU_STEM") == "1" else Path(env.get("WANWU_MODEL_DIR", "?")).name
        found.append(WorkerProcess(pid, pool, worker, model))
    return sorted(found, key=lambda w: w.worker_id)


def signal_worker(pool_id: str, worker_id: str, signum: signal.Signals) -> None:
    (process,) = [w for w in worker_processes(pool_id) if w.worker_id == worker_id]
    os.killpg(process.pid, signum)


def kill_all(pool_id: str | None = None) -> list[WorkerProcess]:
    """SIGKILL every worker process of ``pool_id`` (teardown after a failed test)."""
    left = worker_processes(pool_id)
    for process in left:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left
