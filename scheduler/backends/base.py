"""The backend seam, in the pool's words.

``Backend`` is what every backend does: spawn a worker (or a stem cell, and turn a stem
cell into a worker with ``load``), stop it, list what it manages, say how to reach a
worker (``connect``), report workers that die (``watch``), say whether its engine
answers (``ping``) and whether stem cells could read bundles (``stem_problem``). What
only some backends do is a small protocol of its own, which its users ask for with
``isinstance``; a backend without one still runs a pool:

    RemovesOrphans     remove the workers an earlier run of the pool id left
                       (docker, process, swarm; asked by WarmPool.start)
    ReportsReadiness   checks for /readyz and ``wanwu doctor``
                       (docker, process, swarm; asked by snapshot.readiness)
    BundleTools        provide, build and check bundles where workers run
                       (docker, process, swarm; asked by assembly.build_pool and
                       gateway/bundles.py)
    RemoteGpus         GPU readings of GPUs on other hosts
                       (swarm; asked by assembly.gpu_reader)

``BuiltinBackend`` is ``Backend`` with the first three: what each built-in backend is,
and what ``assembly.build_backend`` gives the CLI and ``wanwu doctor``.

The backends: ``docker.py`` (hardened containers on this engine, a Unix socket each),
``process.py`` (local child processes, a Unix socket each) and ``docker_swarm.py`` (swarm
services on an overlay network, over TCP with a secret each). ``scheduler/assembly.py``
picks one from ``WANWU_BACKEND`` and builds the pool over it; a Kubernetes backend would
implement ``Backend`` (and what it can of the rest) without touching the pool. Tests use
``tests/unit/fakes.py``'s FakeBackend and CoreBackend.

Below the protocols: what the backends share. The directories a gateway keeps its
workers' sockets in (``prepare_private_dir``: the gateway's own, private), what a
worker's uid may reach or change (``access_problem``, ``writable_path``), waiting for a
worker to answer on its socket, asking a stem cell to load, and reading a bundle
check's report.

This package imports nothing of the scheduler above it (no pool, settings, catalog or
core): only the leaf modules ``scheduler.errors``, ``scheduler.workers``,
``scheduler.policy``, ``scheduler.gpu``, ``scheduler.answers`` and
``scheduler.worker_client``, and ``wanwu_worker.contract`` (tests/unit/test_layers.py).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import BackendUnavailable, WanwuError, WorkerCrashed, WorkerStartError, WorkerStartTimeout, WorkerTimeout
from ..gpu import GpuReader
from ..policy import STEM
from ..worker_client import Scores, WorkerAnswer, WorkerBatchAnswer, WorkerClient


@dataclass(frozen=True)
class SpawnRequest:
    """Start ``worker_id`` for ``model`` from the bundle at ``model_dir``; with
    ``model`` STEM, a stem cell with every bundle of ``model_dir`` (the models
    directory) readable, ready to ``load`` one."""

    worker_id: str
    model: str
    model_dir: Path
    device: str | None = None

    @property
    def stem(self) -> bool:
        return self.model == STEM


@dataclass(frozen=True)
class Started:
    """A worker that answered /healthz. ``timing_ms`` breaks its start down
    (``create``: the container exists and runs; ``ready``: the worker answered)."""

    worker_id: str
    health: dict[str, Any]
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ManagedWorker:
    worker_id: str
    model: str
    running: bool


class Connection(Protocol):
    """How the pool talks to a worker: a ``WorkerClient``, over a Unix socket (docker,
    process) or over TCP with the worker's secret (swarm)."""

    def predict(
        self, image: bytes, top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerAnswer: ...

    def predict_batch(
        self, images: list[bytes], top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerBatchAnswer: ...

    def health(self, timeout: float = 2.0) -> dict[str, Any]: ...

    def close(self) -> None: ...


ExitCallback = Callable[[str, str], None]


class Backend(Protocol):
    """What every backend does (module doc); the pool needs nothing else."""

    def spawn(self, request: SpawnRequest) -> Started:
        """Start a worker and block until it is ready. Raises WorkerStartError (with
        its last log lines), WorkerStartTimeout or BackendUnavailable; a worker that
        failed to start is already removed."""
        ...

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        """Turn the ready stem cell ``worker_id`` into a worker of the bundle at
        ``model_dir`` (inside the models directory it was started with). Raises
        WorkerStartError with the reason if it does not load; the stem cell is then
        broken, and the pool stops it."""
        ...

    def stop(self, worker_id: str) -> None:
        """Kill and remove a worker. Idempotent."""
        ...

    def list_workers(self) -> list[ManagedWorker]:
        """Every worker of this pool the backend knows, running or not."""
        ...

    def connect(self, worker_id: str, timeout: float) -> Connection: ...

    def watch(self, on_exit: ExitCallback, on_reconnect: Callable[[], None], stop: threading.Event) -> None:
        """Block, calling ``on_exit(worker_id, reason)`` when a worker dies, until
        ``stop`` is set; after losing and regaining the engine call ``on_reconnect``."""
        ...

    def ping(self) -> None:
        """Raise BackendUnavailable unless the engine answers."""
        ...

    def stem_problem(self, models_dir: Path) -> str | None:
        """Why stem cells could not read bundles through ``models_dir``, or None."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RemovesOrphans(Protocol):
    """A backend that finds the workers an earlier run of its pool id left behind."""

    def remove_orphans(self) -> list[str]:
        """Remove every worker of this pool id (left by an earlier run)."""
        ...


@runtime_checkable
class ReportsReadiness(Protocol):
    """A backend with checks of its own for the readiness probe and ``wanwu doctor``."""

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Checks a readiness probe reports, e.g. engine reachable and image present."""
        ...


@runtime_checkable
class BundleTools(Protocol):
    """A backend that runs the worker package's bundle tools where its workers run."""

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Put the built-in bundle ``name`` into ``models_dir`` when it is missing there
        (the Docker backends copy it out of the worker image; the process backend
        makes it). Raises ImageBuildError or WorkerStartError with the reason."""
        ...

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """Load the bundle in ``bundle_dir`` the way a worker would (in the worker image,
        or with the worker interpreter), run it once and measure it, on GPU ``device``
        or the CPU: the worker's ``check`` report, ``{"ok": true, ...}`` or ``{"ok":
        false, "error": {...}}``. Raises WorkerStartError if the check could not run."""
        ...

    def build_bundle(self, arguments: list[str], out_dir: Path, timeout: float) -> None:
        """Run the worker package's bundle builder (``python -m wanwu_worker.general.build
        ARGUMENTS``, whose ``--out`` and ``--embed-out`` name directories directly in
        ``out_dir``) where workers run: in the worker image, or with the worker
        interpreter. Raises ImageBuildError with the builder's last lines if it fails."""
        ...


