"""What the swarm backend knows of the swarm and its workers: the nodes (their state and
the GPUs they advertise), each worker's service, task, node and address, the pool's GPU
readings from node labels (``SwarmGpuMonitor``), and the watcher that reports a worker
gone when its task stops, is replaced or its node goes down. ``SwarmNodes`` is a part of
``SwarmBackend`` (a mixin), on the backend's own attributes (declared here for the type
checker)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import docker

from ..errors import BackendUnavailable, WanwuError
from ..policy import GpuReading
from ..worker_client import WorkerClient
from .base import ExitCallback
from .docker_common import ENGINE_ERRORS, first_line

# The parts of the swarm backend log under the name it had before it was split.
log = logging.getLogger("scheduler.backends.docker_swarm")

GPU_MEMORY_LABEL = "wanwu.gpu-memory-mb"  # a GPU node's label: the size of each of its GPUs
POLL_S = 0.5  # how often watch() reads the manager
LOST_NODE_STATES = ("down", "disconnected")  # not "unknown": every node is, for a moment, after a leader change


@dataclass
class RemoteWorker:
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


class SwarmNodes:
    """``SwarmBackend``'s view of the swarm's nodes, its GPU readings and its watcher."""

    gpu_resource: str
    _lock: threading.Lock
    _workers: dict[str, RemoteWorker]
    _nodes: dict[str, SwarmNode]

    if TYPE_CHECKING:  # SwarmBackend's own

        @property
        def client(self) -> docker.DockerClient: ...

    def nodes(self) -> list[SwarmNode]:
        """Every node of the swarm (BackendUnavailable if the manager does not answer)."""
        try:
            rows = self.client.api.nodes()
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list swarm nodes: {first_line(exc)}") from exc
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

    def _gone(self) -> list[tuple[RemoteWorker, str]]:
        """Ready workers whose task stopped, was replaced or whose node is down."""
        nodes = {n.node_id: n for n in self.nodes()}
        with self._lock:
            watched = [r for r in self._workers.values() if r.ready]
        if not watched:
            return []
        try:  # all tasks, matched here: a service filter fails if one of them was just removed
            tasks = {str(t["ID"]): t for t in self.client.api.tasks()}
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list tasks: {first_line(exc)}") from exc
        gone = []
        for remote in watched:
            task = tasks.get(remote.task_id)
            node = nodes.get(remote.node_id)
            reason = None
            if task is None:
                reason = "its task was removed"
            elif (task.get("Status") or {}).get("State") != "running":
                reason = f"its task is {task_status(task)}"
            elif task.get("DesiredState") not in (None, "running"):
                reason = f"swarm is stopping its task ({task.get('DesiredState')})"
            elif node is None or node.state in LOST_NODE_STATES:
                reason = f"its node {node.hostname if node else remote.node_id} is {node.state if node else 'gone'}"
            if reason:
                with self._lock:
                    remote.ready = False  # reported once
                gone.append((remote, reason))
        return gone

    def _abort(self, remote: RemoteWorker, reason: str) -> None:
        with self._lock:  # connect() adds to the set under the lock
            clients = list(remote.clients)
        for client in clients:
            client.abort(reason)


class SwarmGpuMonitor:
    """The pool's GPU readings on a swarm (a ``GpuReader``): ``gpu_readings``. Another
    tenant's use of the same GPU is not seen; a node without the label offers its GPUs
    to nobody (the gateway's log and ``wanwu doctor`` say so)."""

    def __init__(self, backend: SwarmNodes, devices: tuple[str, ...]) -> None:
        self.backend = backend
        self.devices = devices

    def readings(self) -> list[GpuReading]:
        return self.backend.gpu_readings(self.devices) if self.devices else []

    def close(self) -> None:
        pass


def task_status(task: dict[str, Any]) -> str:
    """A task's state and swarm's reason for it, e.g. "rejected: no suitable node"."""
    status = task.get("Status") or {}
    return f"{status.get('State')}: {status.get('Err') or status.get('Message') or ''}".rstrip(": ")
