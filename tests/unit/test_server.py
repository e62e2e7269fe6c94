"""The worker's serve protocol, in-process over a real Unix socket."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

import pytest
from wanwu_worker.bundle import load_bundle
from wanwu_worker.predictor import Predictor
from wanwu_worker.server import WorkerServer

from scheduler.errors import WorkerCrashed, WorkerRejected
from scheduler.worker_client import WorkerClient
from tests.images import demo_images, png_header_only, truncated_png


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor(load_bundle(tiny_bundle), device="cpu")


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: an independent client to check the server with."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def raw_request(
    path: str, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = UnixHTTPConnection(path, timeout=10)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_socket_appears_only_under_its_final_name(server: WorkerServer) -> None:
    sock = Path(server.final_path)
    assert sock.is_socket()
    assert [p.name for p in sock.parent.iterdir()] == ["worker.sock"]


def test_healthz_reports_model_and_device(client: WorkerClient) -> None:
    health = client.health()
    assert health["status"] == "ready"
    assert health["model"] == "demo-shapes"
    assert health["device"] == "cpu"
    assert health["gpu_memory_mb"] is None
    assert health["labels"] == 6
    assert health["warmup_ms"] > 0


def test_predict_answers_predictions_and_timings(client: WorkerClient, predictor: Predictor) -> None:
    image = next(iter(demo_images().values()))
    before = predictor.requests
    answer = client.predict(image, top_k=3)
    assert len(answer.predictions) == 3
    assert {p["label"] for p in answer.predictions} <= set(predictor.bundle.labels)
    scores = [p["score"] for p in answer.predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert set(answer.timing_ms) >= {"decode", "preprocess", "inference", "total", "server"}
    assert predictor.requests == before + 1


def test_top_k_is_capped_at_label_count(client: WorkerClient) -> None:
    answer = client.predict(next(iter(demo_images().values())), top_k=50)
    assert len(answer.predictions) == 6
    assert abs(sum(p["score"] for p in answer.predictions) - 1) < 1e-4


@pytest.mark.parametrize(
    ("body", "query", "status", "code"),
    [
        (b"", "", 400, "empty"),
        (b"GIF89a but not really", "", 400, "not_an_image"),
        (truncated_png(), "", 400, "corrupt_image"),
        (png_header_only(100_000, 100_000), "", 400, "image_too_large"),
        (b"x", "?top_k=0", 400, "bad_parameter"),
        (b"x", "?top_k=abc", 400, "bad_parameter"),
        (b"x" * 200_001, "", 413, "too_large"),
    ],
)
def test_bad_requests_get_json_errors_and_the_worker_keeps_serving(
    server: WorkerServer, client: WorkerClient, body: bytes, query: str, status: int, code: str
) -> None:
    got, headers, raw = raw_request(server.final_path, "POST", "/predict" + query, body)
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    import json

    error = json.loads(raw)["error"]
    assert error["code"] == code and error["message"]
    assert len(client.predict(next(iter(demo_images().values()))).predictions) == 5


def test_client_translates_4xx_to_rejected(client: WorkerClient) -> None:
    with pytest.raises(WorkerRejected) as caught:
        client.predict(b"not an image")
    assert caught.value.status == 400 and caught.value.code == "not_an_image"


def test_model_exception_is_500_and_the_next_request_works(client: WorkerClient, predictor: Predictor) -> None:
    real = predictor.model

    def broken(_batch: object) -> object:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    predictor.model = broken  # type: ignore[assignment]
    try:
        with pytest.raises(WorkerCrashed, match=r"500: inference_failed: .*illegal memory access"):
            client.predict(next(iter(demo_images().values())))
    finally:
        predictor.model = real
    assert client.predict(next(iter(demo_images().values()))).predictions


def test_unknown_route_and_wrong_method(server: WorkerServer) -> None:
    assert raw_request(server.final_path, "GET", "/nope")[0] == 404
    assert raw_request(server.final_path, "GET", "/predict")[0] == 405
    assert raw_request(server.final_path, "POST", "/nope", b"abc")[0] == 404


def test_chunked_body_is_refused_cleanly(server: WorkerServer) -> None:
    # The whole request in one write: the server answers before reading a chunked body.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(server.final_path)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 411 ") and b'"length_required"' in answer
    assert b"Connection: close" in answer


def test_connection_is_kept_alive_across_requests(client: WorkerClient) -> None:
    image = next(iter(demo_images().values()))
    for _ in range(6):
        client.predict(image)
    client.health()
    assert client.connections == 1


def test_client_reconnects_after_the_worker_drops_an_idle_connection(client: WorkerClient) -> None:
    image = next(iter(demo_images().values()))
    client.predict(image)
    assert client._sock is not None
    client._sock.shutdown(socket.SHUT_RDWR)  # as if the worker had closed it while idle
    assert client.predict(image).predictions
    assert client.connections == 2
