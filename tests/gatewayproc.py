"""Run the real gateway (``wanwu serve``) in a subprocess, for e2e tests and benchmarks."""

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import requests

from scheduler.backends.docker_common import POOL_LABEL
from tests.dockerutil import IMAGE
from tests.workerprocs import kill_all

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    url: str
    port: int
    pool_id: str
    process: subprocess.Popen[bytes]
    log: Path
    models_dir: Path
    socket_dir: Path

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


def kill_hard(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the gateway (one process), as the OOM killer or a power cut would:
    nothing runs its shutdown."""
    process.kill()
    process.wait(10)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def running_gateway(
    workdir: Path,
    client: docker.DockerClient,
    environment: dict[str, str] | None = None,
    server: str = "wanwu",
    **settings: str,
) -> Iterator[Gateway]:
    """A gateway on a free port with its own pool id, models and socket directories
    (``socket_dir`` and ``pool_id`` may be given); ``environment`` adds to its
    environment (PYTHONPATH goes first on the path). ``server="gunicorn"`` serves the
    same app behind the old front (tests/bench/gunicorn_front.py), for the benchmark's
    baseline. On exit it is stopped with SIGTERM and must have removed all its workers
    (containers, or processes with ``backend="process"``)."""
    pool_id = settings.pop("pool_id", None) or "gw" + uuid.uuid4().hex[:6]
    port = free_port()
    given = settings.pop("socket_dir", "")
    sockets = Path(given or tempfile.mkdtemp(prefix="wg-", dir="/tmp"))
    if not given:
        # Searchable, not listable, by others (as /run is): a root gateway's process workers
        # (uid 10001) reach their own directories in it. The gateway never chmods a root it
        # was given.
        sockets.chmod(0o711)
    workdir.mkdir(parents=True, exist_ok=True)
    models = workdir / "models"
    log = workdir / f"gateway-{pool_id}.log"
    env = {
        **os.environ,
        "WANWU_POOL_ID": pool_id,
        "WANWU_MODELS_DIR": str(models),
        "WANWU_SOCKET_DIR": str(sockets),
        "WANWU_WORKER_IMAGE": IMAGE,
        # Every test client is 127.0.0.1: room for the concurrent ones (the bound has its own tests).
        "WANWU_CLIENT_MAX_REQUESTS": "64",
    }
    env.update({f"WANWU_{key.upper()}": value for key, value in settings.items()})
    for key, value in (environment or {}).items():
        env[key] = f"{value}{os.pathsep}{env['PYTHONPATH']}" if key == "PYTHONPATH" and env.get("PYTHONPATH") else value
    with log.open("wb") as out:
        if server == "gunicorn":
            command = [sys.executable, "-m", "tests.bench.gunicorn_front", "--port", str(port)]
        else:
            command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield Gateway(url, port, pool_id, process, log, models, sockets)
    finally:
        stop(process)
        shutil.rmtree(sockets, ignore_errors=True)
        left: list[object] = list(client.api.containers(all=True, filters={"label": f"{POOL_LABEL}={pool_id}"}))
        for row in left:
            client.api.remove_container(row["Id"], force=True)  # type: ignore[index]
        left += kill_all(pool_id)
    assert not left, f"the gateway left {len(left)} workers behind: {left}"
