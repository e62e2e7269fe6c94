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
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, ConfigError, ImageBuildError, WorkerStartError, WorkerStartTimeout
from ..worker_client import WorkerClient
from .base import (
    BUILDER,
    WORKER_UID,
    ExitCallback,
    ManagedWorker,
    SpawnRequest,
    Started,
    access_problem,
    check_report,
    load_model,
    permits,
    prepare_private_dir,
    wait_ready,
    writable_path,
)
from .limits import Cgroups, DropTo, ProcessLimits, boot_id, is_same_process, process_start_time, wrapper

log = logging.getLogger(__name__)

RECORD = ".json"  # <worker id>.json beside the worker's directory
LEGACY_RECORD = "worker.json"  # inside it, as earlier versions kept it
# The built-in bundles, each pair made by one command of the worker interpreter (a
# classify bundle and its embed bundle, in that order) and how long that takes here.
BUILTIN_MODELS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("general", "general-embed"): (BUILDER, "about 40 s"),
    ("demo-shapes", "demo-shapes-embed"): (
        ("-m", "wanwu_worker.demo.train", "--seed", "0", "--eval-seed", "1"),
        "about a minute",
    ),
}
LOG = ".log"  # <worker id>.log beside the worker's directory
SOCKET = "worker.sock"
# What a worker keeps of the gateway's environment: where programs, libraries and Python
# packages are, the locale, and GPU and thread knobs. Nothing else: not the gateway's
# settings (WANWU_*, the admin token among them) nor whatever credentials it was given.
KEPT_NAMES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})
KEPT_PREFIXES = ("LC_", "PYTHON", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "PYTORCH_", "TORCH_")


@dataclass
class _Child:
    worker_id: str
    model: str
    process: subprocess.Popen[bytes]
    directory: Path
    cgroups: list[Path]
    stopping: bool = False
    reported: bool = False


@dataclass(frozen=True)
class _Record:
    """What ``worker.json`` says about a worker, for finding it again after a restart."""

    worker_id: str
    model: str
    pid: int
    start_time: int
    boot_id: str
    cgroups: list[Path] = field(default_factory=list)

    def alive(self) -> bool:
        return is_same_process(self.pid, self.start_time, self.boot_id)


def kept_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a worker is given (see KEPT_NAMES and KEPT_PREFIXES)."""
    return {key: value for key, value in environ.items() if key in KEPT_NAMES or key.startswith(KEPT_PREFIXES)}


def default_worker_uid(euid: int) -> int:
    """Who a gateway running as ``euid`` runs workers as: uid 10001 (the worker image's
    user) if it is root, else itself (an unprivileged process cannot switch users)."""
    return WORKER_UID if euid == 0 else euid


def parse_worker_user(text: str) -> int | None:
    """``WANWU_WORKER_USER``: a uid, ``gateway`` (the gateway's own uid: root's, under
    root), or empty for ``default_worker_uid``'s choice (None)."""
    text = text.strip()
    if not text:
        return None
    if text == "gateway":
        return os.geteuid()
    if text.isdigit():
        return int(text)
    raise ConfigError(f"WANWU_WORKER_USER={text!r}: expected a uid, gateway, or nothing (uid 10001 under root)")


def worker_package_root() -> Path:
    """The directory that holds the ``wanwu_worker`` package (put on the worker's
    PYTHONPATH, so an interpreter without wanwu installed can run it)."""
    spec = importlib.util.find_spec("wanwu_worker")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the wanwu_worker package is not importable by the gateway")
    return Path(next(iter(spec.submodule_search_locations))).parent


