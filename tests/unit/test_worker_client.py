"""The worker client against a socket that answers whatever a test tells it to."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.errors import WorkerCrashed, WorkerRejected, WorkerTimeout
from scheduler.worker_client import WorkerClient


class ScriptedWorker:
    """Accepts connections and answers each request with the next scripted bytes
    (None: close the connection without answering; "hang": never answer;
    (bytes, "close"): answer, then close)."""

    def __init__(self, path: Path, answers: list[Any]) -> None:
        self.answers = answers
        self.received: list[bytes] = []  # each request as it arrived (one read each)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                while request := conn.recv(65536):
                    self.received.append(request)
                    answer = self.answers.pop(0) if self.answers and request else None
                    if answer is None:
                        break
                    if answer == "hang":
                        threading.Event().wait(5)
                        break
                    if isinstance(answer, tuple):  # (bytes, "close"): answer, then hang up
                        conn.sendall(answer[0])
                        break
                    conn.sendall(answer)  # type: ignore[arg-type]

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def ok(body: bytes = b'{"predictions": [{"label": "a", "score": 1.0}], "timing_ms": {"total": 1.0}}') -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[ScriptedWorker]:
    scripted = ScriptedWorker(tmp_path / "w.sock", [])
    yield scripted
    scripted.close()


@pytest.fixture
def scripted(worker: ScriptedWorker, tmp_path: Path) -> tuple[Path, list[Any]]:
    return tmp_path / "w.sock", worker.answers


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"garbage\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}", "without Content-Length"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "close"), "ended after 2 of 100 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "non-JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "without predictions"),
        (answer(500, b'{"error": {"code": "x", "message": "boom"}}'), "500: x: boom"),
    ],
)
def test_garbage_answers_are_worker_crashes(scripted: tuple[Path, list[Any]], reply: Any, message: str) -> None:
    path, answers = scripted
    answers.append(reply)
    with pytest.raises(WorkerCrashed, match=message):
        WorkerClient(str(path), "w1", timeout=5).predict(b"img")


def test_a_4xx_is_rejected_input(scripted: tuple[Path, list[Any]]) -> None:
    path, answers = scripted
    body = b'{"error": {"code": "not_an_image", "message": "no"}}'
    answers.append(answer(400, body))
    with pytest.raises(WorkerRejected) as caught:
        WorkerClient(str(path), "w1", timeout=5).predict(b"img")
    assert (caught.value.status, caught.value.code) == (400, "not_an_image")


def test_no_answer_in_time_is_a_timeout(scripted: tuple[Path, list[Any]]) -> None:
    path, answers = scripted
    answers.append("hang")
    with pytest.raises(WorkerTimeout, match="did not answer POST /predict"):
        WorkerClient(str(path), "w1", timeout=0.2).predict(b"img")


def test_a_dropped_fresh_connection_is_a_crash_but_a_dropped_reused_one_is_retried(
    scripted: tuple[Path, list[Any]],
) -> None:
    path, answers = scripted
    answers.extend([None])
    client = WorkerClient(str(path), "w1", timeout=5)
    with pytest.raises(WorkerCrashed):
        client.predict(b"img")  # fresh connection, closed without an answer
    answers.extend([ok(), None, ok()])
    assert client.predict(b"img").predictions  # connection 2
    assert client.predict(b"img").predictions  # dropped on reuse, retried on connection 3
    assert client.connections == 3


def test_connection_close_is_honoured(scripted: tuple[Path, list[Any]]) -> None:
    path, answers = scripted
    body = b'{"predictions": [], "timing_ms": {}}'
    answers.extend([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), ok()])
    client = WorkerClient(str(path), "w1", timeout=5)
    client.predict(b"img")
    assert client._sock is None
    client.predict(b"img")
    assert client.connections == 2


def test_unreachable_socket_is_a_crash(tmp_path: Path) -> None:
    with pytest.raises(WorkerCrashed, match="FileNotFoundError"):
        WorkerClient(str(tmp_path / "missing.sock"), "w1", timeout=1).predict(b"img")


# -- predict_batch -----------------------------------------------------------------------

PREDICTIONS = b'{"predictions": [{"label": "a", "score": 1.0}]}'
ERROR = b'{"error": {"code": "empty", "message": "no bytes"}}'


def batch_answer(*results: bytes) -> bytes:
    return ok(b'{"results": [%s], "timing_ms": {"total": 1.0}}' % b", ".join(results))


def test_a_batch_goes_out_with_its_parts_header_and_answers_in_order(worker: ScriptedWorker, tmp_path: Path) -> None:
    worker.answers.append(batch_answer(PREDICTIONS, ERROR, PREDICTIONS))
    answer = WorkerClient(str(tmp_path / "w.sock"), "w1", timeout=5).predict_batch([b"ab", b"", b"cde"], top_k=2)
    assert [sorted(r) for r in answer.results] == [["predictions"], ["error"], ["predictions"]]
    assert answer.timing_ms == {"total": 1.0} and answer.round_trip_ms > 0
    [request] = worker.received
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /predict_batch?top_k=2 HTTP/1.1\r\n")
    assert b"\r\nX-Wanwu-Parts: 2,0,3\r\n" in head + b"\r\n" and b"\r\nContent-Length: 5" in head
    assert body == b"abcde"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (batch_answer(PREDICTIONS), "answered 1 results for 2 images"),
        (batch_answer(PREDICTIONS, PREDICTIONS, PREDICTIONS), "answered 3 results for 2 images"),
        (batch_answer(PREDICTIONS, b'{"label": "a"}'), "result 1 with neither predictions nor an error"),
        (batch_answer(PREDICTIONS, b'{"error": "boom"}'), "result 1 with neither predictions nor an error"),
        (batch_answer(PREDICTIONS, b"[]"), "result 1 with neither predictions nor an error"),
        (ok(b'{"results": {}, "timing_ms": {}}'), "without results"),
        (ok(b'{"predictions": [], "timing_ms": {}}'), "without results"),
        (answer(500, b'{"error": {"code": "inference_failed", "message": "oom"}}'), "500: inference_failed: oom"),
    ],
)
def test_a_batch_answer_that_does_not_fit_the_images_is_a_crash(
    scripted: tuple[Path, list[Any]], reply: bytes, message: str
) -> None:
    path, answers = scripted
    answers.append(reply)
    with pytest.raises(WorkerCrashed, match=message):
        WorkerClient(str(path), "w1", timeout=5).predict_batch([b"img", b"img"])


def test_a_refused_batch_is_rejected_input(scripted: tuple[Path, list[Any]]) -> None:
    path, answers = scripted
    answers.append(answer(400, b'{"error": {"code": "batch_too_large", "message": "at most 2"}}'))
    with pytest.raises(WorkerRejected) as caught:
        WorkerClient(str(path), "w1", timeout=5).predict_batch([b"a", b"b", b"c"])
    assert (caught.value.status, caught.value.code) == (400, "batch_too_large")


def test_a_batch_that_is_not_answered_in_time_is_a_timeout(scripted: tuple[Path, list[Any]]) -> None:
    path, answers = scripted
    answers.append("hang")
    with pytest.raises(WorkerTimeout, match="did not answer POST /predict_batch"):
        WorkerClient(str(path), "w1", timeout=0.2).predict_batch([b"img"])


def test_scores_ask_for_columns_as_a_list_or_as_a_bounded_bitmap() -> None:
    import base64

    from scheduler.worker_client import Scores

    few = Scores(("水果",), (3, 17), 20_000, ("a", "b"), "d")
    assert few.query() == "&subset=%E6%B0%B4%E6%9E%9C&columns=3,17"
    many = Scores((), tuple(range(0, 20_000, 3)), 20_000, (), "d")
    query = many.query()
    assert query.startswith("&column_mask=") and len(query) < 20_000 // 8 * 4 // 3 + 20
    mask = base64.urlsafe_b64decode(query.split("=", 1)[1] + "==")
    assert [i for i in range(20_000) if mask[i // 8] >> (i % 8) & 1] == list(many.columns)
