"""The real gateway's front door: slow clients at several times its threads while a real
prediction goes through, nothing left open after them, and stopping at any moment
(SIGTERM while it prepares the default model, a second SIGTERM while it drains)."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import docker
import pytest
import requests
from PIL import Image

from tests.gatewayproc import ROOT, free_port, running_gateway
from tests.photos import PHOTOS
from tests.promtext import metric

pytestmark = pytest.mark.docker

THREADS = 8  # the front's request threads here; the slow clients are several times that
CAT = (PHOTOS / "chelsea.png").read_bytes()


def predict(url: str, timeout: float) -> requests.Response:
    return requests.post(f"{url}/v1/models/general/predict?top_k=1", files={"image": ("cat.png", CAT)}, timeout=timeout)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slow_clients_at_ten_times_the_threads_leave_healthz_and_predictions_working(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    settings = {
        "http_threads": str(THREADS),
        "http_max_connections_per_client": "1000",  # every client here is 127.0.0.1: the time limits must do it
        "stem_cells": "0",
        "max_workers": "1",
    }
    with running_gateway(tmp_path, docker_client, **settings) as gw:
        first = predict(gw.url, 120)  # the cold start, before the slow clients come
        assert first.status_code == 200, first.text
        baseline = open_fds(gw.process.pid)
        head = b"POST /v1/models/general/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        stalled, dribbling = [], []
        for _ in range(5 * THREADS):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            sock.sendall(b"GET /healthz HT")  # a partial request line, then nothing
            stalled.append(sock)
        for _ in range(5 * THREADS):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            sock.sendall(head + b"Content-Length: 1048576\r\n\r\n")  # a 1 MB upload, a byte a second
            dribbling.append(sock)
        stop = threading.Event()

        def dribble() -> None:
            while not stop.wait(1.0):
                for sock in dribbling:
                    try:
                        sock.send(b"\x89")
                    except OSError:
                        pass

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        try:
            time.sleep(1.5)  # all of them open and stuck
            text = requests.get(f"{gw.url}/metrics", timeout=5).text
            assert metric(text, "wanwu_http_connections_open") >= 10 * THREADS
            assert requests.get(f"{gw.url}/healthz", timeout=5).json() == {"status": "ok"}
            answer = predict(gw.url, 5)
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["label"] == first.json()["predictions"][0]["label"]
            # Each slow client gets its 408 (the dribblers after the body's grace, the
            # others at the head's time limit) and its connection closed.
            for sock in stalled + dribbling:
                sock.settimeout(30)
                received = b""
                try:
                    while chunk := sock.recv(65536):
                        received += chunk
                except OSError:
                    pass
                assert received.startswith(b"HTTP/1.1 408 "), received[:200]
                assert b'"code": "request_timeout"' in received
        finally:
            stop.set()
            dribbler.join(5)
            for sock in stalled + dribbling:
                sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = requests.get(f"{gw.url}/metrics", timeout=5).text
            if metric(text, "wanwu_http_connections_open") <= 1 and open_fds(gw.process.pid) <= baseline + 1:
                break
            time.sleep(0.2)
        assert metric(text, "wanwu_http_connections_open") <= 1  # this scrape's own connection
        assert open_fds(gw.process.pid) <= baseline + 1, "the slow clients left descriptors open"
        assert metric(text, 'wanwu_http_connections_timed_out_total{phase="header"}') >= 5 * THREADS
        assert metric(text, 'wanwu_http_connections_timed_out_total{phase="body"}') >= 5 * THREADS


def noise_png(side: int) -> bytes:
    rng = random.Random(3)
    image = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=0)
    return out.getvalue()


def test_a_second_sigterm_while_draining_is_ignored_and_the_upload_in_flight_is_answered(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    body = noise_png(320)  # about 300 KB, sent at 100 KB/s: in flight for about 3 s
    settings = {"stem_cells": "0", "max_workers": "1", "shutdown_grace_s": "30"}
    with running_gateway(tmp_path, docker_client, **settings) as gw:
        assert predict(gw.url, 120).status_code == 200  # a warm worker for the upload
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        head = (
            f"POST /v1/models/general/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        sock.sendall(head)
        for offset in range(0, len(body), 10_000):
            sock.sendall(body[offset : offset + 10_000])
            time.sleep(0.1)
            if offset == 50_000:
                gw.process.send_signal(signal.SIGTERM)
            if offset == 100_000:
                gw.process.send_signal(signal.SIGTERM)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        sock.close()
        assert received.startswith(b"HTTP/1.1 200 "), received[:300]
        assert gw.process.wait(60) == 0
        log = gw.log.read_text()
        assert "again: already stopping" in log
        assert not gw.containers(docker_client)


def test_sigterm_while_the_default_model_is_prepared_stops_the_gateway(tmp_path: Path) -> None:
    """The process backend makes the general model with the worker interpreter before it
    serves (a minute here): SIGTERM then stops it within seconds, leaving no half-made
    bundle and no builder process behind."""
    models = tmp_path / "models"
    log = tmp_path / "gateway.log"
    env = {
        **os.environ,
        "WANWU_BACKEND": "process",
        "WANWU_WORKER_USER": "gateway",  # uid 10001 is test_process_backend.py's
        "WANWU_MODELS_DIR": str(models),
        "WANWU_POOL_ID": "sigterm" + str(os.getpid()),
        "WANWU_SOCKET_DIR": str(tmp_path / "s"),
        "WANWU_STEM_CELLS": "0",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port())],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "making general" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)  # well into the build
        builders = children(process.pid)
        assert builders, "no builder process to interrupt"
        process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = process.wait(20)
        took = time.monotonic() - began
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert code != 0 and took < 10, f"exit {code} after {took:.1f} s:\n{log.read_text()}"
    assert "during start-up: stopping" in log.read_text()
    assert not [p for p in builders if Path(f"/proc/{p}").exists()], "the builder outlived the gateway"
    assert not list(models.glob(".*partial")), list(models.iterdir())
    assert not (models / "general").exists()


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
