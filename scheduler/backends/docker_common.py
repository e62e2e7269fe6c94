"""What the two Docker backends share (``docker.py``: containers on this engine;
``docker_swarm.py``: services across a swarm): the labels every worker carries, where a
worker's bundle is mounted and what tells the worker so, the engine's errors and a
client of it, resource limits, the one-shot bundle builder, and whether stem cells
could read the models directory."""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests
from wanwu_worker import contract

from ..errors import BackendUnavailable, ImageBuildError
from .base import BUILDER, WORKER_UID

MANAGED_LABEL = "wanwu.managed"
POOL_LABEL = "wanwu.pool"
MODEL_LABEL = "wanwu.model"
WORKER_LABEL = "wanwu.worker"
STEM_LABEL = "wanwu.stem"
MODEL_DIR_IN_CONTAINER = "/model"
MODELS_DIR_IN_CONTAINER = "/models"  # a stem cell's view of every bundle


# What a call to an engine raises when the engine refuses, fails or cannot be reached.
ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


@dataclass(frozen=True)
class ContainerLimits:
    """Per-container resource limits."""

    memory: str = "2g"
    pids: int = 512
    tmpfs_size: str = "256m"
    cpus: float | None = None
    shm_size: str = "64m"


def worker_labels(pool_id: str, model: str, worker_id: str, stem: bool) -> dict[str, str]:
    """The labels of a worker (its container, or its swarm service), whichever backend."""
    labels = {MANAGED_LABEL: "true", POOL_LABEL: pool_id, MODEL_LABEL: model, WORKER_LABEL: worker_id}
    if stem:
        labels[STEM_LABEL] = "true"
    return labels


def model_mount(stem: bool) -> tuple[str, dict[str, str]]:
    """Where a worker's bundle (or, for a stem cell, the whole models directory) is
    mounted, and the environment that tells the worker so."""
    if stem:
        return MODELS_DIR_IN_CONTAINER, {contract.MODELS_ROOT: MODELS_DIR_IN_CONTAINER, contract.STEM: "1"}
    return MODEL_DIR_IN_CONTAINER, {contract.MODEL_DIR: MODEL_DIR_IN_CONTAINER}


def engine_client(what: str) -> docker.DockerClient:
    """A client of the engine ``DOCKER_HOST`` names; BackendUnavailable naming ``what``."""
    try:
        return docker.from_env(timeout=60)
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(f"cannot reach {what}: {first_line(exc)}") from exc


def container_name(pool_id: str, worker_id: str) -> str:
    return f"wanwu-{pool_id}-{worker_id}"


def run_builder(
    client: docker.DockerClient,
    image: str,
    limits: ContainerLimits,
    arguments: list[str],
    out_dir: Path,
    timeout: float,
) -> None:
    """``Backend.build_bundle`` in a container of ``image``: no network, read-only root,
    no capabilities, ``out_dir`` (a fresh, private directory) mounted at /out and owned
    by the user the container runs as while it builds: the caller's own user, or, for
    root, the worker's (and the result handed back to root after). Raises
    ImageBuildError with the builder's last lines if it fails."""
    out_dir = out_dir.resolve()
    root = os.getuid() == 0
    user = f"{WORKER_UID}:{WORKER_UID}" if root else f"{os.getuid()}:{os.getgid()}"
    if root:
        os.chown(out_dir, WORKER_UID, WORKER_UID)
    prefix = f"{out_dir}/"
    command = [f"/out/{a[len(prefix) :]}" if a.startswith(prefix) else a for a in arguments]
    name = f"wanwu-bundle-build-{uuid.uuid4().hex[:8]}"
    status, errors = None, ""
    try:
        container = client.containers.run(
            image,
            entrypoint=["python", *BUILDER],
            command=command,
            name=name,
            detach=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={limits.tmpfs_size},mode=1777"},
            user=user,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=limits.memory,
            memswap_limit=limits.memory,
            pids_limit=limits.pids,
            environment={"HOME": "/tmp"},
            volumes={str(out_dir): {"bind": "/out", "mode": "rw"}},
            labels={MANAGED_LABEL: "true", POOL_LABEL: "bundle-build"},
        )
        status = container.wait(timeout=timeout).get("StatusCode")
        errors = container.logs(stdout=False, stderr=True).decode("utf-8", "replace")
    except docker.errors.ImageNotFound as exc:
        raise ImageBuildError(f"worker image {image} is not present: run `wanwu image build`") from exc
    except ENGINE_ERRORS as exc:
        raise ImageBuildError(f"building a bundle in {image} failed: {first_line(exc)}") from exc
    finally:
        with contextlib.suppress(*ENGINE_ERRORS):  # by name: also one that was created but never started
            client.api.remove_container(name, force=True)
        if root:
            for path in (out_dir, *out_dir.rglob("*")):
                os.lchown(path, 0, 0)
    if status != 0:
        tail = "\n".join(errors.strip().splitlines()[-5:]) or f"exit status {status}"
        raise ImageBuildError(f"building a bundle in {image} failed:\n{tail}")


def stem_mount_problem(models_dir: Path, uid: int = WORKER_UID) -> str | None:
    """Why stem cells (``uid``: 10001, or a non-root gateway's own) could not reach bundles
    through the models directory, or None. They open ``/models/<name>``, so the directory
    must be searchable by them."""
    try:
        info = models_dir.stat()
    except OSError as exc:
        return f"stem cells cannot use the models directory {models_dir}: {exc.strerror or exc}"
    searchable = info.st_mode & (0o100 if info.st_uid == uid else 0o001)
    if not searchable:
        return (
            f"stem cells need the models directory {models_dir} searchable by the worker user (uid {uid}): "
            f"chmod o+x {models_dir}, or set WANWU_STEM_CELLS=0"
        )
    return None


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
