"""The gateway with WANWU_BACKEND=process: workers are local processes, served over
HTTP like containers; a gateway killed with SIGKILL leaves its workers running, and the
next gateway of the same pool id kills them before it serves. Under root (as here) the
workers run as uid 10001, so their interpreter and bundles must be open to that uid:
the gateway's directories are made under /tmp (tmp_path is root's alone)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from tests.gatewayproc import kill_hard, running_gateway
from tests.images import demo_images, truncated_png
from tests.workerprocs import (
    open_directory,
    process_environment,
    process_ids,
    python_for_workers,
    run_as,
    seed_general,
    worker_processes,
)

pytestmark = pytest.mark.docker  # the demo bundle is copied out of the worker image


@pytest.fixture
def workdir(docker_client: docker.DockerClient, general_bundles: tuple[Path, Path]) -> Iterator[Path]:
    """Gateway directories whose models directory holds the demo bundle already (with
    the process backend `wanwu serve` would train it: a minute) and the general model
    (made once for the session), open to uid 10001."""
    from tests.dockerutil import demo_bundle_dir

    path = open_directory("wanwu-e2e-")
    try:
        for name in ("models", "first/models", "second/models"):
            demo_bundle_dir(path / name)
            seed_general(path / name, general_bundles)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def python(workdir: Path) -> str:
    """The worker interpreter: one uid 10001 can run (under root)."""
    return python_for_workers(workdir) if os.geteuid() == 0 else ""


def predict(url: str, data: bytes) -> requests.Response:
    return requests.post(url + "/v1/models/demo-shapes/predict", files={"image": ("a.png", data)}, timeout=60)


def test_a_process_worker_serves_and_survives_a_bad_upload(
    workdir: Path, python: str, docker_client: docker.DockerClient
) -> None:
    # This gateway makes its default model itself, as one on a fresh machine does (the
    # other tests here are given it).
    for made in ("general", "general-embed"):
        shutil.rmtree(workdir / "models" / made)
    settings = {"backend": "process", "stem_cells": "0", "max_workers": "1", "worker_python": python}
    with running_gateway(workdir, docker_client, **settings) as gw:
        assert (gw.models_dir / "general" / "model.json").is_file()  # ready: the default model was made
        assert (gw.models_dir / "general-embed" / "model.json").is_file()
        label, image = next(iter(demo_images(seed=5).items()))
        first = predict(gw.url, image)
        assert first.status_code == 200, first.text
        assert first.json()["predictions"][0]["label"] == label and first.json()["cold_start"]
        (process,) = worker_processes(gw.pool_id)
        assert process.model == "demo-shapes"
        bad = predict(gw.url, truncated_png())  # passes the gateway's sniffing; the worker refuses it
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "corrupt_image"
        again = predict(gw.url, image)
        assert again.status_code == 200 and not again.json()["cold_start"]
        assert worker_processes(gw.pool_id) == [process]  # the same worker, still alive
        pool = requests.get(gw.url + "/v1/pool", timeout=10).json()
        assert [w["id"] for w in pool["workers"]] == [process.worker_id]
        ready = requests.get(gw.url + "/readyz", timeout=10).json()
        assert "worker_python" in ready["checks"] and "limits" in ready["checks"]
    assert worker_processes(gw.pool_id) == []  # SIGTERM to the gateway stopped its worker


def test_workers_of_a_sigkilled_gateway_die_with_the_next(
    workdir: Path, python: str, docker_client: docker.DockerClient
) -> None:
    sockets = tempfile.mkdtemp(prefix="wg-", dir="/tmp")
    os.chmod(sockets, 0o711)  # workers as uid 10001 pass through it to their own directories
    settings = {
        "backend": "process",
        "stem_cells": "0",
        "pool_id": "pk" + os.urandom(3).hex(),
        "socket_dir": sockets,
        "worker_python": python,
    }
    image = next(iter(demo_images().values()))
    with running_gateway(workdir / "first", docker_client, **settings) as first:
        assert predict(first.url, image).status_code == 200
        (orphan,) = worker_processes(first.pool_id)
        kill_hard(first.process)
        time.sleep(1.5)  # what a gateway that was still alive would do by now
        assert worker_processes(first.pool_id) == [orphan]  # it outlived its gateway
        with running_gateway(workdir / "second", docker_client, **settings) as second:
            # Ready means the orphans are gone: the pool removes them before it serves.
            assert worker_processes(second.pool_id) == []
            answer = predict(second.url, image)
            assert answer.status_code == 200 and answer.json()["cold_start"], answer.text
            (fresh,) = worker_processes(second.pool_id)
            assert fresh.worker_id != orphan.worker_id
    assert worker_processes(first.pool_id) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a gateway changes its workers' user only as root")
def test_a_root_gateways_worker_is_uid_10001_without_its_secrets_or_write_access_to_bundles(
    workdir: Path, python: str, docker_client: docker.DockerClient
) -> None:
    token = "an-admin-token-of-32-characters!"
    secrets = {"WANWU_ADMIN_TOKEN": token, "GATEWAY_ONLY_SECRET": "a credential the gateway was given"}
    settings = {"backend": "process", "stem_cells": "0", "max_workers": "1", "worker_python": python}
    with running_gateway(workdir, docker_client, environment=secrets, **settings) as gw:
        assert predict(gw.url, next(iter(demo_images().values()))).status_code == 200
        (worker,) = worker_processes(gw.pool_id)
        assert process_ids(worker.pid) == (10001, 10001, [])  # not the gateway's uid 0, and no groups
        assert process_environment(gw.process.pid)["WANWU_ADMIN_TOKEN"] == token
        env = process_environment(worker.pid)
        assert not set(secrets) & set(env), "the worker was given the gateway's secrets"
        # Nor can it read them where the gateway keeps them: its /proc is not the worker's.
        assert run_as(worker.pid, "cat", f"/proc/{gw.process.pid}/environ").returncode != 0
        # It reads its bundle, and can change neither it nor the models directory.
        bundle = gw.models_dir / "demo-shapes"
        assert run_as(worker.pid, "cat", str(bundle / "model.json")).returncode == 0
        for target in (bundle / "model.json", bundle / "new", gw.models_dir / "new"):
            assert run_as(worker.pid, "touch", str(target)).returncode != 0, f"the worker could write {target}"
        # The socket it answers on is its own alone.
        socket = gw.socket_dir / gw.pool_id / worker.worker_id / "worker.sock"
        assert oct(socket.stat().st_mode & 0o777) == "0o600" and socket.stat().st_uid == 10001
