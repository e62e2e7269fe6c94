"""Helpers for tests that drive a real Docker engine: every container they make is
labelled with a per-session pool id, remembered, and force-removed at the end."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from scheduler.backends.docker_common import MANAGED_LABEL, POOL_LABEL
from scheduler.backends.docker_container import WorkerSpec, prepare_socket_dir, run_options
from scheduler.worker_client import WorkerClient

IMAGE = os.environ.get("WANWU_WORKER_IMAGE", "wanwu-worker:cpu")


def engine() -> docker.DockerClient:
    """The local engine, or a failure saying how to get one (never a skip)."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound as exc:
        raise RuntimeError(f"worker image {IMAGE} is missing: run `make image`") from exc
    except docker.errors.DockerException as exc:
        raise RuntimeError(f"no Docker engine ({exc}): run `make engine` or deploy/ensure-docker.sh") from exc
    return client


def demo_bundle_dir(dest: Path) -> Path:
    """Copy the image's built-in demo bundle out to ``dest`` (for mounting at /model)."""
    from scheduler.backends.docker_image import export_builtin_model

    return export_builtin_model(IMAGE, "demo-shapes", dest)


class Containers:
    """Starts hardened worker containers for one test session and removes them all."""

    def __init__(self, client: docker.DockerClient, root: Path, model_dir: Path) -> None:
        self.client = client
        self.root = root
        self.model_dir = model_dir
        self.pool_id = "test-" + uuid.uuid4().hex[:8]
        self.made: list[Container] = []

    def spec(self, worker_id: str | None = None, **overrides: Any) -> WorkerSpec:
        worker_id = worker_id or uuid.uuid4().hex[:8]
        socket_dir = self.root / worker_id
        prepare_socket_dir(socket_dir)
        fields: dict[str, Any] = {
            "image": IMAGE,
            "pool_id": self.pool_id,
            "model": "demo-shapes",
            "worker_id": worker_id,
            "model_dir": self.model_dir,
            "socket_dir": socket_dir,
        }
        fields.update(overrides)
        return WorkerSpec(**fields)

    def start(self, spec: WorkerSpec, command: list[str] | None = None, **extra: Any) -> Container:
        options = run_options(spec, command)
        options["volumes"].update(extra.pop("volumes", {}))
        options.update(extra)
        container = self.client.containers.run(**options)
        self.made.append(container)
        return container

    def run_once(self, image: str, command: list[str], **extra: Any) -> bytes:
        """Run a one-off container from ``image`` as locked down as a worker (no network,
        read-only, no capabilities), labelled for cleanup; its output."""
        out: bytes = self.client.containers.run(
            image,
            command,
            remove=True,
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": "size=64m"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            labels={MANAGED_LABEL: "true", POOL_LABEL: self.pool_id},
            **extra,
        )
        return out

    def serve(self, spec: WorkerSpec, timeout: float = 60) -> tuple[WorkerClient, Container]:
        """Start a worker server from ``spec`` and wait for its socket; a client for it."""
        container = self.start(spec)
        socket = spec.socket_dir / "worker.sock"

        def ready() -> bool:
            container.reload()
            assert container.status in ("created", "running"), container.logs().decode()[-2000:]
            return socket.exists()

        wait_for(ready, timeout, "the worker socket")
        return WorkerClient(str(socket), worker_id=spec.worker_id, timeout=timeout), container

    def remove_all(self) -> None:
        for container in self.client.containers.list(all=True, filters={"label": f"{POOL_LABEL}={self.pool_id}"}):
            container.remove(force=True)

    def close(self) -> None:
        """Remove every container of this session; fail if one would not go."""
        self.remove_all()
        left = self.client.containers.list(
            all=True, filters={"label": [f"{MANAGED_LABEL}=true", f"{POOL_LABEL}={self.pool_id}"]}
        )
        assert not left, f"containers left behind: {[c.name for c in left]}"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
