"""Run workers as Docker Swarm services across hosts (``WANWU_BACKEND=swarm``).

Each worker is a service of one replica, labelled as a local worker's container is,
driven through the engine of a swarm manager (``DOCKER_HOST``). How it differs from
the local Docker backend:

- **Network.** A worker listens on TCP port ``WORKER_PORT`` on an overlay network
  (``WANWU_SWARM_NETWORK``, created ``--internal``: no route out) that only the gateway
  shares. Every request carries the worker's own secret, a Docker secret made at spawn
  and removed with the worker, so nothing else on that network can use a worker. The
  service has no virtual IP (``dnsrr``): the gateway talks to the task's own address.
  Where every node's kernel has IPsec, the stack creates it ``encrypted`` with
  deploy/swarm/encrypted.yml (``probe_ipsec`` of docker_swarm_network.py says whether
  a kernel has it); a network without that option is used with a warning, as traffic
  between nodes is then clear.
- **Hardening.** As the local backend: read-only root, a tmpfs /tmp, uid 10001, every
  capability dropped, memory, CPU and pids limits, the bundle mounted read-only. The
  memory limit is also reserved, so swarm places on a node no more workers than its
  memory holds (per-node capacity; ``WANWU_MAX_WORKERS`` stays the pool's own bound),
  and a worker no node can take fails within UNPLACED_GRACE_S. Swarm
  (API 1.41) cannot ask for no-new-privileges per service: nodes run dockerd with
  ``--no-new-privileges`` (deploy/swarm/README.md).
- **Placement.** The pool's device for a GPU worker is ``NODE/GPU``: a node's hostname
  and one of the GPUs it advertises as the generic resource ``WANWU_SWARM_GPU_RESOURCE``
  (``NVIDIA-GPU``, named by UUID). The service is constrained to that node and given
  that GPU as ``NVIDIA_VISIBLE_DEVICES``, as the local backend's device request does;
  it does not *reserve* the generic resource. Docker 20.10's swarm rejects a running
  task that holds a generic resource whenever its node's record changes (a label, an
  overlay network first used there: moby/moby#44378, fixed in 23.0), and the pool
  already accounts for its GPUs itself. Extra constraints (``WANWU_SWARM_CONSTRAINTS``)
  apply to every worker.
- **GPU memory.** Remote GPUs cannot be read through NVML from the gateway. A GPU
  node's label ``wanwu.gpu-memory-mb`` says each of its GPUs' size; what is used is
  what this pool's workers there measured when they loaded (``gpu_memory_mb`` of their
  /healthz). See ``docker_swarm_nodes.SwarmGpuMonitor``.
- **Failures.** ``watch`` polls the manager: a worker whose task is no longer running,
  was replaced by swarm (a restarted or rejected task), or whose node is down is
  reported gone, and the requests in flight to it are broken off at once, so the pool
  retries them on another worker instead of waiting out their timeout.
- **Bundles.** The models directory is bind-mounted from the node's own filesystem:
  it must exist at the same path on every node (a shared filesystem, or synced).

Its parts: ``docker_swarm_placement.py`` (a worker's task: its node, GPU, mounts and
limits; waiting until it runs and answers), ``docker_swarm_nodes.py`` (the nodes, the GPU
readings, the watcher), ``docker_swarm_network.py`` (the worker network, IPsec) and
``docker_swarm_secrets.py`` (each worker's secret).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from ..errors import BackendUnavailable, WanwuError, WorkerStartError
from ..worker_client import WorkerClient
from .base import ManagedWorker, SpawnRequest, Started, load_model
from .docker import DockerBackend
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
from .docker_swarm_network import WORKER_PORT, probe_ipsec
from .docker_swarm_nodes import RemoteWorker, SwarmNode
from .docker_swarm_placement import NodeLost, SwarmPlacement, split_device
from .docker_swarm_secrets import new_token, remove_pool_secrets, remove_secret

log = logging.getLogger(__name__)


class SwarmBackend(SwarmPlacement):
    """Workers as one-replica swarm services reached over an overlay network (module doc)."""

    def __init__(
        self,
        image: str,
        pool_id: str,
        network: str,
        limits: ContainerLimits | None = None,
        spawn_timeout_s: float = 60.0,
        environment: dict[str, str] | None = None,
        constraints: tuple[str, ...] = (),
        gpu_resource: str = "NVIDIA-GPU",
        client: docker.DockerClient | None = None,
        ipsec: Callable[[], tuple[bool, str]] = probe_ipsec,
    ) -> None:
        self.image = image
        self.ipsec = ipsec  # whether this kernel could encrypt the worker network, and why
        self.pool_id = pool_id
        self.network = network
        self.limits = limits or ContainerLimits()
        self.spawn_timeout_s = spawn_timeout_s
        self.environment = environment or {}
        self.constraints = constraints
        self.gpu_resource = gpu_resource
        self._client = client
        self._lock = threading.Lock()
        self._workers: dict[str, RemoteWorker] = {}
        self._nodes: dict[str, SwarmNode] = {}
        self._network_id: str | None = None

    # -- the engine --------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = engine_client("the swarm manager's engine")
        return self._client

    def ping(self) -> None:
        try:
            self.client.ping()
            swarm = self.client.info().get("Swarm") or {}
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"the swarm manager's engine does not answer: {first_line(exc)}") from exc
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise BackendUnavailable(
                "WANWU_BACKEND=swarm needs a swarm manager's engine (DOCKER_HOST); this one is "
                f"{swarm.get('LocalNodeState') or 'not in a swarm'}"
                + ("" if swarm.get("ControlAvailable") else ", not a manager")
            )

    def readiness(self) -> dict[str, tuple[bool, str]]:
        try:
            self.ping()
        except WanwuError as exc:
            return {"swarm": (False, str(exc))}
        nodes = self.nodes()
        ready = [n for n in nodes if n.state == "ready" and n.availability == "active"]
        checks = {"swarm": (bool(ready), f"{len(ready)} of {len(nodes)} nodes ready and active")}
        try:
            self._network()
            checks["network"] = (True, self.network)
        except WanwuError as exc:
            checks["network"] = (False, str(exc))
        try:
            self.client.images.get(self.image)
            checks["image"] = (True, f"{self.image} (on the manager; every node needs it: deploy/swarm/README.md)")
        except docker.errors.ImageNotFound:
            checks["image"] = (False, f"{self.image} is missing on the manager: deploy/swarm/distribute-image.sh")
        except ENGINE_ERRORS as exc:
            checks["image"] = (False, first_line(exc))
        return checks

    # -- workers -----------------------------------------------------------------

    def spawn(self, request: SpawnRequest) -> Started:
        """Create the worker's secret and service, wait until its task runs and the
        worker answers. A task placed on a node that dies before it starts (the manager
        notices a dead node only after missed heartbeats) is placed again, within the
        spawn timeout: swarm then leaves the dead node out."""
        if request.stem:
            problem = stem_mount_problem(request.model_dir)
            if problem:
                raise WorkerStartError(problem, request.worker_id)
        name = container_name(self.pool_id, request.worker_id)
        token = new_token()
        started = time.monotonic()
        deadline = started + self.spawn_timeout_s
        labels = self._labels(request)
        try:
            secret = self._create(
                lambda: self.client.api.create_secret(name, token.encode("ascii"), labels=labels), name, request
            )
            template = self._task_template(request, secret["ID"], name)
            while True:
                service = self._create(
                    functools.partial(
                        self.client.api.create_service,
                        template,
                        name=name,
                        labels=labels,
                        mode=docker.types.ServiceMode("replicated", 1),
                        endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),
                    ),
                    name,
                    request,
                )
                remote = RemoteWorker(request.worker_id, str(service["ID"]), token, request.device)
                with self._lock:
                    self._workers[request.worker_id] = remote
                try:
                    self._wait_running(remote, name, deadline)
                    created = time.monotonic()
                    health = self._wait_healthy(remote, name, deadline)
                    break
                except NodeLost as exc:
                    # A GPU worker belongs on its node: the pool places it again (the
                    # dead node's GPUs read as full now). A CPU worker can go anywhere.
                    if request.device or time.monotonic() + 1 >= deadline:
                        raise
                    log.warning("%s; placing %s again", exc, name)
                    self._remove_service(name)
        except BaseException:
            try:
                self.stop(request.worker_id)
            except WanwuError as cleanup:  # the start's own error matters more
                log.warning("could not remove %s after it failed to start: %s", name, cleanup)
            raise
        ready = time.monotonic()
        gpu_mb = health.get("gpu_memory_mb")
        remote.gpu_mb = float(gpu_mb) if isinstance(gpu_mb, (int, float)) else 0.0
        remote.ready = True
        node = self._nodes.get(remote.node_id)
        health = {**health, "node": node.hostname if node else remote.node_id, "address": remote.address}
        return Started(
            request.worker_id,
            health,
            {"create": round((created - started) * 1000, 3), "ready": round((ready - created) * 1000, 3)},
        )

    def _create(self, create: Callable[[], dict[str, Any]], name: str, request: SpawnRequest) -> dict[str, Any]:
        """Run one create call of the engine, its errors as the scheduler's."""
        try:
            return create()
        except docker.errors.APIError as exc:
            if exc.status_code == 503:  # no leader, lost quorum: the manager's trouble, not the worker's
                raise BackendUnavailable(f"the swarm manager cannot create {name}: {first_line(exc)}") from exc
            raise WorkerStartError(f"cannot create worker {name}: {first_line(exc)}", request.worker_id) from exc
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"the swarm manager does not answer: {first_line(exc)}") from exc

    def load(self, worker_id: str, model_dir: Path, timeout: float) -> Started:
        started = load_model(self.connect(worker_id, timeout), worker_id, model_dir, timeout)
        gpu_mb = started.health.get("gpu_memory_mb")
        with self._lock:
            remote = self._workers.get(worker_id)
            if remote is not None and isinstance(gpu_mb, (int, float)):
                remote.gpu_mb = float(gpu_mb)
        return started

    def stop(self, worker_id: str) -> None:
        """Remove the worker's service (swarm stops its container wherever it runs) and
        its secret; break off requests still in flight to it. Idempotent."""
        name = container_name(self.pool_id, worker_id)
        with self._lock:
            remote = self._workers.pop(worker_id, None)
        if remote is not None:
            self._abort(remote, "stopped")
        self._remove_service(name)
        remove_secret(self.client, name)

    def _remove_service(self, name: str) -> None:
        try:
            self.client.api.remove_service(name)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot remove service {name}: {first_line(exc)}") from exc

    def _services(self) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.services(filters={"label": f"{POOL_LABEL}={self.pool_id}"}))
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list services: {first_line(exc)}") from exc

    def list_workers(self) -> list[ManagedWorker]:
        services = self._services()
        try:
            tasks = self.client.api.tasks(filters={"desired-state": "running"})
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list tasks: {first_line(exc)}") from exc
        running = {t.get("ServiceID") for t in tasks if (t.get("Status") or {}).get("State") == "running"}
        workers = []
        for service in services:
            labels = (service.get("Spec") or {}).get("Labels") or {}
            workers.append(
                ManagedWorker(labels.get(WORKER_LABEL, "?"), labels.get(MODEL_LABEL, ""), service.get("ID") in running)
            )
        return workers

    def remove_orphans(self) -> list[str]:
        """Remove every service and secret of this pool id: swarm then removes their
        containers on every node (a node that is down does so when it rejoins)."""
        removed = []
        for service in self._services():
            labels = (service.get("Spec") or {}).get("Labels") or {}
            worker_id = labels.get(WORKER_LABEL) or str(service.get("ID"))
            self.stop(worker_id)
            removed.append(worker_id)
        remove_pool_secrets(self.client, self.pool_id)
        return removed

    def connect(self, worker_id: str, timeout: float) -> WorkerClient:
        with self._lock:
            remote = self._workers.get(worker_id)
            if remote is None or not remote.address:
                raise WorkerStartError(f"worker {worker_id} is not known to the swarm backend", worker_id)
            client = WorkerClient((remote.address, WORKER_PORT), worker_id, timeout, remote.secret)
            remote.clients.add(client)
        return client

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Copy the built-in bundle out of the worker image on the manager."""
        from .docker_image import export_builtin_model

        return export_builtin_model(self.image, name, models_dir)

    def stem_problem(self, models_dir: Path) -> str | None:
        return stem_mount_problem(models_dir)

    def build_bundle(self, arguments: list[str], out_dir: Path, timeout: float) -> None:
        """Build a bundle in a one-shot container on the manager's own engine."""
        run_builder(self.client, self.image, self.limits, arguments, out_dir, timeout)

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """Check a bundle in a one-shot container on the manager's own engine, as the
        local Docker backend does (a GPU ``device`` is the manager's ``NODE/GPU``)."""
        local = DockerBackend(
            self.image,
            self.pool_id,
            Path("/run/wanwu"),
            self.limits,
            self.spawn_timeout_s,
            client=self.client,
            environment=self.environment,
        )
        return local.check_bundle(bundle_dir, split_device(device)[1] if device else None, timeout)

    def close(self) -> None:
        with self._lock:
            remotes = list(self._workers.values())
        for remote in remotes:
            self._abort(remote, "the backend closed")
