"""Integration fixtures: a real engine, the real worker image, hardened containers."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tests.dockerutil import Containers, demo_bundle_dir, engine
from tests.integration.pools import BACKENDS, PoolFactory, make_slow_bundle


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
        made.close()


@pytest.fixture(scope="module")
def models_dir(demo_model_dir: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="wanwu-models-"))
    root.chmod(0o755)  # stem cells read bundles through the directory itself
    shutil.copytree(demo_model_dir, root / "demo-shapes")
    other = root / "demo-other"
    shutil.copytree(demo_model_dir, other)
    config = json.loads((other / "model.json").read_text(encoding="utf-8"))
    config["name"] = "demo-other"
    (other / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    make_slow_bundle(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def socket_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="wit-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def pools(
    request: pytest.FixtureRequest, docker_client: docker.DockerClient, models_dir: Path, socket_root: Path
) -> Iterator[PoolFactory]:
    """Pools over each backend in turn; a test for one backend only parametrises
    ``pools`` indirectly with its name."""
    factory = PoolFactory(request.param, docker_client, models_dir, socket_root)
    yield factory
    for pool in factory.pools:
        pool.shutdown(grace_s=1)
    for pool_id in factory.pool_ids:
        left = factory.remove_leftovers(pool_id)
        assert not left, f"pool {pool_id} ({factory.backend}) left workers behind: {left}"
