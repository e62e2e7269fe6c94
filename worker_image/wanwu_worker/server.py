"""The warm mode: HTTP/1.1 over a Unix socket.

    GET  /healthz            {"status": "ready", "model", "device", "gpu_memory_mb", ...}
    POST /predict?top_k=K    body: image bytes -> {"predictions": [...], "timing_ms": {...}}

Errors are ``{"error": {"code", "message"}}`` with 400/404/405/411/413/500. The socket
appears only once the model is loaded and warmed up (it is bound under a temporary name
and renamed), so a client that can connect is talking to a ready worker.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socketserver
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .errors import InputError, LengthRequired, PayloadTooLarge, WorkerError
from .predictor import Predictor, parse_top_k

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/wanwu/worker.sock"
DEFAULT_MAX_BODY = 20 * 2**20


class WorkerServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP server on a Unix socket; threads let /healthz answer while an
    inference runs (the predictor serialises the model itself)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, predictor: Predictor, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.predictor = predictor
        self.max_body = max_body
        self.final_path = path
        temp = f"{path}.{os.getpid()}.tmp"
        for stale in (temp, path):
            if os.path.exists(stale):
                os.unlink(stale)
        super().__init__(temp, Handler)
        # The host side may run as another user; the directory itself guards access.
        os.chmod(temp, 0o666)
        os.replace(temp, path)

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.final_path)
        except FileNotFoundError:
            pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WorkerServer
    server_version = "wanwu-worker"
    sys_version = ""

    def address_string(self) -> str:  # Unix sockets have no peer address.
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, {"error": {"code": code, "message": message}})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib parser (bad request line, ...) as JSON."""
        self.close_connection = True
        self._send_error(code, HTTPStatus(code).phrase.lower().replace(" ", "_"), message or HTTPStatus(code).phrase)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send_json(200, self.server.predictor.health())
        elif path == "/predict":
            self._send_error(405, "method_not_allowed", "use POST /predict with the image as the body")
        else:
            self._send_error(404, "not_found", f"no route {path}")

    def do_POST(self) -> None:
        received = time.perf_counter()
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._discard_body()
            self._send_error(404, "not_found", f"no route {url.path}")
            return
        try:
            query = parse_qs(url.query)
            top_k = parse_top_k(query.get("top_k", [None])[0])
            data = self._read_body()
            result = self.server.predictor.predict(data, top_k)
        except WorkerError as exc:
            if not isinstance(exc, InputError):
                log.error("predict failed: %s", exc)
            self._send_error(exc.status, exc.code, exc.message)
            return
        except Exception as exc:  # the worker must outlive any one request
            log.exception("unexpected error in /predict")
            self._send_error(500, "internal", f"{type(exc).__name__}: {exc}")
            return
        timing = dict(result.timing_ms)
        timing["server"] = round((time.perf_counter() - received) * 1000, 3)
        self._send_json(200, {"predictions": result.predictions, "timing_ms": timing})

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise LengthRequired("chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else 0
        except ValueError:
            self.close_connection = True
            raise InputError(f"Content-Length is {raw!r}", code="bad_request") from None
        if length < 0:
            self.close_connection = True
            raise InputError(f"Content-Length is {raw!r}", code="bad_request")
        return length

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length > self.server.max_body:
            # Do not read a body we will not use; the connection cannot be reused.
            self.close_connection = True
            raise PayloadTooLarge(f"body is {length} bytes; the limit is {self.server.max_body}")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise InputError(f"body ended after {len(data)} of {length} bytes", code="incomplete_body")
        return data

    def _discard_body(self) -> None:
        try:
            length = self._content_length()
        except WorkerError:
            return
        if length > self.server.max_body:
            self.close_connection = True
        else:
            self.rfile.read(length)


def serve(predictor: Predictor, socket_path: str = DEFAULT_SOCKET, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Serve until SIGTERM or SIGINT, then remove the socket."""
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
    server = WorkerServer(socket_path, predictor, max_body)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "serving model %s on %s (device %s, load %.0f ms, warm-up %.0f ms)",
        predictor.bundle.name,
        socket_path,
        predictor.device,
        predictor.load_ms,
        predictor.warmup_ms,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
