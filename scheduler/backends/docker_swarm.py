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
  deploy/swarm/encrypted.yml (``probe_ipsec`` says whether a kernel has it); a network
  without that option is used with a warning, as traffic between nodes is then clear.
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
  /healthz). See ``SwarmGpuMonitor``.
- **Failures.** ``watch`` polls the manager: a worker whose task is no longer running,
  was replaced by swarm (a restarted or rejected task), or whose node is down is
  reported gone, and the requests in flight to it are broken off at once, so the pool
  retries them on another worker instead of waiting out their timeout.
- **Bundles.** The models directory is bind-mounted from the node's own filesystem:
  it must exist at the same path on every node (a shared filesystem, or synced).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from ..errors import BackendUnavailable, WanwuError, WorkerStartError, WorkerStartTimeout
from ..policy import GpuReading
from ..worker_client import WorkerClient
from .base import ExitCallback, ManagedWorker, SpawnRequest, Started, load_model
from .docker import (
    ENGINE_ERRORS,
    MODEL_LABEL,
    POOL_LABEL,
    WORKER_LABEL,
    WORKER_UID,
    ContainerLimits,
    DockerBackend,
    _first_line,
    container_name,
    engine_client,
    model_mount,
    run_builder,
    stem_mount_problem,
    worker_labels,
)
from .limits import parse_size

log = logging.getLogger(__name__)

WORKER_PORT = 7070
SECRET_FILE = "wanwu-worker-secret"  # under /run/secrets in the worker
GPU_MEMORY_LABEL = "wanwu.gpu-memory-mb"  # a GPU node's label: the size of each of its GPUs
POLL_S = 0.5  # how often watch() reads the manager
UNPLACED_GRACE_S = 5.0  # a task swarm can place on no node fails after this, not the spawn timeout
LOST_NODE_STATES = ("down", "disconnected")  # not "unknown": every node is, for a moment, after a leader change
DONE_STATES = ("complete", "shutdown", "failed", "rejected", "orphaned", "remove")


# What Docker's encrypted overlay needs of the kernel: ESP security associations with
# AES-GCM, programmed over xfrm netlink, and iptables' policy match (it drops VXLAN
# packets of an encrypted network that arrive unencrypted). Build option -> module.
IPSEC_KERNEL = {
    "CONFIG_XFRM_USER": "xfrm_user",
    "CONFIG_INET_ESP": "esp4",
    "CONFIG_CRYPTO_GCM": "gcm",
    "CONFIG_NETFILTER_XT_MATCH_POLICY": "xt_policy",
}


def ipsec_support(config: str | None, modules: Collection[str]) -> tuple[bool, str]:
    """Whether a kernel can carry an ``encrypted`` overlay, and why: from its build
    configuration (``config``: /proc/config.gz or /boot/config-*, as text) or, without
    one, the modules it has loaded, built in or installed. A kernel that says nothing
    counts as unable: traffic that cannot be encrypted between nodes would be dropped,
    so the network stays unencrypted (with a warning) rather than dark."""
    if config is not None:
        built = dict(re.findall(r"^(CONFIG_\w+)=(\S+)", config, re.MULTILINE))
        missing = [option for option in IPSEC_KERNEL if built.get(option) not in ("y", "m")]
        if missing:
            return False, f"the kernel is built without {', '.join(missing)}"
        return True, f"the kernel is built with {', '.join(IPSEC_KERNEL)}"
    absent = [module for module in IPSEC_KERNEL.values() if module not in modules]
    if absent:
        return False, f"no kernel configuration to read, and no module {', '.join(absent)}"
    return True, f"the kernel has {', '.join(IPSEC_KERNEL.values())}"


def probe_ipsec(root: Path = Path("/"), release: str | None = None) -> tuple[bool, str]:
    """``ipsec_support`` of the running kernel (``root``: where /proc, /sys, /boot and
    /lib are). Nodes that share this kernel, as the test swarm's do, share the answer;
    other hosts must be asked on their own."""
    release = release or os.uname().release
    for path in (root / "proc" / "config.gz", root / "boot" / f"config-{release}"):
        try:
            raw = path.read_bytes()
            return ipsec_support(gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode(), ())
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
            continue
    modules = {p.name for p in (root / "sys" / "module").glob("*")}
    for listing in ("modules.builtin", "modules.dep"):  # what `modprobe -n` reads
        try:
            text = (root / "lib" / "modules" / release / listing).read_text()
        except OSError:
            continue
        modules |= {name.replace("-", "_") for name in re.findall(r"([\w-]+)\.ko\b", text)}
    return ipsec_support(None, modules)


