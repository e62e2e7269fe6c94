"""Run workers as Docker containers on this engine (``WANWU_BACKEND=docker``): one
hardened container each (``docker_container.py`` says how), reached over a Unix socket in
its own directory under the gateway's socket directory. The docker SDK is imported only
by the modules named ``docker*.py`` of this package.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from ..errors import BackendUnavailable, WanwuError, WorkerStartError, WorkerStartTimeout
from ..worker_client import WorkerClient
from .base import (
    ExitCallback,
    ManagedWorker,
    SpawnRequest,
    Started,
    check_report,
    load_model,
    prepare_private_dir,
    wait_ready,
)
from .docker_common import (
    ENGINE_ERRORS,
    MODEL_LABEL,
    POOL_LABEL,
    WORKER_LABEL,
    ContainerLimits,
    container_name,
    engine_client,
    first_line,
    run_builder,
    stem_mount_problem,
)
from .docker_container import WorkerSpec, container_uid, prepare_socket_dir, run_options

log = logging.getLogger(__name__)


def _check_readable_by_workers(models_dir: Path, worker_id: str) -> None:
    problem = stem_mount_problem(models_dir, container_uid())
    if problem:
        raise WorkerStartError(problem, worker_id)


class DockerBackend:
    """Workers as hardened Docker containers, one Unix socket directory each under
    ``socket_root/<pool id>/<worker id>``. Docker SDK errors become the scheduler's
    here: an engine that cannot be reached is BackendUnavailable; a container that
    exits or never answers during start is WorkerStartError/WorkerStartTimeout with its
    exit status and last log lines."""

    def __init__(
        self,
        image: str,
        pool_id: str,
        socket_root: Path,
        limits: ContainerLimits | None = None,
        spawn_timeout_s: float = 60.0,
        client: docker.DockerClient | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.image = image
        self.pool_id = pool_id
        self.socket_root = socket_root / pool_id
        self.limits = limits or ContainerLimits()
        self.spawn_timeout_s = spawn_timeout_s
        self.environment = environment or {}
        self._client = client
        self._events: Any = None
        self._events_lock = threading.Lock()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = engine_client("the Docker engine")
        return self._client

    def ping(self) -> None:
        """Raise BackendUnavailable unless the engine answers and the socket directory is
        this user's and private."""
        self._prepare_socket_root()
        try:
            self.client.ping()
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"the Docker engine does not answer: {first_line(exc)}") from exc

    def _prepare_socket_root(self) -> None:
        # The engine (root) bind-mounts each worker's directory, so nothing above it needs
        # to be open to the worker's user.
        prepare_private_dir(self.socket_root.parent)
        prepare_private_dir(self.socket_root, adjust=True)

    def image_present(self) -> bool:
        try:
            self.client.images.get(self.image)
        except docker.errors.ImageNotFound:
            return False
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"the Docker engine does not answer: {first_line(exc)}") from exc
        return True

    def readiness(self) -> dict[str, tuple[bool, str]]:
        try:
            version = self.client.version().get("Version", "?")
        except (WanwuError, *ENGINE_ERRORS) as exc:
            return {"docker": (False, f"the Docker engine does not answer: {first_line(exc)}")}
        try:
            present = self.image_present()
        except WanwuError as exc:
            return {"docker": (True, f"engine {version}"), "image": (False, str(exc))}
        image = (True, self.image) if present else (False, f"{self.image} is missing: run `wanwu image build`")
        return {"docker": (True, f"engine {version}"), "image": image}

    def _spec(self, request: SpawnRequest) -> WorkerSpec:
        return WorkerSpec(
            image=self.image,
            pool_id=self.pool_id,
            model=request.model,
            worker_id=request.worker_id,
            model_dir=request.model_dir,
            socket_dir=self.socket_root / request.worker_id,
            gpus=(request.device,) if request.device else (),
            limits=self.limits,
            environment=self.environment,
            stem=request.stem,
        )

    def spawn(self, request: SpawnRequest) -> Started:
        if request.stem:
            _check_readable_by_workers(request.model_dir, request.worker_id)
        spec = self._spec(request)
        started = time.monotonic()
        self._prepare_socket_root()
        prepare_socket_dir(spec.socket_dir, spec.user)
        try:
            container = self.client.containers.run(**run_options(spec))
        except docker.errors.ImageNotFound as exc:
            self._cleanup(spec)
            raise WorkerStartError(
                f"worker image {self.image} is not present: run `wanwu image build`", request.worker_id
            ) from exc
        except docker.errors.APIError as exc:
            self._cleanup(spec)
            raise WorkerStartError(
                f"cannot start worker {spec.name} ({self.image}): {first_line(exc)}", request.worker_id
            ) from exc
        except ENGINE_ERRORS as exc:
            self._cleanup(spec)
            raise BackendUnavailable(f"the Docker engine does not answer: {first_line(exc)}") from exc
        created = time.monotonic()
        health = self._wait_ready(spec, container, started + self.spawn_timeout_s)
        ready = time.monotonic()
        return Started(
            request.worker_id,
            health,
            {
                "create": round((created - started) * 1000, 3),
                "ready": round((ready - created) * 1000, 3),
            },
        )

    def _wait_ready(self, spec: WorkerSpec, container: Any, deadline: float) -> dict[str, Any]:
        """Wait for the worker to answer; its container's state is checked every
        0.25 s, so a crash is reported at once."""
        next_check = [time.monotonic() + 0.25]

        def check(now: float) -> None:
            if now >= next_check[0]:
                next_check[0] = now + 0.25
                state = self._state(container)
                if state is not None and state.get("Status") in ("exited", "dead"):
                    logs = self._logs(container)
                    self.stop(spec.worker_id)
                    oom = " (killed: out of memory)" if state.get("OOMKilled") else ""
                    raise WorkerStartError(
                        f"worker {spec.name} (model {spec.model}, image {self.image}) exited with status "
                        f"{state.get('ExitCode')}{oom} while starting; last log lines:\n{logs}",
                        spec.worker_id,
                    )
            if now >= deadline:
                logs = self._logs(container)
                self.stop(spec.worker_id)
                raise WorkerStartTimeout(
                    f"worker {spec.name} (model {spec.model}, image {self.image}) was not ready within "
                    f"{self.spawn_timeout_s:g} s; last log lines:\n{logs}",
                    spec.worker_id,
                )

        return wait_ready(spec.socket_dir / "worker.sock", spec.worker_id, deadline, check)

    def _state(self, container: Any) -> dict[str, Any] | None:
        try:
            container.reload()
        except docker.errors.NotFound:
            return {"Status": "dead", "ExitCode": "unknown (container removed)"}
        except ENGINE_ERRORS:
            return None
        return dict(container.attrs.get("State", {}))

    @staticmethod
    def _logs(container: Any, lines: int = 20) -> str:
        try:
            return str(container.logs(tail=lines).decode("utf-8", "replace").rstrip()) or "(no output)"
        except ENGINE_ERRORS as exc:
            return f"(logs unavailable: {first_line(exc)})"

    @staticmethod
    def _cleanup(spec: WorkerSpec) -> None:
        shutil.rmtree(spec.socket_dir, ignore_errors=True)

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        """Ask a stem cell to load ``model_dir``, which must lie in the models directory
        the stem cell sees as /models (the pool only asks for such bundles)."""
        return load_model(self.connect(worker_id, timeout), worker_id, model_dir, timeout)

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Copy the built-in bundle out of the worker image."""
        from .docker_image import export_builtin_model

        return export_builtin_model(self.image, name, models_dir)

    def stem_problem(self, models_dir: Path) -> str | None:
        return stem_mount_problem(models_dir, container_uid())

    def build_bundle(self, arguments: list[str], out_dir: Path, timeout: float) -> None:
        """Run the bundle builder in a one-shot container of the worker image, as locked
        down as a worker but for ``out_dir``, mounted writable at /out."""
        run_builder(self.client, self.image, self.limits, arguments, out_dir, timeout)

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """Run the worker's ``check`` in a one-shot container, as locked down as a
        worker, with the bundle mounted read-only at /model."""
        worker_id = f"check-{uuid.uuid4().hex[:8]}"
        spec = WorkerSpec(
            image=self.image,
            pool_id=f"{self.pool_id}.check",  # not a worker of the pool: its orphan cleanup leaves it be
            model="bundle-check",
            worker_id=worker_id,
            model_dir=bundle_dir.resolve(),
            socket_dir=self.socket_root / worker_id,
            gpus=(device,) if device else (),
            limits=self.limits,
            environment=self.environment,
        )
        self._prepare_socket_root()
        prepare_socket_dir(spec.socket_dir, spec.user)
        container = None
        try:
            container = self.client.containers.run(**run_options(spec, ["check"]))
            status = container.wait(timeout=timeout).get("StatusCode")
            output = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
            errors = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
            container.reload()
            if container.attrs.get("State", {}).get("OOMKilled"):
                errors += f"\nthe check was killed for memory (limit {self.limits.memory}; WANWU_WORKER_MEMORY)"
            elif status not in (0, 2):
                errors += f"\nthe check exited with status {status}"
        except docker.errors.ImageNotFound as exc:
            raise WorkerStartError(
                f"worker image {self.image} is not present: run `wanwu image build`", worker_id
            ) from exc
        except ENGINE_ERRORS as exc:
            raise WorkerStartError(
                f"checking {bundle_dir} in {self.image} failed: {first_line(exc)}", worker_id
            ) from exc
        finally:
            if container is not None:
                with contextlib.suppress(*ENGINE_ERRORS):
                    container.remove(force=True)
            self._cleanup(spec)
        return check_report(output, f"the check in {self.image}", errors)

    def stop(self, worker_id: str) -> None:
        """Kill and remove (one API call), then delete the socket directory."""
        name = container_name(self.pool_id, worker_id)
        try:
            self.client.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot remove {name}: {first_line(exc)}") from exc
        finally:
            shutil.rmtree(self.socket_root / worker_id, ignore_errors=True)

    def list_workers(self) -> list[ManagedWorker]:
        # The low-level call lists in one request; the high-level one inspects each
        # container after listing and fails on one removed in between.
        try:
            rows = self.client.api.containers(all=True, filters={"label": [f"{POOL_LABEL}={self.pool_id}"]})
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list containers: {first_line(exc)}") from exc
        workers = []
        for row in rows:
            labels = row.get("Labels") or {}
            name = (row.get("Names") or ["?"])[0].lstrip("/")
            workers.append(
                ManagedWorker(
                    labels.get(WORKER_LABEL, name), labels.get(MODEL_LABEL, ""), row.get("State") == "running"
                )
            )
        return workers

    def remove_orphans(self) -> list[str]:
        removed = []
        for worker in self.list_workers():
            self.stop(worker.worker_id)
            removed.append(worker.worker_id)
        if self.socket_root.is_dir():
            for leftover in self.socket_root.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        return removed

    def connect(self, worker_id: str, timeout: float) -> WorkerClient:
        return WorkerClient(str(self.socket_root / worker_id / "worker.sock"), worker_id, timeout)

    def watch(self, on_exit: ExitCallback, on_reconnect: Callable[[], None], stop: threading.Event) -> None:
        """Follow the engine's events for this pool's containers. When the stream is
        lost (the engine restarted), reconnect with backoff and reconcile once back."""
        lost, failures = False, 0
        while not stop.is_set():
            try:
                stream = docker.from_env(timeout=60).events(
                    decode=True,
                    filters={"type": "container", "label": f"{POOL_LABEL}={self.pool_id}", "event": ["die", "oom"]},
                )
                with self._events_lock:
                    self._events = stream
                if lost:
                    log.info("reconnected to the Docker engine; reconciling the pool")
                    on_reconnect()
                lost, failures = False, 0
                for event in stream:
                    self._dispatch_event(event, on_exit)
            except (*ENGINE_ERRORS, OSError) as exc:
                if not stop.is_set():
                    log.warning("lost the Docker event stream: %s", first_line(exc))
            except Exception:  # the watcher must not die silently
                log.exception("event watcher failed; restarting it")
            if stop.is_set():
                break
            lost, failures = True, failures + 1
            stop.wait(min(5.0, 0.1 * 2**failures))

    @staticmethod
    def _dispatch_event(event: dict[str, Any], on_exit: ExitCallback) -> None:
        attributes = event.get("Actor", {}).get("Attributes", {})
        worker_id = attributes.get(WORKER_LABEL)
        if worker_id:
            oom = event.get("Action") == "oom"
            on_exit(worker_id, "killed: out of memory" if oom else f"exit {attributes.get('exitCode', '?')}")

    def close(self) -> None:
        with self._events_lock:
            if self._events is not None:
                try:
                    self._events.close()
                except Exception:  # noqa: BLE001 - closing a stream the engine may have dropped
                    pass
                self._events = None
