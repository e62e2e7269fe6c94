"""Talk to one worker over HTTP/1.1 on its Unix socket, or over TCP with its secret
(workers on a swarm's overlay network).

One persistent connection per client; a client is used by one request at a time (the
pool's lease guarantees it). This is on every request's path, so it is lean: a small
request goes out in one write, the answer usually comes in one read, and the socket is
non-blocking with its own poll, so one deadline covers the whole call without setting a
timeout on every read (http.client writes headers and body separately and parses
headers with the email package; together that was about a quarter of the gateway's time
per request). A large body (a big image, a batch) goes out as the head and then each
part, never copied into one buffer.

A worker is not trusted to answer sensibly. Its answer's head is at most
MAX_HEAD_BYTES, strictly HTTP/1.x with one Content-Length and no other framing; its body
is at most ANSWER_BASE_BYTES and ANSWER_BYTES_PER_IMAGE per image sent, checked against
Content-Length before any of it is read; the whole call, however slowly the worker
trickles its bytes, ends at its deadline; the body is strict JSON (no NaN or Infinity,
no nesting deep enough to exhaust the parser) and each image's entry is checked and
rebuilt from what a worker may say (labels are strings, scores and vectors finite
numbers, no more predictions than asked for). A kept-alive connection is reused only if
nothing is waiting on it: bytes the worker sent after its last answer are garbage too.
The checks of what was read, and the shapes of the answers (``Scores``, ``WorkerAnswer``,
``WorkerBatchAnswer``, re-exported here), are ``scheduler.answers``, without I/O; this
module reads, writes and keeps the connection.

Transport failures become the scheduler's errors here and nowhere else: a refused or
dropped connection or a malformed answer is WorkerCrashed (its message says what was
wrong), a timeout is WorkerTimeout, a 4xx is WorkerRejected (the client's input).
"""

from __future__ import annotations

import json
import math
import select
import socket
import time
from collections.abc import Sequence
from typing import Any

from .answers import (
    _DECODER,
    _check_health,
    _check_timing,
    _clip,
    _entry,
    _error,
    _is_result,
    _kind,
    _Malformed,
    _parse_head,
)

# Scores, the answers and their limits moved to scheduler.answers; importable from here as before.
from .answers import EXTRA_KEYS as EXTRA_KEYS
from .answers import MAX_HEADER_LINES as MAX_HEADER_LINES
from .answers import MAX_INT as MAX_INT
from .answers import Scores as Scores
from .answers import WorkerAnswer as WorkerAnswer
from .answers import WorkerBatchAnswer as WorkerBatchAnswer
from .errors import WorkerCrashed, WorkerRejected, WorkerStartError, WorkerTimeout

MAX_HEAD_BYTES = 16 * 1024  # an answer's status line and headers, together
ANSWER_BASE_BYTES = 2**20  # an answer's body: at most this much...
ANSWER_BYTES_PER_IMAGE = 2**20  # ...and this much more per image sent (a 20,000-label subset's scores fit)
ONE_WRITE_LIMIT = 256 * 1024  # above this, the head and each body part go in their own writes, not one copy
READ_SIZE = 64 * 1024  # one read of an answer's head (a small answer comes whole with it)
PARTS_HEADER = "X-Wanwu-Parts"  # /predict_batch: each image's length in bytes, comma-separated
SECRET_HEADER = "X-Wanwu-Secret"  # a TCP worker answers only requests carrying its secret
CONNECT_TIMEOUT_S = 5.0  # a TCP worker's connect


class _Dropped(Exception):
    """The worker closed the connection before answering anything."""