@runtime_checkable
class RemoteGpus(Protocol):
    """A backend whose GPUs are on other hosts, out of this host's NVML's sight: it
    reads them itself."""

    def gpu_devices(self) -> tuple[str, ...]:
        """Every GPU the backend could place a worker on (``WANWU_GPUS=auto``)."""
        ...

    def gpu_monitor(self, devices: tuple[str, ...]) -> GpuReader:
        """The pool's GPU readings of ``devices``."""
        ...


class BuiltinBackend(Backend, RemovesOrphans, ReportsReadiness, BundleTools, Protocol):
    """What each of docker, process and swarm is: what ``assembly.build_backend`` gives."""


BUILDER = ("-m", "wanwu_worker.general.build")  # what ``build_bundle`` runs
WORKER_UID = 10001  # the worker image's user (USER 10001:10001); a root gateway's process workers too


# -- shared: the gateway's socket directories (docker, process), what a worker's uid may
# -- touch (process), waiting for a worker, a stem cell's load, a bundle check's report --


def private_dir_problem(info: os.stat_result, euid: int) -> str | None:
    """Why a directory (its ``lstat``) may not hold the sockets of a gateway running as
    ``euid``, or None: it must be a real directory, this user's, writable by nobody else
    (else another local user could have made it, or swap what is inside)."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != euid:
        return f"is owned by uid {info.st_uid}, not by this gateway's uid {euid}"
    if info.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def ancestor_problem(info: os.stat_result, euid: int) -> str | None:
    """Why a directory above a socket directory lets another user replace what is below
    it, or None: it must be root's or ours, and writable by others only if sticky (/tmp)."""
    if info.st_uid not in (0, euid):
        return f"is owned by uid {info.st_uid}"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return f"is writable by others without the sticky bit (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def prepare_private_dir(path: Path, mode: int = 0o700, adjust: bool = False) -> None:
    """Make ``path`` (a socket root or a pool's directory) with ``mode`` if it is missing,
    and check that it and every directory above it are safe (see the two functions
    above). An existing directory keeps its mode unless ``adjust`` (the pool's own
    directory): a socket root the operator named may be a shared one such as /run, which
    is never changed. Raises BackendUnavailable naming the path and what is wrong."""
    path = Path(os.path.abspath(path))
    euid = os.geteuid()
    fix = "remove it, or set WANWU_SOCKET_DIR to a directory of the gateway's user"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=mode)
            adjust = True  # ours: the umask may have taken bits off
        except FileExistsError:
            pass
        for parent in reversed(path.parents):
            problem = ancestor_problem(os.stat(parent), euid)
            if problem:
                raise BackendUnavailable(f"the socket directory {path} is under {parent}, which {problem}: {fix}")
        # Opened without following a link, then checked and changed through the same descriptor.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            reason = "is a symbolic link"
        elif os.path.lexists(path) and not os.path.isdir(path):
            reason = "is not a directory"
        else:
            reason = f"cannot be made or opened: {exc.strerror or exc}"
        raise BackendUnavailable(f"the socket directory {path} {reason}: {fix}") from exc
    try:
        info = os.fstat(fd)
        problem = private_dir_problem(info, euid)
        if problem:
            raise BackendUnavailable(f"the socket directory {path} {problem}: {fix}")
        if adjust and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def permits(info: os.stat_result, uid: int, gid: int, want: int) -> bool:
    """Whether the mode bits of ``info`` give a process of ``uid`` and ``gid`` (and no
    other group) every access in ``want`` (os.R_OK | os.W_OK | os.X_OK). Root may do
    anything; ACLs are not read."""
    if uid == 0:
        return True
    shift = 6 if info.st_uid == uid else 3 if info.st_gid == gid else 0
    return (info.st_mode >> shift) & want == want


