"""A real gateway (``wanwu serve`` in a subprocess) over real worker containers."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest

from tests.dockerutil import engine
from tests.gatewayproc import Gateway, running_gateway


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return engine()


@pytest.fixture(scope="session")
def gateway(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # The demo model: these tests exercise the machinery on a model that answers in 2 ms;
    # tests/e2e/test_real_photos.py runs the general model on its own gateway.
    settings = {
        "max_workers": "2",
        "max_upload_mb": "2",
        "queue_timeout_s": "20",
        "idle_ttl_s": "120",
        "default_model": "demo-shapes",
    }
    with running_gateway(tmp_path_factory.mktemp("gateway"), docker_client, **settings) as gw:
        yield gw
