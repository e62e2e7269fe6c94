"""Run workers as local child processes: for machines without a Docker engine, such as a
GPU box where containers are not allowed, or a laptop.

Each worker is ``python -m wanwu_worker serve`` from ``WANWU_WORKER_PYTHON`` (default:
the gateway's own interpreter) in its own session and process group. The pool's
directory ``socket_root/<pool id>`` (the gateway's, checked like the Docker backend's)
holds, per worker, a directory ``<worker id>/`` of the worker's own (its Unix socket, its
HOME) and, beside it and out of the worker's reach, its log ``<worker id>.log`` and a
record ``<worker id>.json`` (pid, the process's start time and the boot id). Stopping
sends SIGTERM to the group, then SIGKILL after a grace period. A watcher reports exits as
the Docker backend reports container deaths. At start, workers an earlier run of the same
pool id left behind are found through their records and killed; a pid is killed only if
the process still has the recorded start time, so a reused pid is never hit.

Who a worker runs as: under a root gateway, uid and gid 10001 (the worker image's user)
with no other groups and no_new_privs, switched by ``setpriv`` after joining its cgroups;
the interpreter, the worker package and the bundles must be readable by that uid, and no
bundle (nor the models directory) writable by it: a worker that could change a bundle is
not started. Under any other user, the workers run as that user (it cannot switch). Either
way a worker gets a clean environment (``kept_environment``): never the gateway's
settings or secrets.

This is NOT container isolation. Workers see the host's files (what their uid may read)
and network and share its kernel namespaces; workers of one gateway share one uid, so they
can reach each other. Limits come from a cgroup where the host allows one, else RLIMIT_AS
for CPU workers (``limits.py``). GPUs are given with CUDA_VISIBLE_DEVICES; a worker
without a device sees none.

Its parts: ``process_user.py`` (who a worker runs as, its environment, what it may
touch), ``process_files.py`` (each worker's record and log) and ``process_tools.py``
(the readiness probe and the bundle tools, with the worker interpreter).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wanwu_worker import contract

from ..errors import BackendUnavailable, WorkerStartError, WorkerStartTimeout
from ..worker_client import WorkerClient
from .base import (
    ExitCallback,
    ManagedWorker,
    SpawnRequest,
    Started,
    load_model,
    prepare_private_dir,
    wait_ready,
)
from .limits import Cgroups, DropTo, ProcessLimits, process_start_time, wrapper
from .process_files import Child, ProcessFiles, Record
from .process_tools import ProcessTools
from .process_user import default_worker_uid, setpriv

log = logging.getLogger(__name__)

SOCKET = "worker.sock"


class ProcessBackend(ProcessTools, ProcessFiles):
    """Workers as child processes of the gateway. See the module docstring for what it
    does and what it does not isolate."""

    def __init__(
        self,
        pool_id: str,
        socket_root: Path,
        python: str = "",
        limits: ProcessLimits | None = None,
        spawn_timeout_s: float = 60.0,
        environment: dict[str, str] | None = None,
        stop_grace_s: float = 2.0,
        cgroups: Cgroups | None = None,
        worker_uid: int | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self.pool_id = pool_id
        self.models_dir = models_dir  # as configured (unresolved): checked read-only to workers too
        self.root = socket_root / pool_id
        # Absolute: workers start in their own directory, where a relative path fails.
        found = shutil.which(python or sys.executable)
        self.python = os.path.abspath(found) if found else (python or sys.executable)
        self.limits = limits or ProcessLimits()
        self.spawn_timeout_s = spawn_timeout_s
        self.environment = environment or {}
        self.stop_grace_s = stop_grace_s
        self.cgroups = cgroups if cgroups is not None else Cgroups(pool_id)
        # Workers run as worker_uid (default: default_worker_uid); another uid than the
        # gateway's is switched to with setpriv, and its gid is the same number.
        euid = os.geteuid()
        self.worker_uid = default_worker_uid(euid) if worker_uid is None else worker_uid
        self.drop = None if self.worker_uid == euid else DropTo(self.worker_uid, self.worker_uid, setpriv())
        # The worker must pass through the socket root and the pool's directory to its own.
        self.dir_mode = 0o700 if self.drop is None else 0o711
        self._children: dict[str, Child] = {}
        self._lock = threading.Lock()
        self._probe: tuple[bool, str] | None = None
        self._probe_lock = threading.Lock()
        self._closed = False
        log.info("process workers: %s; %s", self.describe_user(), self.cgroups.describe(self.limits))

    # -- starting --------------------------------------------------------------------

    def ping(self) -> None:
        """Raise BackendUnavailable unless the worker interpreter can be run, the socket
        directory is this user's and private, and (under root) the worker's uid can run
        the interpreter and reach its socket directory."""
        python = shutil.which(self.python)
        if python is None or not os.access(python, os.X_OK):
            raise BackendUnavailable(f"the worker interpreter {self.python} (WANWU_WORKER_PYTHON) is not executable")
        self._prepare_root()
        problem = self._user_problem()
        if problem:
            raise BackendUnavailable(problem)

    def _prepare_root(self) -> None:
        prepare_private_dir(self.root.parent, self.dir_mode)
        prepare_private_dir(self.root, self.dir_mode, adjust=True)

    def _environment(self, request: SpawnRequest, directory: Path) -> dict[str, str]:
        env = self._base_environment(str(directory) if self.drop else None)
        env.update(self.environment)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                contract.SOCKET: str(directory / SOCKET),
                contract.POOL_ID: self.pool_id,
                contract.WORKER_ID: request.worker_id,
                "CUDA_VISIBLE_DEVICES": request.device or "",
            }
        )
        if request.stem:
            env.update({contract.STEM: "1", contract.MODELS_ROOT: str(request.model_dir)})
        else:
            env[contract.MODEL_DIR] = str(request.model_dir)
        return env

    def spawn(self, request: SpawnRequest) -> Started:
        self._prepare_root()
        problem = self._bundle_problem(request.model_dir, request.stem)
        if problem:
            message = f"worker {request.worker_id} (model {request.model}) not started: {problem}"
            raise WorkerStartError(message, request.worker_id)
        directory = self.root / request.worker_id
        self._clear(request.worker_id)
        directory.mkdir(mode=0o700)
        if self.drop is not None:  # made by root in root's directory: no link can be in the way
            os.chown(directory, self.drop.uid, self.drop.gid)
        started = time.monotonic()
        try:
            groups = self.cgroups.create(request.worker_id, self.limits)
        except OSError as exc:
            self._clear(request.worker_id)
            message = f"cannot make the cgroup of worker {request.worker_id}: {exc}"
            raise WorkerStartError(message, request.worker_id) from exc
        # RLIMIT_AS only where no cgroup bounds memory, and never under CUDA (see limits.py).
        bounded = "memory" in self.cgroups.bases
        address_space = self.limits.memory_bytes if not bounded and not request.device else None
        command = [*wrapper(groups, address_space, self.drop), self.python, "-m", "wanwu_worker", "serve"]
        try:
            with self._open_private(self._log(request.worker_id), os.O_APPEND) as output, self._lock:
                # Started and registered in one step: a stop() from the pool (a shutdown
                # while this worker starts) finds it and kills it.
                process = subprocess.Popen(
                    command,
                    env=self._environment(request, directory),
                    cwd=directory,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop and orphan cleanup kill the group
                )
                child = Child(request.worker_id, request.model, process, directory, groups)
                self._children[request.worker_id] = child
        except OSError as exc:
            self.cgroups.remove(groups)
            self._clear(request.worker_id)
            raise WorkerStartError(
                f"cannot start worker {request.worker_id} with {self.python}: {exc}", request.worker_id
            ) from exc
        try:
            self._write_record(child)
        except OSError as exc:
            self.stop(request.worker_id)
            raise WorkerStartError(f"cannot record worker {request.worker_id}: {exc}", request.worker_id) from exc
        created = time.monotonic()
        health = self._wait_ready(child, started + self.spawn_timeout_s)
        return Started(
            request.worker_id,
            health,
            {"create": round((created - started) * 1000, 3), "ready": round((time.monotonic() - created) * 1000, 3)},
        )

    def _wait_ready(self, child: Child, deadline: float) -> dict[str, Any]:
        def check(now: float) -> None:
            status = child.process.poll()
            if status is not None:
                logs = self._logs(self._log(child.worker_id))
                why = self._exit_reason(child, status)
                self.stop(child.worker_id)
                raise WorkerStartError(
                    f"worker {child.worker_id} (model {child.model}, {self.python}) {why} while starting; "
                    f"last log lines:\n{logs}",
                    child.worker_id,
                )
            if now >= deadline:
                logs = self._logs(self._log(child.worker_id))
                self.stop(child.worker_id)
                raise WorkerStartTimeout(
                    f"worker {child.worker_id} (model {child.model}, {self.python}) was not ready within "
                    f"{self.spawn_timeout_s:g} s; last log lines:\n{logs}",
                    child.worker_id,
                )

        return wait_ready(child.directory / SOCKET, child.worker_id, deadline, check)

    def _exit_reason(self, child: Child, status: int) -> str:
        if status >= 0:
            return f"exited with status {status}"
        try:
            name = signal.Signals(-status).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-status}"
        if -status == signal.SIGKILL and self.cgroups.oom_killed(child.cgroups):
            return f"was killed by {name} (out of memory)"
        return f"was killed by {name}"

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        return load_model(self.connect(worker_id, timeout), worker_id, model_dir, timeout)

    # -- stopping and finding --------------------------------------------------------

    def stop(self, worker_id: str) -> None:
        """SIGTERM to the worker's process group, SIGKILL after the grace period; then
        its cgroups and directory go. Idempotent."""
        with self._lock:
            child = self._children.pop(worker_id, None)
            if child is not None:
                child.stopping = True
        if child is not None:
            self._terminate(child.process)
            self.cgroups.kill_members(child.cgroups)
            self.cgroups.remove(child.cgroups)
            with self._lock:
                last = self._closed and not self._children
            if last:
                self.cgroups.close()
        else:
            record = self._read_record(worker_id)
            if record is not None:
                self._kill_record(record)
        self._clear(worker_id)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        # Signals go to the group only while its leader is unreaped, so its pid (the
        # group id) cannot have been reused by then.
        group = process.pid  # start_new_session: the group has the worker's pid
        if process.poll() is not None:
            return
        _signal_group(group, signal.SIGTERM)
        _signal_group(group, signal.SIGCONT)  # a stopped worker must run to see SIGTERM
        try:
            process.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d ignored SIGTERM for %g s; killing it", group, self.stop_grace_s)
            _signal_group(group, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def _kill_record(self, record: Record) -> None:
        """Kill a worker this backend did not start (an earlier run's), if the recorded
        process is still the same one, and wait until it is gone."""
        if record.alive():
            _signal_group(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_start_time(record.pid) == record.start_time and time.monotonic() < deadline:
                time.sleep(0.01)  # its parent (init) reaps it; a zombie counts as gone
        self.cgroups.kill_members(record.cgroups)
        self.cgroups.remove(record.cgroups)

    def list_workers(self) -> list[ManagedWorker]:
        with self._lock:
            children = list(self._children.values())
        workers = [ManagedWorker(c.worker_id, c.model, c.process.poll() is None) for c in children]
        known = {c.worker_id for c in children}
        for worker_id in self._found():
            if worker_id not in known:
                record = self._read_record(worker_id)
                if record is not None:
                    workers.append(ManagedWorker(record.worker_id, record.model, record.alive()))
        return workers

    def remove_orphans(self) -> list[str]:
        """Kill every worker an earlier run of this pool id left, and clear its files."""
        removed = []
        with self._lock:
            known = set(self._children)
        for worker_id in self._found():
            if worker_id in known:
                continue
            record = self._read_record(worker_id)
            if record is not None:
                self._kill_record(record)
                removed.append(record.worker_id)
            self._clear(worker_id)
        self.cgroups.remove_leftovers()
        return removed

    def connect(self, worker_id: str, timeout: float) -> WorkerClient:
        return WorkerClient(str(self.root / worker_id / SOCKET), worker_id, timeout)

    def watch(self, on_exit: ExitCallback, on_reconnect: Callable[[], None], stop: threading.Event) -> None:
        """Report workers that exit on their own (not those being stopped), every 20 ms.
        There is no engine to lose, so ``on_reconnect`` is never called."""
        while not stop.wait(0.02):
            with self._lock:
                children = [c for c in self._children.values() if not c.stopping and not c.reported]
            for child in children:
                try:
                    self._check_exit(child, on_exit)
                except Exception:  # the watcher must outlive any one failure
                    log.exception("watching worker %s failed", child.worker_id)

    def _check_exit(self, child: Child, on_exit: ExitCallback) -> None:
        status = child.process.poll()
        if status is None or child.stopping:
            return
        child.reported = True
        why = self._exit_reason(child, status)
        # The log goes when the pool stops the dead worker: say it now.
        tail = self._logs(self._log(child.worker_id), 5)
        log.warning("worker %s (model %s) %s; last log lines:\n%s", child.worker_id, child.model, why, tail)
        on_exit(child.worker_id, "killed: out of memory" if "out of memory" in why else why)

    def close(self) -> None:
        """Remove the pool's cgroup directories once no worker is left in them: now, or
        when the pool's shutdown has stopped the last one."""
        with self._lock:
            self._closed = True
            left = bool(self._children)
        if not left:
            self.cgroups.close()


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)
