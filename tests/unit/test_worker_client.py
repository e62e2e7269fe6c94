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
def scripted(tmp_path: Path) -> Iterator[tuple[Path, list[Any]]]:
    answers: list[Any] = []
    worker = ScriptedWorker(tmp_path / "w.sock", answers)
    yield tmp_path / "w.sock", answers
    worker.close()


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
