"""Talk to one worker over HTTP on its Unix socket.

One persistent HTTP/1.1 connection per client; a client is used by one request at a
time (the pool's lease guarantees it). Transport failures become the scheduler's
errors here and nowhere else: a refused or dropped connection or a non-JSON answer is
WorkerCrashed, a timeout is WorkerTimeout, a 4xx is WorkerRejected (the client's input).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

from .errors import WorkerCrashed, WorkerRejected, WorkerTimeout


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection to a Unix socket path instead of a TCP address."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True)
class WorkerAnswer:
    predictions: list[dict[str, Any]]
    timing_ms: dict[str, float]
    round_trip_ms: float


class WorkerClient:
    """HTTP client for one worker's socket."""

    def __init__(self, socket_path: str, worker_id: str | None = None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.worker_id = worker_id
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    @property
    def who(self) -> str:
        """How errors name this worker."""
        return self.worker_id or self.socket_path

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, dict[str, Any]]:
        # A kept-alive connection may have been closed by the worker since its last use;
        # retry once on a fresh connection only if nothing of the request was answered.
        for attempt in (1, 2):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.socket_path, timeout)
            conn = self._conn
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except TimeoutError as exc:
                self.close()
                raise WorkerTimeout(
                    f"worker {self.who} did not answer {method} {path} within {timeout:g} s", self.worker_id
                ) from exc
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if (
                    reused
                    and attempt == 1
                    and isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                ):
                    continue
                raise WorkerCrashed(
                    f"worker {self.who} failed {method} {path}: {type(exc).__name__}: {exc}", self.worker_id
                ) from exc
            if response.will_close:
                self.close()
            try:
                payload = json.loads(raw)
                if not isinstance(payload, dict):
                    raise ValueError(f"expected an object, got {type(payload).__name__}")
            except ValueError as exc:
                raise WorkerCrashed(
                    f"worker {self.who} answered {response.status} with non-JSON: {raw[:200]!r}", self.worker_id
                ) from exc
            return response.status, payload
        raise AssertionError("unreachable")

    def health(self, timeout: float = 2.0) -> dict[str, Any]:
        status, payload = self._request("GET", "/healthz", None, timeout)
        if status != 200:
            raise WorkerCrashed(f"worker {self.who} /healthz answered {status}: {payload}", self.worker_id)
        return payload

    def predict(self, image: bytes, top_k: int = 5, timeout: float | None = None) -> WorkerAnswer:
        """Classify ``image``. Raises WorkerRejected (4xx: bad input), WorkerCrashed
        (5xx, dropped connection, garbage) or WorkerTimeout."""
        started = time.perf_counter()
        status, payload = self._request("POST", f"/predict?top_k={top_k}", image, timeout or self.timeout)
        elapsed = (time.perf_counter() - started) * 1000
        raw_error = payload.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        if 400 <= status < 500:
            raise WorkerRejected(
                str(error.get("message", payload)), status, str(error.get("code", "bad_input")), self.worker_id
            )
        if status != 200:
            raise WorkerCrashed(
                f"worker {self.who} answered {status}: {error.get('code')}: {error.get('message')}",
                self.worker_id,
            )
        predictions, timing = payload.get("predictions"), payload.get("timing_ms")
        if not isinstance(predictions, list) or not isinstance(timing, dict):
            raise WorkerCrashed(f"worker {self.who} answered without predictions: {payload}", self.worker_id)
        return WorkerAnswer(predictions, timing, round(elapsed, 3))
