"""Workers that answer garbage, on a real socket behind the real pool: each kind is a
clean error (the call is retried once on another worker), the lease goes back, the
worker is replaced, and a dynamic batch's other members hear at once. After a thousand
such answers the pool's capacity is whole."""

from __future__ import annotations

import collections
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

import pytest
from wanwu_worker.bundle import labels_digest

from scheduler.backends.base import load_model
from scheduler.errors import WorkerCrashed, WorkerStartError, WorkerTimeout
from scheduler.policy import State
from scheduler.pool import LabelSubset, PoolAnswer, WarmPool
from scheduler.worker_client import ANSWER_BASE_BYTES, ANSWER_BYTES_PER_IMAGE, WorkerClient
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle
from tests.unit.test_pool import make_pool
from tests.unit.test_pool_batching import in_threads, live_pool
from tests.unit.test_worker_client import ok

SUBSETS = {"前": ("甲", "乙")}  # the "sub" bundle's named subsets, as its worker knows them
TIMING = {"inference": 1.0, "total": 2.0}


class Request:
    """One request as the stub worker read it."""

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        url = urlsplit(target)
        self.method, self.path, self.query = method, url.path, parse_qs(url.query)
        self.headers, self.body = headers, body

    def images(self) -> list[bytes]:
        if self.path != "/predict_batch":
            return [self.body]
        images, at = [], 0
        for size in map(int, self.headers["x-wanwu-parts"].split(",")):
            images.append(self.body[at : at + size])
            at += size
        return images


def good_payload(request: Request) -> dict[str, Any]:
    """A sound worker's answer: each image labelled by its bytes, with the raw scores of
    the subsets asked for."""
    entries = []
    for image in request.images():
        entry: dict[str, Any] = {"predictions": [{"label": f"m:{image.decode()}", "score": 0.9}]}
        if "subset" in request.query:
            labels = tuple(label for name in request.query["subset"] for label in SUBSETS[name])
            entry.update(logits=[float(i) for i in range(len(labels))], logits_of=labels_digest(labels))
        entries.append(entry)
    if request.path == "/predict_batch":
        return {"results": entries, "timing_ms": TIMING}
    return {**entries[0], "timing_ms": TIMING}


def good_body(request: Request) -> bytes:
    return json.dumps(good_payload(request)).encode()


def good(request: Request) -> bytes:
    return ok(good_body(request))


Reply = bytes | tuple[bytes, None] | Iterator[bytes | float] | None
Behaviour = Callable[[Request], Reply]


def edited(edit: Callable[[bytes], bytes]) -> Behaviour:
    """A sound answer's body edited as text (its Content-Length fits the edit)."""
    return lambda request: ok(edit(good_body(request)))


def changed(change: Callable[[dict[str, Any]], object]) -> Behaviour:
    """A sound answer with each image's entry changed in place by ``change``."""

    def reply(request: Request) -> bytes:
        payload = good_payload(request)
        for entry in payload.get("results", [payload]):
            change(entry)
        return ok(json.dumps(payload).encode())

    return reply


def trickle(request: Request) -> Iterator[bytes | float]:
    """A sound answer, four bytes every 20 ms: each read is quick, the whole is not."""
    reply = good(request)
    for at in range(0, len(reply), 4):
        yield 0.02
        yield reply[at : at + 4]


def silent(request: Request) -> Iterator[bytes | float]:
    yield 5.0


