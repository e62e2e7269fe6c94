"""Run workers as Docker containers (the docker SDK is imported here and in
docker_image.py only).

Every container is hardened: no network at all, read-only root with a small tmpfs at
/tmp, a non-root user, every capability dropped, no-new-privileges, memory and pids
limits, the model bundle mounted read-only at /model, and the worker's socket directory
(a per-worker host directory) at /run/wanwu. GPUs are requested through device requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.types

MANAGED_LABEL = "wanwu.managed"
POOL_LABEL = "wanwu.pool"
MODEL_LABEL = "wanwu.model"
WORKER_LABEL = "wanwu.worker"
SOCKET_DIR_IN_CONTAINER = "/run/wanwu"
MODEL_DIR_IN_CONTAINER = "/model"
WORKER_UID = 10001


@dataclass(frozen=True)
class ContainerLimits:
    """Per-container resource limits."""

    memory: str = "2g"
    pids: int = 512
    tmpfs_size: str = "256m"
    cpus: float | None = None
    shm_size: str = "64m"


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker container needs: image, model bundle, socket directory, labels."""

    image: str
    pool_id: str
    model: str
    worker_id: str
    model_dir: Path
    socket_dir: Path
    gpus: tuple[str, ...] = ()
    limits: ContainerLimits = field(default_factory=ContainerLimits)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"wanwu-{self.pool_id}-{self.worker_id}"

    @property
    def labels(self) -> dict[str, str]:
        return {MANAGED_LABEL: "true", POOL_LABEL: self.pool_id, MODEL_LABEL: self.model, WORKER_LABEL: self.worker_id}


def prepare_socket_dir(path: Path) -> None:
    """Create the worker's socket directory so the container's non-root user can bind
    its socket there, and nobody else on the host can reach it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, WORKER_UID, WORKER_UID)
        os.chmod(path, 0o700)
    else:
        # Without root the directory cannot be handed to the worker's uid.
        os.chmod(path, 0o777)


def run_options(spec: WorkerSpec, command: list[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.run`` (or ``create``) for ``spec``."""
    limits = spec.limits
    options: dict[str, Any] = {
        "image": spec.image,
        "command": command or ["serve"],
        "name": spec.name,
        "labels": spec.labels,
        "detach": True,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={limits.tmpfs_size},mode=1777"},
        "user": f"{WORKER_UID}:{WORKER_UID}",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": limits.memory,
        "memswap_limit": limits.memory,
        "pids_limit": limits.pids,
        "shm_size": limits.shm_size,
        "volumes": {
            str(spec.model_dir): {"bind": MODEL_DIR_IN_CONTAINER, "mode": "ro"},
            str(spec.socket_dir): {"bind": SOCKET_DIR_IN_CONTAINER, "mode": "rw"},
        },
        "environment": {
            "WANWU_MODEL_DIR": MODEL_DIR_IN_CONTAINER,
            "WANWU_SOCKET": f"{SOCKET_DIR_IN_CONTAINER}/worker.sock",
            **spec.environment,
        },
    }
    if limits.cpus:
        options["nano_cpus"] = int(limits.cpus * 1e9)
    if spec.gpus:
        options["device_requests"] = [docker.types.DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])]
    return options
