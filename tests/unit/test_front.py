"""The HTTP front (gateway/server.py) on a real socket, with a small app behind it:
heads and bodies on a clock, early 413s, connection bounds, idle and slow-reading
clients, JSON errors, metrics and the drain. Short limits keep it quick; the e2e test
(tests/e2e/test_front.py) does the same to the real gateway at its defaults."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import requests
from flask import Flask, request

from gateway.app import client_address, parse_networks, peer_key
from gateway.server import FrontLimits, FrontServer, FrontStats

LIMITS = FrontLimits(
    header_timeout_s=1.0,
    body_min_bytes_s=4096,
    body_grace_s=1.0,
    keepalive_s=1.0,
    max_connections=50,
    max_per_client=50,
    trusted=(),
    upload_bytes=64 * 1024,
    batch_bytes=256 * 1024,
)


def small_app(gate: threading.Event) -> Flask:
    app = Flask("front-test")

    @app.get("/healthz")
    def healthz() -> Any:
        return {"status": "ok"}

    @app.post("/v1/models/m/predict")
    def predict() -> Any:
        return {"bytes": len(request.get_data())}

    @app.post("/v1/models/m/predict:batch")
    def batch() -> Any:
        return {"bytes": len(request.get_data())}

    @app.get("/slow")
    def slow() -> Any:
        gate.wait(10)
        return {"done": True}

    @app.get("/big")
    def big() -> Any:
        return "x" * (8 * 2**20)

    return app


class Front:
    def __init__(self, server: FrontServer, stats: FrontStats, gate: threading.Event) -> None:
        self.server, self.stats, self.gate = server, stats, gate
        self.url = f"http://127.0.0.1:{server.effective_port}"
        self.port = server.effective_port

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock


@contextmanager
def running(limits: FrontLimits = LIMITS, threads: int = 2) -> Iterator[Front]:
    gate, stop, stats = threading.Event(), threading.Event(), FrontStats()
    server = FrontServer(small_app(gate), "127.0.0.1", 0, threads, limits, stats)
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 3.0), daemon=True)
    thread.start()
    try:
        yield Front(server, stats, gate)
    finally:
        gate.set()
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the front did not stop"


@pytest.fixture
def front() -> Iterator[Front]:
    with running() as front:
        yield front


def read_answer(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One whole answer, then EOF (the front closes after every error answer)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_head_that_stalls_gets_a_json_408_and_the_connection_closes(front: Front) -> None:
    with front.connect() as sock:
        began = time.monotonic()
        sock.sendall(b"GET /heal")
        status, headers, body = read_answer(sock)
    assert status == 408 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "head" in error["message"]
    assert error["request_id"] == headers["x-request-id"]
    assert time.monotonic() - began >= LIMITS.header_timeout_s
    assert front.stats.timed_out["header"] == 1


def test_blank_lines_are_idle_and_close_on_the_keepalive_clock(front: Front) -> None:
    """A stray CRLF after a request is not a new request: no 408 for it later, and a
    client sending nothing else is closed at the keep-alive time all the same."""
    with front.connect() as sock:
        sock.settimeout(10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\r\n")
        began = time.monotonic()
        received = b""
        try:
            while time.monotonic() - began < 6:
                sock.sendall(b"\r\n")  # a blank line every 0.3 s
                time.sleep(0.3)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    assert received.count(b"HTTP/1.1 ") == 1 and b" 200 " in received.split(b"\r\n")[0]
    assert front.stats.timed_out["idle"] == 1 and front.stats.timed_out["header"] == 0


def test_a_body_slower_than_the_floor_gets_a_408_that_the_client_reads(front: Front) -> None:
    with front.connect() as sock:
        sock.sendall(b"POST /v1/models/m/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n")
        deadline = time.monotonic() + 10
        answer = b""
        sock.settimeout(0.2)
        while time.monotonic() < deadline and not answer:
            try:
                sock.sendall(b"x")  # a byte at a time, as the slowloris upload does
            except OSError:
                break
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                pass
        rest = b""
        sock.settimeout(5)
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            rest += chunk
    status_line, _, body = (answer + rest).partition(b"\r\n")
    assert b" 408 " in status_line, answer + rest
    assert json.loads(body.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert front.stats.timed_out["body"] == 1


def test_a_body_too_long_for_its_route_is_refused_from_its_head(front: Front) -> None:
    with front.connect() as sock:  # the head alone: the front must not wait for 100 KB it would refuse
        sock.sendall(b"POST /v1/models/m/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        status, _, body = read_answer(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    # the batch route allows more
    answer = requests.post(f"{front.url}/v1/models/m/predict:batch", data=b"x" * 100_000, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"bytes": 100_000}
    # a chunked body is counted as it arrives
    chunks = (b"x" * 8192 for _ in range(20))
    answer = requests.post(f"{front.url}/v1/models/m/predict", data=chunks, timeout=10)
    assert answer.status_code == 413


def test_a_bad_request_line_is_a_json_400(front: Front) -> None:
    with front.connect() as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = read_answer(sock)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"


def test_many_stalled_clients_do_not_stop_the_app(front: Front) -> None:
    """Twenty times the front's threads stalled mid-head and mid-body: a request still
    goes through at once (a liveness check: a 5 s client timeout)."""
    stalled = []
    try:
        for i in range(40):
            sock = front.connect()
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost")
            else:
                sock.sendall(b"POST /v1/models/m/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\nxx")
            stalled.append(sock)
        wait_for(lambda: front.stats.open >= 40)
        assert requests.get(f"{front.url}/healthz", timeout=5).json() == {"status": "ok"}
        answer = requests.post(f"{front.url}/v1/models/m/predict", data=b"y" * 1000, timeout=5)
        assert answer.json() == {"bytes": 1000}
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: front.stats.open == 0)


def test_an_idle_keepalive_connection_closes(front: Front) -> None:
    with front.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert b" 200 " in first.split(b"\r\n")[0]
        began = time.monotonic()
        while sock.recv(65536):
            pass  # EOF when the front closes it
    assert time.monotonic() - began >= LIMITS.keepalive_s * 0.9
    assert front.stats.timed_out["idle"] == 1


def test_a_client_that_stops_reading_is_closed(front: Front) -> None:
    with front.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: front.stats.timed_out["send"] == 1)
    wait_for(lambda: front.stats.open == 0)


def test_at_the_bound_an_idle_connection_makes_room_else_a_503() -> None:
    limits = replace(LIMITS, max_connections=3, keepalive_s=30)
    with running(limits) as front:
        idle = [front.connect() for _ in range(3)]
        wait_for(lambda: front.stats.open == 3)
        assert requests.get(f"{front.url}/healthz", timeout=5).status_code == 200  # one idle one was closed
        assert front.stats.reclaimed == 1
        for sock in idle:
            sock.close()
        wait_for(lambda: front.stats.open == 0)
        busy = []
        for _ in range(3):  # mid-request: not reclaimable
            sock = front.connect()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            busy.append(sock)
        wait_for(lambda: sum(c.began is not None for c in list(front.server.active_channels.values())) == 3)
        with front.connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_answer(sock)
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "server_busy"
        assert front.stats.refused["connections"] == 1
        for sock in busy:
            sock.close()


def test_one_address_is_bounded_unless_it_is_a_trusted_proxy() -> None:
    with running(replace(LIMITS, max_per_client=2, keepalive_s=30)) as front:
        held = [front.connect() for _ in range(2)]
        wait_for(lambda: front.stats.open == 2)
        with front.connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_answer(sock)
        assert status == 429 and json.loads(body)["error"]["code"] == "too_many_connections"
        for sock in held:
            sock.close()
    trusted = replace(LIMITS, max_per_client=2, keepalive_s=30, trusted=parse_networks("127.0.0.0/8"))
    with running(trusted) as front:
        held = [front.connect() for _ in range(4)]
        assert requests.get(f"{front.url}/healthz", timeout=5).status_code == 200
        for sock in held:
            sock.close()


def test_the_drain_finishes_a_request_in_flight() -> None:
    gate, stop, stats = threading.Event(), threading.Event(), FrontStats()
    server = FrontServer(small_app(gate), "127.0.0.1", 0, 2, LIMITS, stats)
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 5.0), daemon=True)
    thread.start()
    answers: list[requests.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(requests.get(f"http://127.0.0.1:{server.effective_port}/slow", timeout=10))
    )
    client.start()
    wait_for(lambda: any(c.requests for c in list(server.active_channels.values())))  # a thread has it
    stop.set()
    time.sleep(0.5)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", server.effective_port), timeout=2)
    gate.set()
    client.join(10)
    thread.join(10)
    assert answers and answers[0].json() == {"done": True}
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("remote", "forwarded", "expected"),
    [
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a trusted proxy: its header is ignored
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.3", "198.51.100.1"),  # right-most untrusted
        ("10.0.0.2", "garbage", "10.0.0.2"),
        ("10.0.0.2", "10.0.0.3", "10.0.0.2"),
        ("::ffff:10.0.0.2", "198.51.100.1", "198.51.100.1"),
    ],
)
def test_client_address_behind_trusted_proxies(remote: str, forwarded: str, expected: str) -> None:
    assert client_address(remote, forwarded, parse_networks("10.0.0.0/8")) == expected


def test_ipv6_clients_are_keyed_by_their_64() -> None:
    assert peer_key("2001:db8:1:2::5") == peer_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::5") != peer_key("2001:db8:1:2::5")
    assert peer_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_accepted_connections_have_nagle_off(front: Front) -> None:
    """An answer's head and body are separate writes: with Nagle's algorithm on, the
    body waits for the client's delayed ACK (40 ms a request, which the bench caught)."""
    with front.connect():
        wait_for(lambda: front.stats.open == 1)
        (channel,) = front.server.active_channels.values()
        assert channel.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_pipelined_requests_whose_answers_are_never_read_do_not_hold_threads() -> None:
    """Hundreds of pipelined requests in one write, answers never read: the thread
    answering them blocks at waitress's output high watermark until the send clock
    closes the connection; the app goes on answering others."""
    with running(threads=2) as front:
        hogs = []
        for _ in range(2):
            sock = front.connect()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 4)  # 32 MB of answers, never read
            hogs.append(sock)
        wait_for(lambda: front.stats.timed_out["send"] == 2, timeout=20)
        assert requests.get(f"{front.url}/healthz", timeout=5).status_code == 200
        for sock in hogs:
            sock.close()


