"""A worker's container on this engine (``docker.py``): what it needs (``WorkerSpec``),
the user it runs as, its socket directory on the host, and the options it runs with.

Every container is hardened: no network at all, read-only root with a small tmpfs at
/tmp, a non-root user, every capability dropped, no-new-privileges, memory and pids
limits, the model bundle mounted read-only at /model, and the worker's socket directory
(a per-worker host directory) at /run/wanwu. GPUs are requested through device requests.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.types
from wanwu_worker import contract

from .base import WORKER_UID
from .docker_common import ContainerLimits, container_name, model_mount, worker_labels

SOCKET_DIR_IN_CONTAINER = "/run/wanwu"


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
    stem: bool = False  # model_dir is the whole models directory, mounted at /models
    user: str = field(default_factory=lambda: container_user())

    @property
    def name(self) -> str:
        return container_name(self.pool_id, self.worker_id)

    @property
    def labels(self) -> dict[str, str]:
        return worker_labels(self.pool_id, self.model, self.worker_id, self.stem)


def container_user(euid: int | None = None, egid: int | None = None) -> str:
    """The user a worker container runs as: the image's (uid 10001) under a root gateway;
    else the gateway's own uid and gid, the only user besides root that can bind a socket
    in a directory of the gateway's that nobody else may enter (any uid but 0 is
    unprivileged inside the container)."""
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return f"{WORKER_UID}:{WORKER_UID}"
    return f"{euid}:{os.getegid() if egid is None else egid}"


def container_uid() -> int:
    return int(container_user().split(":")[0])


def prepare_socket_dir(path: Path, user: str | None = None) -> None:
    """Create the worker's socket directory, mode 0700 and owned by the user its
    container runs as (``container_user()``), so the worker can bind its socket there and
    nobody else on the host but root can reach it. A directory left there is replaced."""
    uid, gid = (int(part) for part in (user or container_user()).split(":"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.chmod(path, 0o700)  # the umask may have taken bits away, never added: this is exact
    if (uid, gid) != (os.geteuid(), os.getegid()):
        os.chown(path, uid, gid)


def run_options(spec: WorkerSpec, command: list[str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``client.containers.run`` (or ``create``) for ``spec``."""
    limits = spec.limits
    mount, model_env = model_mount(spec.stem)
    options: dict[str, Any] = {
        "image": spec.image,
        "command": command or ["serve"],
        "name": spec.name,
        "labels": spec.labels,
        "detach": True,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={limits.tmpfs_size},mode=1777"},
        "user": spec.user,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": limits.memory,
        "memswap_limit": limits.memory,
        "pids_limit": limits.pids,
        "shm_size": limits.shm_size,
        "volumes": {
            str(spec.model_dir): {"bind": mount, "mode": "ro"},
            str(spec.socket_dir): {"bind": SOCKET_DIR_IN_CONTAINER, "mode": "rw"},
        },
        "environment": {
            **model_env,
            contract.SOCKET: f"{SOCKET_DIR_IN_CONTAINER}/worker.sock",
            **spec.environment,
        },
    }
    if limits.cpus:
        options["nano_cpus"] = int(limits.cpus * 1e9)
    if spec.gpus:
        options["device_requests"] = [docker.types.DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])]
    else:
        # No device request: a CPU worker (a CPU fallback on a GPU host among them). Hide
        # any GPU an engine whose default runtime is nvidia would still show it.
        options["environment"]["CUDA_VISIBLE_DEVICES"] = ""
    return options
