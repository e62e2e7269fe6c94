"""A real gateway (``wanwu serve`` in a subprocess) over real worker containers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests

from scheduler.backends.docker import POOL_LABEL
from tests.dockerutil import IMAGE, engine

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    url: str
    pool_id: str
    process: subprocess.Popen[bytes]
    log: Path
    models_dir: Path

    def containers(self, client: docker.DockerClient) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = client.api.containers(
            all=True, filters={"label": f"{POOL_LABEL}={self.pool_id}"}
        )
        return rows


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the gateway was not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    return engine()


@pytest.fixture(scope="session")
def gateway(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    pool_id = "e2e" + uuid.uuid4().hex[:6]
    port = free_port()
    sockets = Path(tempfile.mkdtemp(prefix="we-", dir="/tmp"))
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    models_dir = tmp_path_factory.mktemp("models")
    env = {
        **os.environ,
        "WANWU_POOL_ID": pool_id,
        "WANWU_MODELS_DIR": str(models_dir),
        "WANWU_SOCKET_DIR": str(sockets),
        "WANWU_WORKER_IMAGE": IMAGE,
        "WANWU_MAX_WORKERS": "2",
        "WANWU_MAX_UPLOAD_MB": "2",
        "WANWU_QUEUE_TIMEOUT_S": "20",
        "WANWU_IDLE_TTL_S": "120",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--threads",
                "32",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield Gateway(url, pool_id, process, log, models_dir)
    finally:
        stop(process)
        shutil.rmtree(sockets, ignore_errors=True)
    left = docker_client.api.containers(all=True, filters={"label": f"{POOL_LABEL}={pool_id}"})
    for row in left:
        docker_client.api.remove_container(row["Id"], force=True)
    assert not left, f"the gateway left {len(left)} containers behind"
