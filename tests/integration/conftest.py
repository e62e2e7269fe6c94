"""Integration fixtures: a real engine, the real worker image, hardened containers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from scheduler.backends.docker import MANAGED_LABEL, POOL_LABEL
from tests.dockerutil import Containers, demo_bundle_dir, engine


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return engine()


@pytest.fixture(scope="session")
def demo_model_dir(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_bundle_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def containers(docker_client: docker.DockerClient, demo_model_dir: Path) -> Iterator[Containers]:
    # Socket paths must stay short (108 bytes): a short root, not pytest's tmp path.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wanwu-it-", dir="/tmp") as root:
        made = Containers(docker_client, Path(root), demo_model_dir)
        yield made
        made.remove_all()
        left = docker_client.containers.list(
            all=True, filters={"label": [f"{MANAGED_LABEL}=true", f"{POOL_LABEL}={made.pool_id}"]}
        )
        assert not left, f"containers left behind: {[c.name for c in left]}"
