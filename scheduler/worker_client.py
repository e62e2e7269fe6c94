"""Talk to one worker over HTTP/1.1 on its Unix socket, or over TCP with its secret
(workers on a swarm's overlay network).

One persistent connection per client; a client is used by one request at a time (the
pool's lease guarantees it). This is on every request's path, so it is lean: a small
request goes out in one write and the answer is parsed with a buffered reader
(http.client writes headers and body separately and parses headers with the email
package; together that was about a quarter of the gateway's time per request). A large
body (a big image, a batch) goes out as the head and then each part, never copied into
one buffer.

Transport failures become the scheduler's errors here and nowhere else: a refused or
dropped connection or a malformed answer is WorkerCrashed, a timeout is WorkerTimeout,
a 4xx is WorkerRejected (the client's input).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote

from .errors import WorkerCrashed, WorkerRejected, WorkerStartError, WorkerTimeout

MAX_HEADER_LINES = 100
ONE_WRITE_LIMIT = 256 * 1024  # above this, the head and each body part go in their own writes, not one copy
PARTS_HEADER = "X-Wanwu-Parts"  # /predict_batch: each image's length in bytes, comma-separated
SECRET_HEADER = "X-Wanwu-Secret"  # a TCP worker answers only requests carrying its secret
CONNECT_TIMEOUT_S = 5.0  # a TCP worker's connect


class _Dropped(Exception):
    """The worker closed the connection before answering anything."""


# What a worker may answer for one image besides its predictions: an embedding model's
# vector and width, and the raw scores of the labels a subset asked for.
EXTRA_KEYS = ("embedding", "dim", "logits", "logits_of", "groups")


@dataclass(frozen=True)
class Scores:
    """The labels a call wants raw scores (``logits``) for, to score label subsets:
    the model's named ``subsets``, then ``columns`` (label indices, ascending, of a
    model with ``width`` labels); ``labels`` is what that comes to, in the order the
    worker answers, each label once, and ``digest`` their ``labels_digest``, which the
    worker's answer must carry."""

    subsets: tuple[str, ...]
    columns: tuple[int, ...]
    width: int
    labels: tuple[str, ...]
    digest: str

    def query(self) -> str:
        """The query parameters: named subsets by name, columns as a list or, where
        shorter, as a bitmap (bounded by the number of labels, however many are asked)."""
        named = "".join(f"&subset={quote(name, safe='')}" for name in self.subsets)
        if not self.columns:
            return named
        listed = ",".join(map(str, self.columns))
        mask = bytearray((self.width + 7) // 8)
        for column in self.columns:
            mask[column // 8] |= 1 << (column % 8)
        packed = base64.urlsafe_b64encode(bytes(mask)).rstrip(b"=").decode("ascii")
        return named + (f"&columns={listed}" if len(listed) <= len(packed) else f"&column_mask={packed}")


@dataclass(frozen=True)
class WorkerAnswer:
    predictions: list[dict[str, Any]]  # empty for an embedding model
    timing_ms: dict[str, float]
    round_trip_ms: float
    extra: dict[str, Any] = field(default_factory=dict)  # EXTRA_KEYS the worker answered

    def entry(self) -> dict[str, Any]:
        """The answer as one image's entry, shaped like a batch answer's."""
        return {"predictions": self.predictions, **self.extra}


@dataclass(frozen=True)
class WorkerBatchAnswer:
    """One entry per image sent, in order: ``{"predictions": [...]}`` or, for an image
    the worker could not decode, ``{"error": {"code", "message"}}``."""

    results: list[dict[str, Any]]
    timing_ms: dict[str, float]
    round_trip_ms: float


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
        self._sock: socket.socket | None = None
        self._reader: BinaryIO | None = None
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
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self, timeout: float) -> tuple[socket.socket, BinaryIO]:
        if self.aborted:
            raise self._gone()
        if self._sock is None or self._reader is None:
            if isinstance(self.socket_path, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
            else:
                sock = socket.socket(socket.AF_INET6 if ":" in self.socket_path[0] else socket.AF_INET)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A worker that does not accept within seconds is gone (its node died):
                # not a slow answer to wait the request's whole timeout for.
                sock.settimeout(min(timeout, CONNECT_TIMEOUT_S))
            self._sock = sock  # abort() can break off the connect too
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                self._sock = None
                sock.close()
                if isinstance(exc, TimeoutError):
                    raise ConnectionError(f"no connection within {CONNECT_TIMEOUT_S:g} s") from None
                raise
            self._reader = sock.makefile("rb")
            self.connections += 1
            if self.aborted:  # abort() ran while this connected: it may not have seen the socket
                self.close()
                raise self._gone()
        self._sock.settimeout(timeout)
        return self._sock, self._reader

    def _exchange(self, head: bytes, body: Sequence[bytes], size: int, timeout: float) -> tuple[int, bytes, bool]:
        sock, reader = self._connect(timeout)
        if size <= ONE_WRITE_LIMIT:
            sock.sendall(b"".join((head, *body)))
        else:
            sock.sendall(head)
            for part in body:
                sock.sendall(part)
        status_line = reader.readline(65537)
        if not status_line:
            raise _Dropped
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise WorkerCrashed(
                f"worker {self.who} answered a malformed status line: {status_line[:100]!r}", self.worker_id
            )
        length, close = None, parts[0] == b"HTTP/1.0"
        for _ in range(MAX_HEADER_LINES):
            line = reader.readline(65537)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionResetError("connection closed inside the headers")
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        else:
            raise WorkerCrashed(f"worker {self.who} sent more than {MAX_HEADER_LINES} header lines", self.worker_id)
        if length is None:
            raise WorkerCrashed(f"worker {self.who} answered without Content-Length", self.worker_id)
        payload = reader.read(length)
        if len(payload) != length:
            raise ConnectionResetError(f"answer ended after {len(payload)} of {length} bytes")
        return int(parts[1]), payload, close

    def _request(
        self, method: str, path: str, body: Sequence[bytes], timeout: float, headers: str = ""
    ) -> tuple[int, dict[str, Any]]:
        """Send ``body`` (its parts back to back) with ``headers`` (complete lines);
        return the status and the JSON answer."""
        size = sum(len(part) for part in body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: worker\r\nContent-Type: application/octet-stream\r\n"
            f"{self._secret_line}{headers}Content-Length: {size}\r\n\r\n"
        ).encode("ascii")
        # A kept-alive connection may have been closed by the worker since its last use:
        # retry once on a fresh connection.
        for attempt in (1, 2):
            reused = self._sock is not None
            try:
                status, raw, close = self._exchange(head, body, size, timeout)
            except TimeoutError as exc:
                self.close()
                raise WorkerTimeout(
                    f"worker {self.who} did not answer {method} {path} within {timeout:g} s", self.worker_id
                ) from exc
            except (_Dropped, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:  # inference is idempotent: one more try is safe
                    continue
                raise WorkerCrashed(
                    f"worker {self.who} failed {method} {path}: {type(exc).__name__}: {exc}", self.worker_id
                ) from exc
            except (OSError, ValueError) as exc:
                self.close()
                raise WorkerCrashed(
                    f"worker {self.who} failed {method} {path}: {type(exc).__name__}: {exc}", self.worker_id
                ) from exc
            except WorkerCrashed:
                self.close()
                raise
            if close:
                self.close()
            try:
                payload = json.loads(raw)
                if not isinstance(payload, dict):
                    raise ValueError(f"expected an object, got {type(payload).__name__}")
            except ValueError as exc:
                raise WorkerCrashed(
                    f"worker {self.who} answered {status} with non-JSON: {raw[:200]!r}", self.worker_id
                ) from exc
            return status, payload
        raise AssertionError("unreachable")

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        status, payload = self._request("GET", "/healthz", (), timeout)
        if status != 200:
            raise WorkerCrashed(f"worker {self.who} /healthz answered {status}: {payload}", self.worker_id)
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
            raise WorkerCrashed(f"worker {self.who} answered without predictions: {str(payload)[:200]}", self.worker_id)
        extra = {key: payload[key] for key in EXTRA_KEYS if key in payload}
        return WorkerAnswer(payload.get("predictions") or [], timing, elapsed, extra)

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
            raise WorkerCrashed(f"worker {self.who} answered without results: {str(payload)[:200]}", self.worker_id)
        if len(results) != len(images):
            raise WorkerCrashed(
                f"worker {self.who} answered {len(results)} results for {len(images)} images", self.worker_id
            )
        for index, entry in enumerate(results):
            if not _is_result(entry):
                raise WorkerCrashed(
                    f"worker {self.who} answered result {index} with neither predictions nor an error: "
                    f"{str(entry)[:200]}",
                    self.worker_id,
                )
        return WorkerBatchAnswer(results, timing, elapsed)

    def _infer(
        self, path: str, body: Sequence[bytes], timeout: float | None, headers: str = ""
    ) -> tuple[dict[str, Any], float]:
        """POST an inference request; return a 200's answer and the round trip in ms.
        A 4xx is WorkerRejected, any other status WorkerCrashed."""
        started = time.perf_counter()
        status, payload = self._request("POST", path, body, timeout or self.timeout, headers)
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        if status == 200:
            return payload, elapsed
        raw_error = payload.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        if 400 <= status < 500:
            raise WorkerRejected(
                str(error.get("message", payload)), status, str(error.get("code", "bad_input")), self.worker_id
            )
        raise WorkerCrashed(
            f"worker {self.who} answered {status}: {error.get('code')}: {error.get('message')}", self.worker_id
        )

    def load(self, model_dir: str, timeout: float) -> dict[str, Any]:
        """Turn a stem cell into a worker of the bundle in ``model_dir`` (a directory
        name under its models root); returns its health with ``timing_ms`` (load,
        warmup, total). Raises WorkerStartError (with the worker's reason) if the
        bundle does not load; the stem cell is then broken and must be replaced."""
        body = json.dumps({"model": model_dir}).encode("utf-8")
        status, payload = self._request("POST", "/load", [body], timeout)
        if status != 200:
            raw_error = payload.get("error")
            error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
            raise WorkerStartError(
                f"stem cell {self.who} could not load {model_dir}: {error.get('code')}: {error.get('message')}",
                self.worker_id,
            )
        return payload


def _query(path: str, top_k: int, scores: Scores | None) -> str:
    """An inference path with its query: top_k and the raw scores asked for."""
    return f"{path}?top_k={top_k}" + (scores.query() if scores is not None else "")


def _is_result(entry: Any) -> bool:
    """One image's answer: predictions, an embedding, or an error."""
    return isinstance(entry, dict) and (
        isinstance(entry.get("predictions"), list)
        or isinstance(entry.get("embedding"), list)
        or isinstance(entry.get("error"), dict)
    )
