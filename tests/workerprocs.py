"""What the process backend really runs, read from /proc (the `docker ps` of process
workers): every process whose environment names a wanwu pool and worker; who each runs
as; and what a root gateway's workers (uid 10001) need to be able to read in a test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
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


def process_ids(pid: int) -> tuple[int, int, list[int]]:
    """The real uid, real gid and supplementary groups of ``pid`` (/proc/PID/status)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]), [int(g) for g in fields["Groups"].split()]


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def run_as(pid: int, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` run with the uid, gid and groups ``pid`` has: what that process may do."""
    uid, gid, groups = process_ids(pid)
    return subprocess.run(
        list(command), user=uid, group=gid, extra_groups=groups, capture_output=True, text=True, check=False
    )


def open_directory(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may search (mode 0755), for what a
    root gateway's workers (uid 10001) must read: pytest's own tmp_path is under a 0700
    directory of root's. The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def seed_general(models_dir: Path, bundles: tuple[Path, Path]) -> None:
    """Put the general model and its embedding model (the session's ``general_bundles``)
    into ``models_dir``, so a process-backend gateway whose default model is general
    does not make them itself at start (its builder: 15 s of CPU a gateway). A test of
    that making leaves them out."""
    for bundle in bundles:
        shutil.copytree(bundle, models_dir / bundle.name)


def python_for_workers(where: Path) -> str:
    """An interpreter with this one's packages that uid 10001 can run: this one if it
    can, else a venv in ``where`` over the system's interpreter of the same version with
    this one's site-packages added (this machine's Python may live under /root, mode 0700).
    Skips the test when there is none."""
    import pytest

    from scheduler.backends.base import WORKER_UID, access_problem

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("workers run as uid 10001 only under a root gateway with setpriv")
    base = Path(sys.base_prefix)
    if all(access_problem(p, WORKER_UID, WORKER_UID) is None for p in (Path(sys.executable), base)):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists() or access_problem(system, WORKER_UID, WORKER_UID) is not None:
        pytest.skip(f"no {version} that uid {WORKER_UID} can run")
    venv = where / "venv"
    subprocess.run([str(system), "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    ours = sysconfig.get_paths()["purelib"]
    problem = access_problem(Path(ours), WORKER_UID, WORKER_UID)
    if problem:
        pytest.skip(f"this interpreter's packages are closed to uid {WORKER_UID}: {problem}")
    site = venv / "lib" / version / "site-packages"
    (site / "host-packages.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return str(venv / "bin" / "python")
