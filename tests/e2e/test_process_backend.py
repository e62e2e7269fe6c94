"""The gateway with WANWU_BACKEND=process: workers are local processes, served over
HTTP like containers; a gateway killed with SIGKILL leaves its workers running, and the
next gateway of the same pool id kills them before it serves."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import docker
import pytest
import requests

from tests.gatewayproc import kill_hard, running_gateway
from tests.images import demo_images, truncated_png
from tests.workerprocs import worker_processes

pytestmark = pytest.mark.docker  # the demo bundle is copied out of the worker image


@pytest.fixture
def workdir(tmp_path: Path, docker_client: docker.DockerClient) -> Path:
    """Gateway directories whose models directory holds the demo bundle already (with
    the process backend `wanwu serve` would train it: a minute)."""
    from tests.dockerutil import demo_bundle_dir

    for name in ("models", "first/models", "second/models"):
        demo_bundle_dir(tmp_path / name)
    return tmp_path


def predict(url: str, data: bytes) -> requests.Response:
    return requests.post(url + "/v1/models/demo-shapes/predict", files={"image": ("a.png", data)}, timeout=60)


def test_a_process_worker_serves_and_survives_a_bad_upload(workdir: Path, docker_client: docker.DockerClient) -> None:
    settings = {"backend": "process", "stem_cells": "0", "max_workers": "1"}
    with running_gateway(workdir, docker_client, **settings) as gw:
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


def test_workers_of_a_sigkilled_gateway_die_with_the_next(workdir: Path, docker_client: docker.DockerClient) -> None:
    sockets = tempfile.mkdtemp(prefix="wg-", dir="/tmp")
    settings = {"backend": "process", "stem_cells": "0", "pool_id": "pk" + os.urandom(3).hex(), "socket_dir": sockets}
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