class _NodeLost(WorkerStartError):
    """A starting worker's node is not ready: its task would never start."""


@dataclass
class _Remote:
    """What the backend knows of one worker: its service, task, node and address."""

    worker_id: str
    service_id: str
    secret: str
    device: str | None
    task_id: str = ""
    node_id: str = ""
    address: str = ""
    gpu_mb: float = 0.0
    ready: bool = False
    clients: weakref.WeakSet[WorkerClient] = field(default_factory=weakref.WeakSet)


@dataclass(frozen=True)
class SwarmNode:
    """A node as the manager reports it."""

    node_id: str
    hostname: str
    state: str  # ready, down, unknown, disconnected
    availability: str  # active, pause, drain
    gpus: tuple[str, ...]  # the named generic resources of the GPU kind it advertises
    gpu_memory_mb: float | None  # its GPU_MEMORY_LABEL


def split_device(device: str) -> tuple[str, str]:
    """``NODE/GPU`` as (node hostname, GPU name)."""
    node, sep, gpu = device.partition("/")
    if not sep or not node or not gpu:
        raise WorkerStartError(f"swarm GPU devices are NODE/GPU (e.g. gpu-1/GPU-0), not {device!r}", device)
    return node, gpu


class SwarmBackend:
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
        self._workers: dict[str, _Remote] = {}
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
            raise BackendUnavailable(f"the swarm manager's engine does not answer: {_first_line(exc)}") from exc
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            raise BackendUnavailable(
                "WANWU_BACKEND=swarm needs a swarm manager's engine (DOCKER_HOST); this one is "
                f"{swarm.get('LocalNodeState') or 'not in a swarm'}"
                + ("" if swarm.get("ControlAvailable") else ", not a manager")
            )

    def _network(self) -> str:
        """The worker network's id; WorkerStartError unless it is a swarm overlay."""
        if self._network_id is not None:
            return self._network_id
        try:
            info = self.client.api.inspect_network(self.network)
        except docker.errors.NotFound:
            encrypted = "--opt encrypted " if self.ipsec()[0] else ""
            raise WorkerStartError(
                f"the worker network {self.network!r} does not exist: create it with `docker network create "
                f"--driver overlay --internal {encrypted}{self.network}` or deploy deploy/swarm/stack.yml",
                "network",
            ) from None
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot inspect network {self.network}: {_first_line(exc)}") from exc
        if info.get("Driver") != "overlay" or info.get("Scope") != "swarm":
            raise WorkerStartError(
                f"the worker network {self.network!r} is a {info.get('Scope')} {info.get('Driver')} network; "
                "workers need a swarm overlay network",
                "network",
            )
        if not info.get("Internal"):
            log.warning("the worker network %s is not --internal: workers on it have a route out", self.network)
        if "encrypted" not in (info.get("Options") or {}):
            able, why = self.ipsec()
            log.warning(
                "the worker network %s is not encrypted: requests, answers and worker secrets cross between nodes "
                "in the clear (%s; %s)",
                self.network,
                why,
                "deploy with -c deploy/swarm/encrypted.yml where every node's kernel can"
                if able
                else "other hosts' kernels may differ: deploy/swarm/README.md, Encryption",
            )
        self._network_id = str(info["Id"])
        return self._network_id

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
            checks["image"] = (False, _first_line(exc))
        return checks

    def nodes(self) -> list[SwarmNode]:
        """Every node of the swarm (BackendUnavailable if the manager does not answer)."""
        try:
            rows = self.client.api.nodes()
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list swarm nodes: {_first_line(exc)}") from exc
        nodes = [self._node(row) for row in rows]
        with self._lock:
            self._nodes = {n.node_id: n for n in nodes}
        return nodes

    def _node(self, row: dict[str, Any]) -> SwarmNode:
        description = row.get("Description") or {}
        generic = (description.get("Resources") or {}).get("GenericResources") or []
        gpus = []
        for resource in generic:
            named = resource.get("NamedResourceSpec") or {}
            discrete = resource.get("DiscreteResourceSpec") or {}
            if named.get("Kind") == self.gpu_resource:
                gpus.append(str(named.get("Value")))
            elif discrete.get("Kind") == self.gpu_resource:
                gpus.extend(str(i) for i in range(int(discrete.get("Value", 0))))
        labels = (row.get("Spec") or {}).get("Labels") or {}
        try:
            memory = float(labels[GPU_MEMORY_LABEL]) if GPU_MEMORY_LABEL in labels else None
        except ValueError:
            memory = None
        return SwarmNode(
            str(row.get("ID")),
            str(description.get("Hostname", "?")),
            str((row.get("Status") or {}).get("State", "unknown")),
            str((row.get("Spec") or {}).get("Availability", "active")),
            tuple(sorted(gpus)),
            memory,
        )

    def gpu_devices(self) -> tuple[str, ...]:
        """``NODE/GPU`` for every GPU the swarm's nodes advertise (WANWU_GPUS=auto)."""
        nodes = sorted(self.nodes(), key=lambda n: n.hostname)
        return tuple(f"{n.hostname}/{gpu}" for n in nodes for gpu in n.gpus)

    def gpu_monitor(self, devices: tuple[str, ...]) -> SwarmGpuMonitor:
        nodes = {n.hostname: n for n in self.nodes()}  # readings from the start, not after the first poll
        for device in devices:
            node = nodes.get(device.partition("/")[0])
            if node is None:
                log.warning("GPU %s: the swarm has no node %s", device, device.partition("/")[0])
            elif node.gpu_memory_mb is None:
                log.warning(
                    "GPU %s: node %s has no %s label; its GPUs are not used (docker node update --label-add %s=MB %s)",
                    device,
                    node.hostname,
                    GPU_MEMORY_LABEL,
                    GPU_MEMORY_LABEL,
                    node.hostname,
                )
        return SwarmGpuMonitor(self, devices)

    def gpu_readings(self, devices: tuple[str, ...]) -> list[GpuReading]:
        """A reading for each of ``devices`` on a node labelled with its GPU size: used is
        what this pool's workers there measured, or all of it while the node is down or
        drained."""
        with self._lock:
            nodes = {n.hostname: n for n in self._nodes.values()}
            used: dict[str, float] = {}
            for worker in self._workers.values():
                if worker.device:
                    used[worker.device] = used.get(worker.device, 0.0) + worker.gpu_mb
        readings = []
        for device in devices:
            node = nodes.get(device.partition("/")[0])
            if node is None or node.gpu_memory_mb is None:
                continue  # not a GPU the pool can use (gpu_monitor said so)
            if node.state != "ready" or node.availability != "active":
                # Full, not absent: with no reading at all the pool would start CPU workers.
                readings.append(GpuReading(device, node.gpu_memory_mb, node.gpu_memory_mb))
                continue
            readings.append(GpuReading(device, used.get(device, 0.0), node.gpu_memory_mb))
        return readings

    # -- workers -----------------------------------------------------------------

    def _labels(self, request: SpawnRequest) -> dict[str, str]:
        return worker_labels(self.pool_id, request.model, request.worker_id, request.stem)

    def _task_template(self, request: SpawnRequest, secret_id: str, secret_name: str) -> docker.types.TaskTemplate:
        limits = self.limits
        target, model_env = model_mount(request.stem)
        environment = {
            **model_env,
            "WANWU_LISTEN": f"0.0.0.0:{WORKER_PORT}",
            "WANWU_SECRET_FILE": f"/run/secrets/{SECRET_FILE}",
            **self.environment,
        }
        constraints = list(self.constraints)
        if request.device:
            node, gpu = split_device(request.device)
            constraints.append(f"node.hostname=={node}")
            environment["NVIDIA_VISIBLE_DEVICES"] = gpu  # the NVIDIA runtime shows it this GPU alone
        else:
            environment["CUDA_VISIBLE_DEVICES"] = ""  # as the local backend: a CPU worker sees no GPU
        mounts = [
            docker.types.Mount(target, str(request.model_dir), type="bind", read_only=True),
            docker.types.Mount("/tmp", None, type="tmpfs", tmpfs_size=parse_size(limits.tmpfs_size), tmpfs_mode=0o1777),
            docker.types.Mount(
                "/dev/shm", None, type="tmpfs", tmpfs_size=parse_size(limits.shm_size), tmpfs_mode=0o1777
            ),
        ]
        container = docker.types.ContainerSpec(
            self.image,
            args=["serve"],
            env=[f"{k}={v}" for k, v in environment.items()],
            user=f"{WORKER_UID}:{WORKER_UID}",
            labels=self._labels(request),
            mounts=mounts,
            read_only=True,
            cap_drop=["ALL"],
            stop_grace_period=2_000_000_000,
            secrets=[
                docker.types.SecretReference(
                    secret_id, secret_name, filename=SECRET_FILE, uid=str(WORKER_UID), gid=str(WORKER_UID), mode=0o400
                )
            ],
        )
        memory = parse_size(limits.memory)
        resources = docker.types.Resources(
            cpu_limit=int(limits.cpus * 1e9) if limits.cpus else None,
            mem_limit=memory,
            mem_reservation=memory,  # swarm places no more workers on a node than its memory holds
        )
        resources.setdefault("Limits", {})["Pids"] = limits.pids  # API 1.41; docker-py has no argument for it
        return docker.types.TaskTemplate(
            container,
            resources=resources,
            restart_policy=docker.types.RestartPolicy(condition="none"),  # the pool replaces workers, not swarm
            placement=docker.types.Placement(constraints=constraints) if constraints else None,
            networks=[{"Target": self._network()}],
        )

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
        token = secrets.token_urlsafe(32)
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
                remote = _Remote(request.worker_id, str(service["ID"]), token, request.device)
                with self._lock:
                    self._workers[request.worker_id] = remote
                try:
                    self._wait_running(remote, name, deadline)
                    created = time.monotonic()
                    health = self._wait_healthy(remote, name, deadline)
                    break
                except _NodeLost as exc:
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
                raise BackendUnavailable(f"the swarm manager cannot create {name}: {_first_line(exc)}") from exc
            raise WorkerStartError(f"cannot create worker {name}: {_first_line(exc)}", request.worker_id) from exc
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"the swarm manager does not answer: {_first_line(exc)}") from exc

    def _tasks(self, service_id: str) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.tasks(filters={"service": service_id}))
        except docker.errors.NotFound:
            raise WorkerStartError(f"service {service_id} was removed while it started", service_id) from None
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list the tasks of {service_id}: {_first_line(exc)}") from exc

    def _wait_running(self, remote: _Remote, name: str, deadline: float) -> None:
        """Until the service's task runs; its node and address on the worker network."""
        network = self._network()
        last = "no task yet"
        next_check = time.monotonic() + 0.5
        if remote.device:  # its node went down since the pool chose it: the task would wait for it
            node = split_device(remote.device)[0]
            down = [n for n in self.nodes() if n.hostname == node and n.state in LOST_NODE_STATES]
            if down:
                raise _NodeLost(
                    f"worker {name} is for GPU {remote.device}, whose node is {down[0].state}", remote.worker_id
                )
        unplaced_since: float | None = None
        while True:
            for task in self._tasks(remote.service_id):
                status = task.get("Status") or {}
                state = status.get("State", "?")
                last = _status(task)
                if task.get("NodeID") and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    self._check_node(str(task["NodeID"]), name, remote.worker_id)
                if state == "running":
                    remote.task_id, remote.node_id = str(task["ID"]), str(task.get("NodeID", ""))
                    remote.address = _address_on(task, network)
                    if not remote.address:
                        raise WorkerStartError(
                            f"worker {name} runs without an address on {self.network}", remote.worker_id
                        )
                    return
                if state in DONE_STATES:
                    raise WorkerStartError(
                        f"worker {name} (image {self.image}) did not start: {last}{self._logs(remote.service_id)}",
                        remote.worker_id,
                    )
                if state == "pending" and "no suitable node" in str(status.get("Err")):
                    unplaced_since = unplaced_since or time.monotonic()
                    if time.monotonic() - unplaced_since >= UNPLACED_GRACE_S:  # every node is full or excluded
                        raise WorkerStartError(f"no swarm node can take worker {name}: {last}", remote.worker_id)
            if time.monotonic() >= deadline:
                raise WorkerStartTimeout(
                    f"worker {name} was not running within {self.spawn_timeout_s:g} s; its task is {last}",
                    remote.worker_id,
                )
            time.sleep(0.05)

    def _wait_healthy(self, remote: _Remote, name: str, deadline: float) -> dict[str, Any]:
        """Until the worker answers /healthz with its secret (its port opens only once
        the model is warm); the task is checked every 0.5 s, so a crash shows at once."""
        next_check = time.monotonic() + 0.5
        error = "no answer yet"
        while True:
            client = WorkerClient((remote.address, WORKER_PORT), remote.worker_id, 2.0, remote.secret)
            try:
                return client.health(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
            except WanwuError as exc:
                error = str(exc)
            finally:
                client.close()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.5
                task = next((t for t in self._tasks(remote.service_id) if t.get("ID") == remote.task_id), None)
                state = ((task or {}).get("Status") or {}).get("State", "gone")
                self._check_node(remote.node_id, name, remote.worker_id)
                if state != "running":
                    raise WorkerStartError(
                        f"worker {name} (image {self.image}) stopped while starting ({state})"
                        f"{self._logs(remote.service_id)}",
                        remote.worker_id,
                    )
            if now >= deadline:
                raise WorkerStartTimeout(
                    f"worker {name} at {remote.address}:{WORKER_PORT} did not answer within {self.spawn_timeout_s:g} s "
                    f"({error}); is the gateway attached to the network {self.network}?{self._logs(remote.service_id)}",
                    remote.worker_id,
                )
            time.sleep(0.05)

    def _check_node(self, node_id: str, name: str, worker_id: str) -> None:
        """WorkerStartError if the node a starting worker was placed on is not ready: a
        task assigned to a node that has just died would never start."""
        node = next((n for n in self.nodes() if n.node_id == node_id), None)
        if node is None or node.state in LOST_NODE_STATES:
            where = node.hostname if node else node_id
            raise _NodeLost(
                f"worker {name} was placed on node {where}, which is {node.state if node else 'gone'}", worker_id
            )

    def _logs(self, service_id: str, lines: int = 20) -> str:
        try:
            raw = self.client.api.service_logs(service_id, stdout=True, stderr=True, tail=lines)
            text = b"".join(raw).decode("utf-8", "replace").rstrip() if not isinstance(raw, bytes) else raw.decode()
        except ENGINE_ERRORS as exc:
            return f"; logs unavailable: {_first_line(exc)}"
        return f"; last log lines:\n{text}" if text else ""

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
        self._remove_secret(name)

    def _remove_service(self, name: str) -> None:
        try:
            self.client.api.remove_service(name)
        except docker.errors.NotFound:
            pass
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot remove service {name}: {_first_line(exc)}") from exc

    def _remove_secret(self, name: str) -> None:
        # A secret is in use until the manager has processed its service's removal.
        for attempt in range(20):
            try:
                self.client.api.remove_secret(name)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if "in use" not in str(exc) or attempt == 19:
                    log.warning("cannot remove secret %s: %s", name, _first_line(exc))
                    return
            except ENGINE_ERRORS as exc:
                log.warning("cannot remove secret %s: %s", name, _first_line(exc))
                return
            time.sleep(0.1)

    def _services(self) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.services(filters={"label": f"{POOL_LABEL}={self.pool_id}"}))
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list services: {_first_line(exc)}") from exc

    def list_workers(self) -> list[ManagedWorker]:
        services = self._services()
        try:
            tasks = self.client.api.tasks(filters={"desired-state": "running"})
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list tasks: {_first_line(exc)}") from exc
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
        try:
            leftovers = self.client.api.secrets(filters={"label": f"{POOL_LABEL}={self.pool_id}"})
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list secrets: {_first_line(exc)}") from exc
        for secret in leftovers:
            self._remove_secret(str((secret.get("Spec") or {}).get("Name", secret.get("ID"))))
        return removed

    def connect(self, worker_id: str, timeout: float) -> WorkerClient:
        with self._lock:
            remote = self._workers.get(worker_id)
            if remote is None or not remote.address:
                raise WorkerStartError(f"worker {worker_id} is not known to the swarm backend", worker_id)
            client = WorkerClient((remote.address, WORKER_PORT), worker_id, timeout, remote.secret)
            remote.clients.add(client)
        return client

    def watch(self, on_exit: ExitCallback, on_reconnect: Callable[[], None], stop: threading.Event) -> None:
        """Poll the manager every POLL_S for the nodes and this pool's tasks; report a
        worker gone (module doc). After losing the manager, reconcile once it is back."""
        lost, failures = False, 0
        while not stop.is_set():
            try:
                gone = self._gone()
            except WanwuError as exc:
                if not lost:
                    log.warning("lost the swarm manager: %s", exc)
                lost, failures = True, failures + 1
                stop.wait(min(5.0, 0.1 * 2**failures))
                continue
            except Exception:  # the watcher must not die silently
                log.exception("swarm watcher failed; going on")
                stop.wait(1.0)
                continue
            try:
                if lost:
                    log.info("the swarm manager answers again; reconciling the pool")
                    lost, failures = False, 0
                    on_reconnect()
                for remote, reason in gone:
                    log.warning("worker %s is gone: %s", remote.worker_id, reason)
                    self._abort(remote, reason)
                    on_exit(remote.worker_id, reason)
            except Exception:  # the watcher must not die silently
                log.exception("swarm watcher failed while reporting; going on")
            stop.wait(POLL_S)

    def _gone(self) -> list[tuple[_Remote, str]]:
        """Ready workers whose task stopped, was replaced or whose node is down."""
        nodes = {n.node_id: n for n in self.nodes()}
        with self._lock:
            watched = [r for r in self._workers.values() if r.ready]
        if not watched:
            return []
        try:  # all tasks, matched here: a service filter fails if one of them was just removed
            tasks = {str(t["ID"]): t for t in self.client.api.tasks()}
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list tasks: {_first_line(exc)}") from exc
        gone = []
        for remote in watched:
            task = tasks.get(remote.task_id)
            node = nodes.get(remote.node_id)
            reason = None
            if task is None:
                reason = "its task was removed"
            elif (task.get("Status") or {}).get("State") != "running":
                reason = f"its task is {_status(task)}"
            elif task.get("DesiredState") not in (None, "running"):
                reason = f"swarm is stopping its task ({task.get('DesiredState')})"
            elif node is None or node.state in LOST_NODE_STATES:
                reason = f"its node {node.hostname if node else remote.node_id} is {node.state if node else 'gone'}"
            if reason:
                with self._lock:
                    remote.ready = False  # reported once
                gone.append((remote, reason))
        return gone

    def _abort(self, remote: _Remote, reason: str) -> None:
        with self._lock:  # connect() adds to the set under the lock
            clients = list(remote.clients)
        for client in clients:
            client.abort(reason)

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


class SwarmGpuMonitor:
    """The pool's GPU readings on a swarm (a ``GpuReader``): ``gpu_readings``. Another
    tenant's use of the same GPU is not seen; a node without the label offers its GPUs
    to nobody (the gateway's log and ``wanwu doctor`` say so)."""

    def __init__(self, backend: SwarmBackend, devices: tuple[str, ...]) -> None:
        self.backend = backend
        self.devices = devices

    def readings(self) -> list[GpuReading]:
        return self.backend.gpu_readings(self.devices) if self.devices else []

    def close(self) -> None:
        pass


def _status(task: dict[str, Any]) -> str:
    """A task's state and swarm's reason for it, e.g. "rejected: no suitable node"."""
    status = task.get("Status") or {}
    return f"{status.get('State')}: {status.get('Err') or status.get('Message') or ''}".rstrip(": ")


def _address_on(task: dict[str, Any], network_id: str) -> str:
    for attachment in task.get("NetworksAttachments") or []:
        if (attachment.get("Network") or {}).get("ID") == network_id:
            for address in attachment.get("Addresses") or []:
                return str(address).split("/")[0]
    return ""