class WorkerClient:
    """HTTP client for one worker: its Unix socket path, or a ``(host, port)`` on TCP,
    where every request carries ``secret``."""

    def __init__(
        self,
        socket_path: str | tuple[str, int],
        worker_id: str | None = None,
        timeout: float = 30.0,
        secret: str | None = None,
    ) -> None:
        if isinstance(socket_path, tuple) and not secret:
            raise ValueError("a worker on TCP is reached with its secret")
        self.socket_path = socket_path
        self.worker_id = worker_id
        self.timeout = timeout
        self._secret_line = f"{SECRET_HEADER}: {secret}\r\n" if secret else ""
        self._sock: socket.socket | None = None  # non-blocking once connected
        self._readable: select.poll | None = None  # polls the socket for input (and its hang-up)
        self.connections = 0  # connections opened so far (keep-alive shows as 1)
        self.aborted: str | None = None  # why abort() was called: no new connection is made

    @property
    def who(self) -> str:
        """How errors name this worker."""
        if self.worker_id:
            return self.worker_id
        if isinstance(self.socket_path, str):
            return self.socket_path
        return f"{self.socket_path[0]}:{self.socket_path[1]}"

    def abort(self, reason: str) -> None:
        """Break off a request in flight from another thread (its worker is known to be
        gone): the waiting call, and any later one, fails at once as WorkerCrashed."""
        self.aborted = reason
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _gone(self) -> WorkerCrashed:
        return WorkerCrashed(f"worker {self.who} is gone: {self.aborted}", self.worker_id)

    def close(self) -> None:
        self._readable = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self, deadline: float) -> socket.socket:
        """The kept-alive connection if nothing waits on it (one poll), else a new one.
        Raises WorkerCrashed if the worker sent bytes after its last answer."""
        if self.aborted:
            raise self._gone()
        if self._sock is not None and self._readable is not None:
            if not self._readable.poll(0) or not self._drop_idle(self._sock):
                return self._sock
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left to connect")
        if isinstance(self.socket_path, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(left)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in self.socket_path[0] else socket.AF_INET)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A worker that does not accept within seconds is gone (its node died):
            # not a slow answer to wait the request's whole timeout for.
            sock.settimeout(min(left, CONNECT_TIMEOUT_S))
        self._sock = sock  # abort() can break off the connect too
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            self._sock = None
            sock.close()
            if isinstance(exc, TimeoutError) and not isinstance(self.socket_path, str):
                raise ConnectionError(f"no connection within {CONNECT_TIMEOUT_S:g} s") from None
            raise
        sock.setblocking(False)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self.connections += 1
        if self.aborted:  # abort() ran while this connected: it may not have seen the socket
            self.close()
            raise self._gone()
        return sock

    def _drop_idle(self, sock: socket.socket) -> bool:
        """Close a kept-alive connection with something waiting on it, and say so: the
        worker's hang-up (it closed the idle connection: connect afresh), or bytes it
        sent after its last answer, which are garbage, as is the worker (WorkerCrashed)."""
        try:
            waiting = sock.recv(64, socket.MSG_PEEK)
        except BlockingIOError:
            return False  # nothing after all
        except OSError:
            waiting = b""
        self.close()
        if waiting:
            raise WorkerCrashed(
                f"worker {self.who} sent bytes after its last answer, unasked: {waiting!r}", self.worker_id
            )
        return True

    def _wait(self, sock: socket.socket, deadline: float, writing: bool = False) -> None:
        """Until ``sock`` can be read (or written), or TimeoutError at ``deadline``."""
        left = deadline - time.monotonic()
        if writing:
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
        else:
            assert self._readable is not None
            poller = self._readable
        if left <= 0 or not poller.poll(math.ceil(left * 1000)):
            raise TimeoutError("the call's deadline passed")

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> None:
        try:
            sent = sock.send(data)  # a small request: one write
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            self._wait(sock, deadline, writing=True)
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                pass

    def _recv(self, sock: socket.socket, deadline: float) -> bytes:
        while True:
            self._wait(sock, deadline)
            try:
                return sock.recv(READ_SIZE)
            except BlockingIOError:
                continue

    def _exchange(
        self, head: bytes, body: Sequence[bytes], size: int, deadline: float, limit: int
    ) -> tuple[int, bytearray, bool]:
        """Send a request; return the answer's status, body (at most ``limit`` bytes)
        and whether the worker closes the connection after it."""
        sock = self._connect(deadline)
        if size <= ONE_WRITE_LIMIT:
            self._send(sock, b"".join((head, *body)), deadline)
        else:
            self._send(sock, head, deadline)
            for part in body:
                self._send(sock, part, deadline)
        buffer = bytearray()
        while True:
            try:
                chunk = self._recv(sock, deadline)
            except ConnectionResetError:
                if not buffer:
                    raise _Dropped from None
                raise _Malformed(f"with a head cut off after {len(buffer)} bytes (the connection was reset)") from None
            if not chunk:
                if not buffer:
                    raise _Dropped
                raise _Malformed(f"with a head cut off after {len(buffer)} bytes (the connection closed)")
            searched = max(0, len(buffer) - 3)
            buffer += chunk
            if (end := buffer.find(b"\r\n\r\n", searched)) >= 0:
                break
            if len(buffer) >= MAX_HEAD_BYTES:
                raise _Malformed(f"with a head of more than {MAX_HEAD_BYTES} bytes")
        if end + 4 > MAX_HEAD_BYTES:
            raise _Malformed(f"with a head of {end + 4} bytes, more than {MAX_HEAD_BYTES}")
        status, length, close = _parse_head(buffer[:end])
        if length > limit:
            raise _Malformed(f"with a body of {length} bytes, more than the {limit} allowed")
        got = len(buffer) - end - 4
        if got > length:
            raise _Malformed(f"with {got - length} bytes past its Content-Length of {length}")
        if got == length:
            del buffer[: end + 4]
            return status, buffer, close
        payload = bytearray(length)
        with memoryview(payload) as view:
            view[:got] = memoryview(buffer)[end + 4 :]
            while got < length:
                self._wait(sock, deadline)
                try:
                    count = sock.recv_into(view[got:])
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    count = 0
                if not count:
                    raise _Malformed(f"with a body that ended after {got} of {length} bytes (the connection closed)")
                got += count
        return status, payload, close

    def _request(
        self, method: str, path: str, body: Sequence[bytes], timeout: float, headers: str = "", images: int = 0
    ) -> tuple[int, dict[str, Any]]:
        """Send ``body`` (its parts back to back, ``images`` of them images) with
        ``headers`` (complete lines); return the status and the JSON answer, all within
        ``timeout``."""
        deadline = time.monotonic() + timeout
        size = sum(len(part) for part in body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: worker\r\nContent-Type: application/octet-stream\r\n"
            f"{self._secret_line}{headers}Content-Length: {size}\r\n\r\n"
        ).encode("ascii")
        limit = ANSWER_BASE_BYTES + ANSWER_BYTES_PER_IMAGE * images
        call = f"{method} {path.partition('?')[0]}"
        # A kept-alive connection may have been closed by the worker since its last use:
        # retry once on a fresh connection.
        for attempt in (1, 2):
            reused = self._sock is not None
            try:
                status, raw, close = self._exchange(head, body, size, deadline, limit)
            except TimeoutError as exc:
                self.close()
                raise WorkerTimeout(
                    f"worker {self.who} did not answer {method} {path} within {timeout:g} s", self.worker_id
                ) from exc
            except (_Dropped, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1 and not self.aborted:  # inference is idempotent: one more try is safe
                    continue
                raise self._failed(call, exc) from exc
            except (_Malformed, OSError, ValueError) as exc:
                self.close()
                raise self._failed(call, exc) from exc
            except WorkerCrashed:
                self.close()
                raise
            if close:
                self.close()
            return status, self._parse(status, raw)
        raise AssertionError("unreachable")

    def _failed(self, call: str, exc: Exception) -> WorkerCrashed:
        if self.aborted:
            return self._gone()
        if isinstance(exc, _Malformed):
            return WorkerCrashed(f"worker {self.who} answered {call} {exc}", self.worker_id)
        return WorkerCrashed(f"worker {self.who} failed {call}: {type(exc).__name__}: {exc}", self.worker_id)

    def _parse(self, status: int, raw: bytearray) -> dict[str, Any]:
        """The answer's JSON object: strict JSON, no NaN or Infinity, not too deep."""
        try:
            payload = _DECODER.decode(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise WorkerCrashed(
                f"worker {self.who} answered {status} with non-JSON ({type(exc).__name__}: {str(exc)[:100]}): "
                f"{bytes(raw[:100])!r}",
                self.worker_id,
            ) from None
        if not isinstance(payload, dict):
            raise WorkerCrashed(
                f"worker {self.who} answered {status} with {_kind(payload)}, not an object: {_clip(payload)}",
                self.worker_id,
            )
        return payload

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        status, payload = self._request("GET", "/healthz", (), timeout)
        if status != 200:
            raise WorkerCrashed(f"worker {self.who} /healthz answered {status}: {_clip(payload)}", self.worker_id)
        try:
            _check_health(payload)
        except _Malformed as exc:
            raise WorkerCrashed(f"worker {self.who} answered /healthz {exc}", self.worker_id) from None
        return payload

    def predict(
        self, image: bytes, top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerAnswer:
        """Classify ``image`` (or, for an embedding model, embed it); with ``scores``,
        the answer also has those labels' raw scores (``logits``, in ``scores.labels``
        order). Raises WorkerRejected (4xx: bad input), WorkerCrashed (5xx, dropped
        connection, garbage) or WorkerTimeout."""
        payload, elapsed = self._infer(_query("/predict", top_k, scores), [image], timeout)
        timing = payload.get("timing_ms")
        if not _is_result(payload) or "error" in payload or not isinstance(timing, dict):
            raise WorkerCrashed(f"worker {self.who} answered without predictions: {_clip(payload)}", self.worker_id)
        try:
            entry = _entry(payload, top_k, scores)
            _check_timing(timing)
        except _Malformed as exc:
            raise WorkerCrashed(f"worker {self.who} answered /predict {exc}", self.worker_id) from None
        extra = {key: entry[key] for key in EXTRA_KEYS if key in entry}
        return WorkerAnswer(entry.get("predictions") or [], timing, elapsed, extra)

    def predict_batch(
        self, images: list[bytes], top_k: int = 5, timeout: float | None = None, scores: Scores | None = None
    ) -> WorkerBatchAnswer:
        """Classify ``images`` in one call (one forward pass; at most the model's max
        batch size). An image the worker cannot decode gets its own error entry. Raises
        as ``predict`` does, and WorkerCrashed unless the answer has one entry per image."""
        parts = ",".join(str(len(image)) for image in images)
        path = _query("/predict_batch", top_k, scores)
        payload, elapsed = self._infer(path, images, timeout, f"{PARTS_HEADER}: {parts}\r\n")
        results, timing = payload.get("results"), payload.get("timing_ms")
        if not isinstance(results, list) or not isinstance(timing, dict):
            raise WorkerCrashed(f"worker {self.who} answered without results: {_clip(payload)}", self.worker_id)
        if len(results) != len(images):
            raise WorkerCrashed(
                f"worker {self.who} answered {len(results)} results for {len(images)} images", self.worker_id
            )
        checked = []
        for index, entry in enumerate(results):
            if not _is_result(entry):
                raise WorkerCrashed(
                    f"worker {self.who} answered result {index} with neither predictions nor an error: {_clip(entry)}",
                    self.worker_id,
                )
            try:
                checked.append(_entry(entry, top_k, scores))
            except _Malformed as exc:
                raise WorkerCrashed(f"worker {self.who} answered result {index} {exc}", self.worker_id) from None
        try:
            _check_timing(timing)
        except _Malformed as exc:
            raise WorkerCrashed(f"worker {self.who} answered /predict_batch {exc}", self.worker_id) from None
        return WorkerBatchAnswer(checked, timing, elapsed)

    def _infer(
        self, path: str, body: Sequence[bytes], timeout: float | None, headers: str = ""
    ) -> tuple[dict[str, Any], float]:
        """POST an inference request; return a 200's answer and the round trip in ms.
        A 4xx is WorkerRejected, any other status WorkerCrashed."""
        started = time.perf_counter()
        status, payload = self._request("POST", path, body, timeout or self.timeout, headers, len(body))
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        if status == 200:
            return payload, elapsed
        code, message = _error(payload)
        if 400 <= status < 500:
            text = message if message is not None else _clip(payload)
            raise WorkerRejected(text, status, code if code is not None else "bad_input", self.worker_id)
        raise WorkerCrashed(f"worker {self.who} answered {status}: {code}: {message}", self.worker_id)

    def load(self, model_dir: str, timeout: float) -> dict[str, Any]:
        """Turn a stem cell into a worker of the bundle in ``model_dir`` (a directory
        name under its models root); returns its health with ``timing_ms`` (load,
        warmup, total). Raises WorkerStartError (with the worker's reason) if the
        bundle does not load; the stem cell is then broken and must be replaced."""
        body = json.dumps({"model": model_dir}).encode("utf-8")
        status, payload = self._request("POST", "/load", [body], timeout)
        if status != 200:
            code, message = _error(payload)
            raise WorkerStartError(
                f"stem cell {self.who} could not load {model_dir}: {code}: {message}", self.worker_id
            )
        try:
            _check_health(payload)
            if "timing_ms" in payload:
                _check_timing(payload["timing_ms"])
        except _Malformed as exc:
            raise WorkerCrashed(f"stem cell {self.who} answered /load {exc}", self.worker_id) from None
        return payload


def _query(path: str, top_k: int, scores: Scores | None) -> str:
    """An inference path with its query: top_k and the raw scores asked for."""
    return f"{path}?top_k={top_k}" + (scores.query() if scores is not None else "")