def test_a_chunk_size_line_that_never_ends_is_a_400(front: Front) -> None:
    with front.connect() as sock:
        sock.sendall(b"POST /v1/models/m/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(8):
                sock.sendall(b"f" * 1024)
        except OSError:
            pass
        status, _, body = read_answer(sock)
    assert status == 400 and "chunk" in json.loads(body)["error"]["message"]


def test_a_fresh_connection_with_its_request_unread_is_not_reclaimed() -> None:
    """At the bound only a connection that is idle and has nothing waiting is closed to
    make room; one whose request is still in the socket would get a reset."""
    gate, stop, stats = threading.Event(), threading.Event(), FrontStats()
    server = FrontServer(small_app(gate), "127.0.0.1", 0, 2, replace(LIMITS, max_connections=1, keepalive_s=30), stats)
    first = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
    first.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    second = socket.create_connection(("127.0.0.1", server.effective_port), timeout=10)
    second.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    server.handle_accept()  # both accepted before the loop reads either: the first looks idle
    server.handle_accept()
    thread = threading.Thread(target=server.serve, args=(stop.is_set, 3.0), daemon=True)
    thread.start()
    try:
        first_status, _, _ = read_answer(first)
        second_status, _, _ = read_answer(second)
    finally:
        stop.set()
        thread.join(10)
        first.close()
        second.close()
    assert first_status == 200 and second_status == 503
    assert stats.reclaimed == 0