PAD = b"X-Pad: " + b"a" * 1000 + b"\r\n"
# What the stub sends for each kind: bytes; (bytes, None): those, then hang up; None:
# hang up; an iterator: bytes, and pauses (floats, in seconds) that end if the client hangs up.
GARBAGE: dict[str, Behaviour] = {
    # the head
    "content_length_too_long": lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 3000000000\r\n\r\n" + b" " * 65536,
    "content_length_negative": lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n" + good_body(r),
    "two_content_lengths": lambda r: good(r).replace(b"\r\n", b"\r\nContent-Length: 1\r\n", 1),
    "chunked": lambda r: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "head_too_big": lambda r: good(r).replace(b"\r\n", b"\r\n" + PAD * 20, 1),
    "too_many_header_lines": lambda r: good(r).replace(b"\r\n", b"\r\n" + b"X: y\r\n" * 200, 1),
    "header_without_colon": lambda r: good(r).replace(b"\r\n", b"\r\nno colon here\r\n", 1),
    "bad_status": lambda r: good(r).replace(b"200 OK", b"2x0 OK", 1),
    "not_http": lambda r: b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    "bytes_past_the_answer": lambda r: good(r) + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    # the connection
    "closed_before_answering": lambda r: None,
    "closed_mid_head": lambda r: (b"HTTP/1.1 200 OK\r\nContent-Le", None),
    "truncated_body": lambda r: (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"predic', None),
    "slow_trickle": trickle,
    "silent": silent,
    # the body
    "deeply_nested": lambda r: ok(b"[" * 100_000),
    "deeply_nested_inside": lambda r: ok(b'{"predictions": ' + b"[" * 100_000),
    "not_utf8": lambda r: ok(b'{"predictions": "\xff\xfe"}'),
    "not_an_object": lambda r: ok(b"[1, 2]"),
    "nan_score": edited(lambda b: b.replace(b"0.9", b"NaN")),
    "infinite_score": edited(lambda b: b.replace(b"0.9", b"1e999")),
    "huge_integer_score": edited(lambda b: b.replace(b"0.9", b"9" * 400)),
    "infinite_timing": edited(lambda b: b.replace(b"2.0", b"Infinity")),
    "timing_as_strings": edited(lambda b: b.replace(b"2.0", b'"2.0"')),
    "score_as_string": changed(lambda e: e["predictions"][0].update(score="0.9")),
    "score_as_bool": changed(lambda e: e["predictions"][0].update(score=True)),
    "label_as_number": changed(lambda e: e["predictions"][0].update(label=7)),
    "predictions_as_object": changed(lambda e: e.update(predictions={"a": 0.9})),
    "prediction_as_list": changed(lambda e: e.update(predictions=[["a", 0.9]])),
    "more_predictions_than_asked": changed(lambda e: e.update(predictions=[{"label": "x", "score": 0.1}] * 1000)),
    "embedding_with_nan": lambda r: ok(b'{"embedding": [0.5, NaN], "dim": 2, "timing_ms": {}}'),
    "embedding_of_strings": changed(lambda e: e.update(embedding=["a", "b"], dim=2)),
    "groups_as_string": changed(lambda e: e.update(groups="dogs")),
}
SLOW = ("slow_trickle", "silent")


class StubWorker:
    """A worker on a real Unix socket, a thread per connection, that answers each request
    as the next item of ``script`` says (a GARBAGE kind, or a behaviour), soundly once
    the script runs out. ``served`` counts what it answered, by kind; ``open`` the
    connections open now."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.script: collections.deque[str | Behaviour] = collections.deque()
        self.served: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def garbage_served(self) -> int:
        return sum(count for kind, count in self.served.items() if kind in GARBAGE)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                while (request := _read_request(reader)) is not None and self._answer(conn, request):
                    pass
        except OSError:
            pass  # the client hung up on garbage
        finally:
            with self.lock:
                self.open -= 1

    def _answer(self, conn: socket.socket, request: Request) -> bool:
        """Answer as scripted; False once the connection is to be closed."""
        with self.lock:
            item = self.script.popleft() if self.script else "good"
            self.served[item if isinstance(item, str) else "custom"] += 1
        behaviour = good if item == "good" else GARBAGE[item] if isinstance(item, str) else item
        reply = behaviour(request)
        if reply is None:
            return False
        if isinstance(reply, tuple):
            conn.sendall(reply[0])
            return False
        if isinstance(reply, bytes):
            conn.sendall(reply)
            return True
        for step in reply:
            if isinstance(step, bytes):
                conn.sendall(step)
            elif _hung_up(conn, step):
                return False
        return True


def _read_request(reader: BinaryIO) -> Request | None:
    line = reader.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while (header := reader.readline(65537)) not in (b"\r\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers, reader.read(int(headers.get("content-length", "0"))))


def _hung_up(conn: socket.socket, seconds: float) -> bool:
    """Wait up to ``seconds`` for the client to hang up."""
    readable, _, _ = select.select([conn], [], [], seconds)
    return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""


class SocketBackend(FakeBackend):
    """The fake backend, its workers reached by real WorkerClients on the stub's socket."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def connect(self, worker_id: str, timeout: float) -> WorkerClient:  # type: ignore[override]
        return WorkerClient(str(self.path), worker_id, timeout)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StubWorker]:
    worker = StubWorker(tmp_path / "w.sock")
    yield worker
    worker.close()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    make_bundle(models, "m")
    make_bundle(models, "b", batching={"max_batch_size": 8, "max_wait_ms": 50})
    make_bundle(
        models,
        "sub",
        batching={"max_batch_size": 8, "max_wait_ms": 50},
        labels=("甲", "乙", "丙", "丁"),
        subsets={name: list(labels) for name, labels in SUBSETS.items()},
    )
    return models


