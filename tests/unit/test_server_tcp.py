"""A worker on TCP (the swarm backend's workers): every request must carry the
worker's secret; the client sends it, and nothing without it is served."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from wanwu_worker.bundle import load_bundle
from wanwu_worker.predictor import Predictor
from wanwu_worker.server import TcpWorkerServer, parse_listen, read_secret

from scheduler.errors import WorkerCrashed
from scheduler.worker_client import WorkerClient
from tests.images import demo_images
from tests.unit.conftest import serving

SECRET = "s3cret-" + "x" * 40
IMAGE = next(iter(demo_images().values()))


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor(load_bundle(tiny_bundle), device="cpu")


@pytest.fixture
def server(predictor: Predictor) -> Iterator[TcpWorkerServer]:
    with serving(TcpWorkerServer(("127.0.0.1", 0), predictor, SECRET.encode())) as srv:
        yield srv


def address(server: TcpWorkerServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


def test_the_client_with_the_secret_is_served(server: TcpWorkerServer) -> None:
    client = WorkerClient(address(server), "w1", timeout=30, secret=SECRET)
    try:
        assert client.health()["status"] == "ready"
        answer = client.predict(IMAGE, top_k=2)
        assert len(answer.predictions) == 2
        assert client.connections == 1  # kept alive over TCP as over the socket
    finally:
        client.close()


@pytest.mark.parametrize("header", [None, "wrong-" + "y" * 40, SECRET[:-1]])
def test_anything_without_the_secret_is_401_and_the_body_is_never_read(
    server: TcpWorkerServer, header: str | None
) -> None:
    host, port = address(server)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"X-Wanwu-Secret": header} if header else {}
    conn.request("POST", "/predict?top_k=1", body=IMAGE, headers=headers)
    answer = conn.getresponse()
    assert answer.status == 401
    assert b'"unauthorized"' in answer.read()
    assert answer.getheader("Connection") == "close"
    conn.close()
    # and the worker serves its own client as before
    client = WorkerClient((host, port), "w1", timeout=30, secret=SECRET)
    assert client.health()["status"] == "ready"
    client.close()


def test_a_wrong_secret_in_the_client_is_a_crash_not_a_client_error(server: TcpWorkerServer) -> None:
    client = WorkerClient(address(server), "w1", timeout=10, secret="not-it-" + "z" * 40)
    with pytest.raises(WorkerCrashed, match="401"):
        client.health()
    client.close()


def test_abort_breaks_off_a_request_in_flight_and_refuses_new_ones(predictor: Predictor) -> None:
    # A listener that accepts and never answers: the request waits until aborted.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = WorkerClient(listener.getsockname(), "w1", timeout=60, secret=SECRET)
    failure: list[BaseException] = []

    def call() -> None:
        try:
            client.predict(b"x")
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    conn, _ = listener.accept()
    client.abort("its node is down")
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(failure[0], WorkerCrashed)
    with pytest.raises(WorkerCrashed, match="its node is down"):
        client.health()
    conn.close()
    listener.close()


def test_a_tcp_client_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        WorkerClient(("127.0.0.1", 7070), "w1")


def test_a_tcp_server_refuses_a_short_secret(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        TcpWorkerServer(("127.0.0.1", 0), predictor, b"short")


def test_listen_and_secret_file_parsing(tmp_path: Path) -> None:
    assert parse_listen("0.0.0.0:7070") == ("0.0.0.0", 7070)
    assert parse_listen(":7070") == ("0.0.0.0", 7070)
    assert parse_listen("[::]:7070") == ("::", 7070)
    for bad in ("7070", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)
    (tmp_path / "s").write_text(SECRET + "\n")
    assert read_secret(str(tmp_path / "s")) == SECRET.encode()
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="shorter"):
        read_secret(str(tmp_path / "short"))
    with pytest.raises(ValueError, match="cannot read"):
        read_secret(str(tmp_path / "missing"))