class ProcessBackend:
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
        self.drop = None if self.worker_uid == euid else DropTo(self.worker_uid, self.worker_uid, _setpriv())
        # The worker must pass through the socket root and the pool's directory to its own.
        self.dir_mode = 0o700 if self.drop is None else 0o711
        self._children: dict[str, _Child] = {}
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

    def describe_user(self) -> str:
        if self.drop is None:
            return f"workers run as the gateway's own user (uid {self.worker_uid}): not separated from it"
        return f"workers run as uid {self.drop.uid}, gid {self.drop.gid} (the gateway is root)"

    def _prepare_root(self) -> None:
        prepare_private_dir(self.root.parent, self.dir_mode)
        prepare_private_dir(self.root, self.dir_mode, adjust=True)

    def _user_problem(self) -> str | None:
        """Why workers cannot run as ``worker_uid`` here, or None."""
        if self.drop is None:
            return None
        uid, gid = self.drop.uid, self.drop.gid
        if os.geteuid() != 0:
            return f"workers can run as uid {uid} only under a root gateway; this one runs as uid {os.geteuid()}"
        if shutil.which(self.drop.setpriv) is None:
            return f"starting workers as uid {uid} needs setpriv (util-linux), which is not installed"
        python = Path(os.path.abspath(shutil.which(self.python) or self.python))
        needed = [python, worker_package_root()]
        config = python.parent.parent / "pyvenv.cfg"  # a venv: its base interpreter's files too
        with contextlib.suppress(OSError, ValueError):
            home = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line)
            needed.append(Path(home["home"].strip()) if "home" in home else python.parent)
        for path in needed:
            problem = access_problem(path, uid, gid)
            if problem:
                return (
                    f"uid {uid} (the workers' user under a root gateway) cannot run the worker interpreter "
                    f"{self.python} (WANWU_WORKER_PYTHON): {problem}; install one where uid {uid} can read it"
                )
        # The root gateway imports the same worker package: if a worker could change it, or
        # the interpreter's directory, it could run code as root.
        package = worker_package_root() / "wanwu_worker"
        try:
            writable = writable_path(package, uid, gid) or next(
                (p for p in (python, python.parent) if permits(os.stat(p), uid, gid, os.W_OK)), None
            )
        except (OSError, ValueError) as exc:
            return f"cannot check that uid {uid} cannot change {package} and {python}: {exc}"
        if writable is not None:
            return f"uid {uid} (the workers' user) could change {writable}, which a root gateway runs: chmod go-w"
        # Made and checked for this user by ping(); `wanwu doctor` only looks.
        problem = access_problem(self.root.parent, uid, gid, os.X_OK) if self.root.parent.exists() else None
        if problem:
            return (
                f"uid {uid} (the workers' user) cannot reach the socket directory {self.root.parent}: {problem}; "
                "set WANWU_SOCKET_DIR under directories others may search (e.g. /run/wanwu)"
            )
        return None

    def _bundle_problem(self, model_dir: Path, stem: bool) -> str | None:
        """Why a worker (as ``worker_uid``) may not be given ``model_dir``: it cannot read
        it, or it could change it or the models directory; None when it may."""
        if self.drop is None:
            return None
        uid, gid = self.drop.uid, self.drop.gid
        problem = access_problem(model_dir, uid, gid)
        if problem:
            what = "the models directory" if stem else "its bundle"
            return f"uid {uid} (the workers' user) cannot read {what}: {problem}"
        models_dir = model_dir if stem else model_dir.parent
        try:
            # The models directory as named too: a bundle's name may be a link into another.
            listed = [models_dir] if self.models_dir is None else [self.models_dir, models_dir]
            open_dir = next((d for d in listed if permits(os.stat(d), uid, gid, os.W_OK)), None)
            writable = open_dir if open_dir is not None else writable_path(model_dir, uid, gid)
        except (OSError, ValueError) as exc:
            return f"cannot check {models_dir}: {exc}"
        if writable is not None:
            return (
                f"uid {uid} (the workers' user) could change {writable}: bundles and the models directory must be "
                f"read-only to workers (owned by root, chmod go-w)"
            )
        return None

    def _base_environment(self, home: str | None = None) -> dict[str, str]:
        """What every run of the worker interpreter gets: ``kept_environment`` of the
        gateway's, the worker package first on PYTHONPATH, no GPU unless one is given
        (like a container without a device request), and ``home`` as HOME if given."""
        env = kept_environment(os.environ)
        if home is not None:
            env["HOME"] = home
        if self.drop is not None:
            # No per-user site-packages under the shared uid's HOME (/tmp for a probe):
            # anyone could plant a usercustomize.py there and run code in every worker.
            env["PYTHONNOUSERSITE"] = "1"
        path = [str(worker_package_root()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        env["CUDA_VISIBLE_DEVICES"] = ""
        # CUDA's default order is fastest first; NVML's, Docker's and WANWU_GPUS' is the bus.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def _environment(self, request: SpawnRequest, directory: Path) -> dict[str, str]:
        env = self._base_environment(str(directory) if self.drop else None)
        env.update(self.environment)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "WANWU_SOCKET": str(directory / SOCKET),
                "WANWU_POOL_ID": self.pool_id,
                "WANWU_WORKER_ID": request.worker_id,
                "CUDA_VISIBLE_DEVICES": request.device or "",
            }
        )
        if request.stem:
            env.update({"WANWU_STEM": "1", "WANWU_MODELS_ROOT": str(request.model_dir)})
        else:
            env["WANWU_MODEL_DIR"] = str(request.model_dir)
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
                child = _Child(request.worker_id, request.model, process, directory, groups)
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

    def _write_record(self, child: _Child) -> None:
        start_time = process_start_time(child.process.pid)
        record = {
            "worker_id": child.worker_id,
            "model": child.model,
            "pool_id": self.pool_id,
            "pid": child.process.pid,
            "start_time": start_time if start_time is not None else -1,
            "boot_id": boot_id(),
            "cgroups": [str(path) for path in child.cgroups],
            "python": self.python,
        }
        partial = self.root / f"{child.worker_id}{RECORD}.new"
        with self._open_private(partial, os.O_TRUNC) as handle:
            handle.write((json.dumps(record) + "\n").encode())
        partial.replace(self._record(child.worker_id))

    def _record(self, worker_id: str) -> Path:
        return self.root / f"{worker_id}{RECORD}"

    def _log(self, worker_id: str) -> Path:
        return self.root / f"{worker_id}{LOG}"

    @staticmethod
    def _open_private(path: Path, flags: int) -> Any:
        """``path`` opened to write (made mode 0600 if missing), never through a link."""
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o600), "ab")

    def _clear(self, worker_id: str) -> None:
        """Remove the worker's directory, record and log."""
        shutil.rmtree(self.root / worker_id, ignore_errors=True)  # fd-based: a link in it is not followed
        for path in (self._record(worker_id), self.root / f"{worker_id}{RECORD}.new", self._log(worker_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _wait_ready(self, child: _Child, deadline: float) -> dict[str, Any]:
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

    def _exit_reason(self, child: _Child, status: int) -> str:
        if status >= 0:
            return f"exited with status {status}"
        try:
            name = signal.Signals(-status).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-status}"
        if -status == signal.SIGKILL and self.cgroups.oom_killed(child.cgroups):
            return f"was killed by {name} (out of memory)"
        return f"was killed by {name}"

    @staticmethod
    def _logs(path: Path, lines: int = 20) -> str:
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                tail = handle.read().decode("utf-8", "replace").rstrip().splitlines()[-lines:]
        except OSError as exc:
            return f"(logs unavailable: {exc.strerror or exc})"
        return "\n".join(tail) or "(no output)"

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

    def _kill_record(self, record: _Record) -> None:
        """Kill a worker this backend did not start (an earlier run's), if the recorded
        process is still the same one, and wait until it is gone."""
        if record.alive():
            _signal_group(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while process_start_time(record.pid) == record.start_time and time.monotonic() < deadline:
                time.sleep(0.01)  # its parent (init) reaps it; a zombie counts as gone
        self.cgroups.kill_members(record.cgroups)
        self.cgroups.remove(record.cgroups)

    def _read_record(self, worker_id: str) -> _Record | None:
        """The worker's record; one an earlier version kept inside the worker's directory
        counts only if that directory is this user's (a worker's own directory may hold
        anything the worker wrote there)."""
        path = self._record(worker_id)
        if not path.exists():
            legacy = self.root / worker_id
            with contextlib.suppress(OSError):
                info = legacy.lstat()
                if legacy.is_dir() and not legacy.is_symlink() and info.st_uid == os.geteuid():
                    path = legacy / LEGACY_RECORD
        try:
            data = json.loads(path.read_text())
            return _Record(
                str(data["worker_id"]),
                str(data["model"]),
                int(data["pid"]),
                int(data["start_time"]),
                str(data["boot_id"]),
                [Path(p) for p in data.get("cgroups", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _found(self) -> list[str]:
        """The worker ids the pool's directory holds anything of."""
        names = [entry.name for entry in self.root.iterdir()] if self.root.is_dir() else []
        for suffix in (f"{RECORD}.new", RECORD, LOG):
            names = [name.removesuffix(suffix) for name in names]
        return sorted(set(names))

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

    def _check_exit(self, child: _Child, on_exit: ExitCallback) -> None:
        status = child.process.poll()
        if status is None or child.stopping:
            return
        child.reported = True
        why = self._exit_reason(child, status)
        # The log goes when the pool stops the dead worker: say it now.
        tail = self._logs(self._log(child.worker_id), 5)
        log.warning("worker %s (model %s) %s; last log lines:\n%s", child.worker_id, child.model, why, tail)
        on_exit(child.worker_id, "killed: out of memory" if "out of memory" in why else why)

    # -- checks ----------------------------------------------------------------------

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Whether the worker interpreter runs the worker package with torch as the
        workers' user (checked once: it imports torch), who that is, and which limits
        apply."""
        with self._probe_lock:  # one probe at a time; a failure is tried again next time
            probe = self._probe or self._run_probe()
            if probe[0]:
                self._probe = probe
        problem = self._user_problem()
        user = (False, problem) if problem else (True, self.describe_user())
        return {"worker_python": probe, "worker_user": user, "limits": (True, self.cgroups.describe(self.limits))}

    def _run_probe(self) -> tuple[bool, str]:
        problem = self._user_problem()
        if problem:
            return False, problem
        script = (
            "import json, torch, wanwu_worker; "
            "print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.device_count()]))"
        )
        env = self._base_environment("/tmp" if self.drop else None)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        try:
            result = subprocess.run(
                [*wrapper([], None, self.drop), self.python, "-c", script],
                env=env,
                cwd="/" if self.drop else None,  # the gateway's may be closed to the worker's uid
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"cannot run {self.python}: {exc}"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return False, f"{self.python} cannot run the worker: {last}"
        version, cuda, gpus = json.loads(result.stdout.strip().splitlines()[-1])
        build = f"CUDA {cuda}, {gpus} GPU(s) visible" if cuda else "CPU build"
        return True, f"{self.python}: torch {version} ({build})"

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Make a built-in bundle and its companion in ``models_dir`` with the worker
        interpreter: ``general`` and ``general-embed`` exported from the weights package,
        or ``demo-shapes`` and ``demo-shapes-embed`` trained (once per models directory).
        Each appears whole or not at all."""
        pair = next((models for models in BUILTIN_MODELS if name in models), None)
        if pair is None:
            raise ImageBuildError(f"model {name!r} is not built in; put its bundle in {models_dir}")
        command, duration = BUILTIN_MODELS[pair]
        models_dir.mkdir(parents=True, exist_ok=True)
        partial = {model: models_dir / f".{model}.partial" for model in pair}
        for path in partial.values():
            shutil.rmtree(path, ignore_errors=True)
        log.info("making %s in %s with %s (%s)", " and ".join(pair), models_dir, self.python, duration)
        classify, embed = (str(partial[model]) for model in pair)
        try:
            # run() kills the builder on any exception, SystemExit from a SIGTERM included
            result = subprocess.run(
                [self.python, *command, "--out", classify, "--embed-out", embed],
                env=self._base_environment(),
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure: str | None = str(exc)
        except BaseException:  # interrupted (the gateway told to stop): leave nothing half-made
            for path in partial.values():
                shutil.rmtree(path, ignore_errors=True)
            raise
        else:
            failure = None if result.returncode == 0 else "\n".join(result.stderr.strip().splitlines()[-5:])
        if failure is not None:
            for path in partial.values():
                shutil.rmtree(path, ignore_errors=True)
            raise ImageBuildError(f"making {' and '.join(pair)} with {self.python} failed:\n{failure}")
        for model, path in partial.items():
            target = models_dir / model
            if target.exists():  # one of the two was there already: keep it
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.replace(target)
        return models_dir / name

    def stem_problem(self, models_dir: Path) -> str | None:
        if self.drop is None:
            return None  # workers run as the gateway's user: they read what it reads
        problem = access_problem(models_dir, self.drop.uid, self.drop.gid)
        return f"stem cells (uid {self.drop.uid}) cannot read the models directory: {problem}" if problem else None

    def build_bundle(self, arguments: list[str], out_dir: Path, timeout: float) -> None:
        """Run the bundle builder with the worker interpreter."""
        try:
            result = subprocess.run(
                [self.python, *BUILDER, *arguments],
                env=self._base_environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageBuildError(f"building a bundle with {self.python} failed: {exc}") from exc
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:]) or f"exit status {result.returncode}"
            raise ImageBuildError(f"building a bundle with {self.python} failed:\n{tail}")

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """Run the worker's ``check`` with the worker interpreter, as the workers' user
        (the bundle is not trusted yet), with a CPU worker's address-space limit (no
        cgroup: it is one short-lived process)."""
        problem = self._bundle_problem(bundle_dir.resolve(), stem=False)
        if problem:
            raise WorkerStartError(f"cannot check {bundle_dir}: {problem}", "bundle-check")
        env = {**self._base_environment("/tmp" if self.drop else None), **self.environment}
        env["CUDA_VISIBLE_DEVICES"] = device or ""
        limit = None if device else self.limits.memory_bytes
        command = [
            *wrapper([], limit, self.drop),
            self.python,
            "-m",
            "wanwu_worker",
            "--model",
            str(bundle_dir.resolve()),
            "check",
        ]
        try:
            result = subprocess.run(
                command,
                env=env,
                cwd="/" if self.drop else None,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WorkerStartError(f"checking {bundle_dir} with {self.python} failed: {exc}", "bundle-check") from exc
        return check_report(result.stdout, self.python, result.stderr)

    def close(self) -> None:
        """Remove the pool's cgroup directories once no worker is left in them: now, or
        when the pool's shutdown has stopped the last one."""
        with self._lock:
            self._closed = True
            left = bool(self._children)
        if not left:
            self.cgroups.close()


def _setpriv() -> str:
    return shutil.which("setpriv") or "setpriv"


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)