def access_problem(path: Path, uid: int, gid: int, want: int = os.R_OK | os.X_OK) -> str | None:
    """Why ``uid`` could not reach ``path`` with ``want``: the first directory on the way
    (as written, and with links resolved) it may not search, or ``path`` itself; None if
    it can."""
    path = Path(os.path.abspath(path))
    for route in dict.fromkeys((path, Path(os.path.realpath(path)))):
        for directory in reversed(route.parents):
            try:
                info = os.stat(directory)
            except OSError as exc:
                return f"{directory}: {exc.strerror or exc}"
            if not permits(info, uid, gid, os.X_OK):
                return f"{directory} ({_describe(info)}) is not searchable by uid {uid}"
        try:
            info = os.stat(route)
        except OSError as exc:
            return f"{route}: {exc.strerror or exc}"
        if not permits(info, uid, gid, want):
            return f"{route} ({_describe(info)}) does not give uid {uid} {_bits(want)}"
    return None


def writable_path(root: Path, uid: int, gid: int, limit: int = 10_000) -> Path | None:
    """The first of ``root`` and what lies below it (links not followed) that ``uid``
    could change, by mode bits; None if it can change none. ValueError past ``limit``
    entries: what was not looked at is not called safe."""
    paths = [root]
    for directory, dirs, files in os.walk(root):
        paths.extend(Path(directory) / name for name in (*dirs, *files))
        if len(paths) > limit:
            raise ValueError(f"{root} holds more than {limit} files and directories")
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISLNK(info.st_mode) and permits(info, uid, gid, os.W_OK):
            return path
    return None


def _describe(info: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}"


def _bits(want: int) -> str:
    return "".join(letter if want & bit else "-" for bit, letter in ((os.R_OK, "r"), (os.W_OK, "w"), (os.X_OK, "x")))


def check_report(output: str, who: str, stderr: str = "") -> dict[str, Any]:
    """The JSON report a worker's ``check`` printed last on ``output`` (its stdout);
    else WorkerStartError with the last lines it printed."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                break
            if isinstance(report, dict) and "ok" in report:
                return report
            break
    tail = "\n".join(f"{output.strip()}\n{stderr.strip()}".strip().splitlines()[-8:]) or "no output"
    raise WorkerStartError(f"{who} printed no bundle report:\n{tail}", "bundle-check")


def wait_ready(socket: Path, worker_id: str, deadline: float, check: Callable[[float], None]) -> dict[str, Any]:
    """Poll for the worker's socket (it appears only once the model is warm), then
    /healthz. ``check(now)`` runs every 5 ms and raises when the worker died or the
    deadline passed."""
    while True:
        now = time.monotonic()
        if socket.exists():
            client = WorkerClient(str(socket), worker_id)
            try:
                return client.health(timeout=max(0.5, deadline - now))
            except WanwuError:
                pass
            finally:
                client.close()
        check(now)
        time.sleep(0.005)


def load_model(client: WorkerClient, worker_id: str, model_dir: Path, timeout: float) -> Started:
    """Ask the stem cell behind ``client`` to load the bundle named like ``model_dir``
    from the models directory it was started with."""
    try:
        health = client.load(model_dir.name, timeout)
    except WorkerTimeout as exc:
        raise WorkerStartTimeout(
            f"stem cell {worker_id} did not load {model_dir.name} within {timeout:g} s", worker_id
        ) from exc
    except WorkerCrashed as exc:
        raise WorkerStartError(
            f"stem cell {worker_id} failed while loading {model_dir.name}: {exc}", worker_id
        ) from exc
    finally:
        client.close()
    timing = health.pop("timing_ms", {})
    return Started(worker_id, health, {k: float(v) for k, v in timing.items() if isinstance(v, (int, float))})