def assert_whole(pool: WarmPool, backend: FakeBackend, model: str) -> None:
    """No worker is left busy, no container left over, and every slot can be had at once."""
    snapshot = pool.snapshot()
    assert [w.id for w in snapshot.workers if w.state == State.BUSY.value] == []
    assert len(snapshot.workers) <= snapshot.capacity and len(backend.live) <= snapshot.capacity
    leases = [pool.acquire(model, pool.clock.now() + 5) for _ in range(snapshot.capacity)]
    assert len({lease.worker_id for lease in leases}) == snapshot.capacity
    for lease in leases:
        pool.release(lease)


# -- each kind, behind the pool ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_each_kind_of_garbage_is_a_clean_error_and_its_worker_is_replaced(
    kind: str, stub: StubWorker, models: Path
) -> None:
    backend = SocketBackend(stub.path)
    pool = make_pool(backend, FakeClock(), models, request_timeout_s=0.3)
    try:
        stub.script.extend([kind, kind])
        started = time.monotonic()
        with pytest.raises(WorkerTimeout if kind in SLOW else WorkerCrashed):
            pool.predict("m", b"x")  # garbage, and garbage again on the retry
        assert time.monotonic() - started < 1.5  # each try ends at its deadline, or sooner
        stub.script.append(kind)
        answer = pool.predict("m", b"y")  # garbage, then a sound worker
        assert answer.attempts == 2 and answer.predictions == [{"label": "m:y", "score": 0.9}]
        assert stub.served[kind] == 3
        reaps = pool.snapshot().reaps
        assert reaps.get("crashed", 0) + reaps.get("timeout", 0) == 3  # each worker that answered it went
        assert_whole(pool, backend, "m")
    finally:
        pool.shutdown(grace_s=0)


