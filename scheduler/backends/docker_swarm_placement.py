"""Placing a swarm worker: its service's task (the container it runs, on which node and
with which GPU), and waiting until that task runs and the worker answers, watching its
node meanwhile. ``SwarmPlacement`` is a part of ``SwarmBackend`` (a mixin), on the
backend's own attributes (declared here for the type checker)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
import docker.types
from wanwu_worker import contract

from ..errors import BackendUnavailable, WanwuError, WorkerStartError, WorkerStartTimeout
from ..worker_client import WorkerClient
from .base import WORKER_UID, SpawnRequest
from .docker_common import ENGINE_ERRORS, ContainerLimits, first_line, model_mount, worker_labels
from .docker_swarm_network import WORKER_PORT, address_on, worker_network
from .docker_swarm_nodes import LOST_NODE_STATES, RemoteWorker, SwarmNodes, task_status
from .docker_swarm_secrets import SECRET_FILE, secret_reference
from .limits import parse_size

# The parts of the swarm backend log under the name it had before it was split.
log = logging.getLogger("scheduler.backends.docker_swarm")

UNPLACED_GRACE_S = 5.0  # a task swarm can place on no node fails after this, not the spawn timeout
DONE_STATES = ("complete", "shutdown", "failed", "rejected", "orphaned", "remove")


class NodeLost(WorkerStartError):
    """A starting worker's node is not ready: its task would never start."""


def split_device(device: str) -> tuple[str, str]:
    """``NODE/GPU`` as (node hostname, GPU name)."""
    node, sep, gpu = device.partition("/")
    if not sep or not node or not gpu:
        raise WorkerStartError(f"swarm GPU devices are NODE/GPU (e.g. gpu-1/GPU-0), not {device!r}", device)
    return node, gpu


class SwarmPlacement(SwarmNodes):
    """How ``SwarmBackend`` places a worker's task and waits for it (module doc)."""

    image: str
    pool_id: str
    network: str
    limits: ContainerLimits
    spawn_timeout_s: float
    environment: dict[str, str]
    constraints: tuple[str, ...]
    ipsec: Callable[[], tuple[bool, str]]
    _network_id: str | None

    def _network(self) -> str:
        """The worker network's id (``worker_network``: WorkerStartError unless it is a
        swarm overlay), looked up once."""
        if self._network_id is None:
            self._network_id = worker_network(self.client, self.network, self.ipsec)
        return self._network_id

    def _labels(self, request: SpawnRequest) -> dict[str, str]:
        return worker_labels(self.pool_id, request.model, request.worker_id, request.stem)

    def _task_template(self, request: SpawnRequest, secret_id: str, secret_name: str) -> docker.types.TaskTemplate:
        limits = self.limits
        target, model_env = model_mount(request.stem)
        environment = {
            **model_env,
            contract.LISTEN: f"0.0.0.0:{WORKER_PORT}",
            contract.SECRET_FILE: f"/run/secrets/{SECRET_FILE}",
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
            secrets=[secret_reference(secret_id, secret_name)],
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

    def _tasks(self, service_id: str) -> list[dict[str, Any]]:
        try:
            return list(self.client.api.tasks(filters={"service": service_id}))
        except docker.errors.NotFound:
            raise WorkerStartError(f"service {service_id} was removed while it started", service_id) from None
        except ENGINE_ERRORS as exc:
            raise BackendUnavailable(f"cannot list the tasks of {service_id}: {first_line(exc)}") from exc

    def _wait_running(self, remote: RemoteWorker, name: str, deadline: float) -> None:
        """Until the service's task runs; its node and address on the worker network."""
        network = self._network()
        last = "no task yet"
        next_check = time.monotonic() + 0.5
        if remote.device:  # its node went down since the pool chose it: the task would wait for it
            node = split_device(remote.device)[0]
            down = [n for n in self.nodes() if n.hostname == node and n.state in LOST_NODE_STATES]
            if down:
                raise NodeLost(
                    f"worker {name} is for GPU {remote.device}, whose node is {down[0].state}", remote.worker_id
                )
        unplaced_since: float | None = None
        while True:
            for task in self._tasks(remote.service_id):
                status = task.get("Status") or {}
                state = status.get("State", "?")
                last = task_status(task)
                if task.get("NodeID") and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    self._check_node(str(task["NodeID"]), name, remote.worker_id)
                if state == "running":
                    remote.task_id, remote.node_id = str(task["ID"]), str(task.get("NodeID", ""))
                    remote.address = address_on(task, network)
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

    def _wait_healthy(self, remote: RemoteWorker, name: str, deadline: float) -> dict[str, Any]:
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
            raise NodeLost(
                f"worker {name} was placed on node {where}, which is {node.state if node else 'gone'}", worker_id
            )

    def _logs(self, service_id: str, lines: int = 20) -> str:
        try:
            raw = self.client.api.service_logs(service_id, stdout=True, stderr=True, tail=lines)
            text = b"".join(raw).decode("utf-8", "replace").rstrip() if not isinstance(raw, bytes) else raw.decode()
        except ENGINE_ERRORS as exc:
            return f"; logs unavailable: {first_line(exc)}"
        return f"; last log lines:\n{text}" if text else ""
