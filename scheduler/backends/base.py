"""The backend seam, in the pool's words: spawn a worker, stop it, list what is managed,
remove leftovers, watch for workers that die, and connect to a worker. Docker
(``docker.py``) and local processes (``process.py``) implement it; ``factory.py`` picks
one from ``WANWU_BACKEND``; a Kubernetes backend would implement the same without
touching the pool. Tests use ``tests/unit/fakes.py``'s FakeBackend.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import WanwuError, WorkerCrashed, WorkerStartError, WorkerStartTimeout, WorkerTimeout
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
    """How the pool talks to a worker (``WorkerClient`` over a Unix socket)."""

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

    def remove_orphans(self) -> list[str]:
        """Remove every worker of this pool id (left by an earlier run)."""
        ...

    def connect(self, worker_id: str, timeout: float) -> Connection: ...

    def watch(self, on_exit: ExitCallback, on_reconnect: Callable[[], None], stop: threading.Event) -> None:
        """Block, calling ``on_exit(worker_id, reason)`` when a worker dies, until
        ``stop`` is set; after losing and regaining the engine call ``on_reconnect``."""
        ...

    def ping(self) -> None:
        """Raise BackendUnavailable unless the engine answers."""
        ...

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Checks a readiness probe reports, e.g. engine reachable and image present."""
        ...

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Put the built-in bundle ``name`` into ``models_dir`` when it is missing there
        (the Docker backend copies it out of the worker image; the process backend
        trains it). Raises ImageBuildError or WorkerStartError with the reason."""
        ...

    def stem_problem(self, models_dir: Path) -> str | None:
        """Why stem cells could not read bundles through ``models_dir``, or None."""
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

    def close(self) -> None: ...


BUILDER = ("-m", "wanwu_worker.general.build")  # what ``build_bundle`` runs


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