def test_a_thousand_garbage_answers_leave_the_pool_whole(stub: StubWorker, models: Path) -> None:
    backend = SocketBackend(stub.path)
    pool = make_pool(backend, FakeClock(), models, request_timeout_s=0.05)
    try:
        fast = [kind for kind in GARBAGE if kind not in SLOW]
        for i in range(1000):
            stub.script.append(SLOW[i // 100 % 2] if i % 100 == 99 else fast[i % len(fast)])
            if i % 3 == 0:
                stub.script.append("good")
        outcomes: collections.Counter[str] = collections.Counter()
        while stub.script:
            try:
                pool.predict("m", b"z")
                outcomes["answered"] += 1
            except (WorkerCrashed, WorkerTimeout) as exc:
                outcomes[type(exc).__name__] += 1
        assert stub.garbage_served() >= 1000
        assert outcomes["answered"] and outcomes["WorkerCrashed"] and outcomes["WorkerTimeout"], outcomes
        assert_whole(pool, backend, "m")
        assert pool.predict("m", b"ok").predictions == [{"label": "m:ok", "score": 0.9}]
        deadline = time.monotonic() + 5
        while stub.open > pool.settings.max_workers and time.monotonic() < deadline:
            threading.Event().wait(0.01)  # the stub's threads see the hang-ups
        assert stub.open <= pool.settings.max_workers  # no connection was left behind
    finally:
        pool.shutdown(grace_s=0)


# -- dynamic batches -----------------------------------------------------------------------


def test_garbage_for_a_batch_call_finishes_every_member_at_once(stub: StubWorker, models: Path) -> None:
    backend = SocketBackend(stub.path)
    pool = live_pool(backend, models, request_timeout_s=2.0)
    try:
        lease = pool.acquire("b", pool.clock.now() + 5)  # the only worker is busy: callers gather
        threads, results = in_threads([lambda i=i: pool.predict("b", str(i).encode()) for i in range(3)], pool)
        stub.script.append("deeply_nested")
        started = time.monotonic()
        pool.release(lease)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 1.5  # not after the members' timeout (2 s, and 5 more)
        assert all(isinstance(r, PoolAnswer) and r.attempts == 2 for r in results), results
        assert [r.predictions[0]["label"] for r in results] == ["m:0", "m:1", "m:2"]
        assert pool.snapshot().reaps["crashed"] == 1
        assert_whole(pool, backend, "b")
    finally:
        pool.shutdown(grace_s=0)


def test_a_batch_answer_one_member_cannot_use_fails_the_call_and_replaces_its_worker(
    stub: StubWorker, models: Path
) -> None:
    backend = SocketBackend(stub.path)
    pool = live_pool(backend, models, request_timeout_s=2.0)
    try:
        lease = pool.acquire("sub", pool.clock.now() + 5)
        subset = LabelSubset(SUBSETS["前"], "前")
        calls = [
            lambda: pool.predict("sub", b"0"),
            lambda: pool.predict("sub", b"1", subset=subset),
            lambda: pool.predict("sub", b"2"),
        ]
        threads, results = in_threads(calls, pool)
        # Well-formed, but its raw scores are of other labels: only the subset member can tell.
        stub.script.append(changed(lambda e: e.update(logits_of="another bundle's labels")))
        started = time.monotonic()
        pool.release(lease)
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 1.5
        assert all(isinstance(r, PoolAnswer) and r.attempts == 2 for r in results), results
        assert [p["label"] for p in results[1].predictions] == ["乙", "甲"]
        assert pool.snapshot().reaps["crashed"] == 1  # the worker that answered it went
        assert_whole(pool, backend, "sub")
    finally:
        pool.shutdown(grace_s=0)


# -- the client on its own -----------------------------------------------------------------


def test_a_slow_trickle_ends_at_the_calls_deadline_not_a_reads(stub: StubWorker) -> None:
    stub.script.append("slow_trickle")
    started = time.monotonic()
    with pytest.raises(WorkerTimeout):
        WorkerClient(str(stub.path), "w1", timeout=0.3).predict(b"x")
    assert 0.3 <= time.monotonic() - started < 0.6


def test_bytes_a_worker_sends_after_its_answer_are_never_read_as_the_next_answer(stub: StubWorker) -> None:
    sent = threading.Event()

    def answer_then_more(request: Request) -> Iterator[bytes | float]:
        yield good(request)
        yield 0.05  # the client has read its answer
        yield ok(b'{"predictions": [{"label": "stale", "score": 1.0}], "timing_ms": {}}')
        sent.set()

    stub.script.append(answer_then_more)
    client = WorkerClient(str(stub.path), "w1", timeout=5)
    assert client.predict(b"1").predictions == [{"label": "m:1", "score": 0.9}]
    assert sent.wait(5)
    with pytest.raises(WorkerCrashed, match="after its last answer, unasked"):
        client.predict(b"2")
    assert client.predict(b"3").predictions == [{"label": "m:3", "score": 0.9}]  # on a new connection
    assert client.connections == 2


def test_an_answers_size_is_bounded_by_the_images_in_the_call(stub: StubWorker) -> None:
    client = WorkerClient(str(stub.path), "w1", timeout=5)
    padding = ANSWER_BASE_BYTES + ANSWER_BYTES_PER_IMAGE  # whitespace: still sound JSON
    stub.script.append(lambda r: ok(good_body(r) + b" " * padding))
    with pytest.raises(WorkerCrashed, match="more than the 2097152 allowed"):
        client.predict(b"x")
    stub.script.append(lambda r: ok(good_body(r) + b" " * padding))
    answer = client.predict_batch([b"a", b"b", b"c"])  # three images: up to 4 MiB
    assert [entry["predictions"][0]["label"] for entry in answer.results] == ["m:a", "m:b", "m:c"]


def test_an_answers_entries_are_rebuilt_from_what_a_worker_may_say(stub: StubWorker) -> None:
    stub.script.append(changed(lambda e: e.update(deep=[[[[[]]]]], predictions=[{"label": "a", "score": 1, "x": 2}])))
    answer = WorkerClient(str(stub.path), "w1", timeout=5).predict(b"x")
    assert answer.entry() == {"predictions": [{"label": "a", "score": 1}]}


# -- starts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reply"),
    [
        ("/healthz", b'{"status": "ready", "gpu_memory_mb": "lots"}'),
        ("/healthz", b'{"status": "ready", "gpu_memory_mb": 1e999}'),
        ("/healthz", b'{"status": ["ready"]}'),
        ("/load", b'{"status": "ready", "timing_ms": {"load": 1e999}}'),
        ("/load", b'{"status": "ready", "timing_ms": {"load": "slow"}}'),
        ("/load", b'{"status": "ready", "gpu_memory_mb": -5}'),
    ],
)
def test_a_garbled_health_or_load_answer_is_a_failed_start(
    stub: StubWorker, tmp_path: Path, path: str, reply: bytes
) -> None:
    stub.script.append(lambda r: ok(reply))
    client = WorkerClient(str(stub.path), "w1", timeout=5)
    if path == "/healthz":
        with pytest.raises(WorkerCrashed, match="answered /healthz with"):
            client.health()
    else:
        with pytest.raises(WorkerStartError, match="answered /load with"):
            load_model(client, "w1", tmp_path / "m", 5)


def test_a_worker_that_reports_garbled_gpu_memory_is_a_failed_start_and_is_removed(models: Path) -> None:
    backend, clock = FakeBackend(), FakeClock()
    backend.gpu_mb["m"] = float("nan")
    pool = make_pool(backend, clock, models)
    try:
        with pytest.raises(WorkerStartError, match="gpu_memory_mb nan"):
            pool.predict("m", b"x")
        assert backend.live == {} and pool.snapshot().workers == []
        backend.gpu_mb["m"] = 100.0
        clock.advance(2)  # past its backoff
        assert pool.predict("m", b"x").predictions
    finally:
        pool.shutdown(grace_s=0)
