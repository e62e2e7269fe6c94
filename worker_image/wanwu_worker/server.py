"""The warm mode: HTTP/1.1 over a Unix socket, or over TCP with a per-worker secret.
What a worker answers on either (its routes, errors and stem cells) is ``handler``.

The socket appears only once the model is loaded and warmed up (it is bound under a
temporary name and renamed), so a client that can connect is talking to a ready worker.

Over TCP (``serve --listen HOST:PORT``: the swarm backend's workers on an overlay
network) the port is likewise bound only once the worker is ready, and every request
must carry the worker's secret (``--secret-file``, a Docker secret) in
``X-Wanwu-Secret``; anything else is 401 ``unauthorized`` and the connection is closed
unread. A TCP worker refuses to start without a secret.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import contract
from .handler import PARTS_HEADER, SECRET_HEADER, Handler, asked_labels, parse_parts, parse_query
from .predictor import Predictor

if TYPE_CHECKING:
    from .stem import Stem

__all__ = [
    "PARTS_HEADER",
    "SECRET_HEADER",
    "Handler",
    "TcpWorkerServer",
    "WorkerServer",
    "asked_labels",
    "parse_listen",
    "parse_parts",
    "parse_query",
    "read_secret",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_SOCKET = contract.DEFAULT_SOCKET
DEFAULT_MAX_BODY = 20 * 2**20
TCP_IDLE_S = 300.0  # a TCP connection silent this long is closed (the gateway reconnects)


class _Serving:
    """What both servers hold: the predictor or stem cell, the body limit, and the
    secret every request must carry (None: the Unix socket, guarded by its directory)."""

    predictor: Predictor | None
    stem: Stem | None
    broken: str | None
    load_lock: threading.Lock
    max_body: int
    secret: bytes | None

    def _hold(self, predictor: Predictor | None, max_body: int, stem: Stem | None, secret: bytes | None) -> None:
        if predictor is None and stem is None:
            raise ValueError("a worker server needs a predictor or a stem cell")
        self.predictor = predictor
        self.stem = stem
        self.broken = None  # why a load failed: a stem cell is never reused half-loaded
        self.load_lock = threading.Lock()
        self.max_body = max_body
        self.secret = secret


class WorkerServer(_Serving, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP server on a Unix socket; threads let /healthz answer while an
    inference runs (the predictor serialises the model itself)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self, path: str, predictor: Predictor | None, max_body: int = DEFAULT_MAX_BODY, stem: Stem | None = None
    ) -> None:
        self._hold(predictor, max_body, stem, None)
        self.final_path = path
        temp = f"{path}.{os.getpid()}.tmp"
        for stale in (temp, path):
            if os.path.exists(stale):
                os.unlink(stale)
        super().__init__(temp, Handler)
        # Only this user, and root: the gateway connects as one of the two (it runs the
        # worker as itself, or hands the directory to the worker's uid as root).
        os.chmod(temp, 0o600)
        os.replace(temp, path)

    def server_close(self) -> None:
        super().server_close()
        try:
            os.unlink(self.final_path)
        except FileNotFoundError:
            pass


class TcpWorkerServer(_Serving, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The same server on a TCP port, for workers on a network: every request must
    carry ``secret``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        predictor: Predictor | None,
        secret: bytes,
        max_body: int = DEFAULT_MAX_BODY,
        stem: Stem | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("a TCP worker needs a secret of at least 16 bytes")
        self._hold(predictor, max_body, stem, secret)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        # An answer goes out as two writes (head, body): with Nagle's algorithm the body
        # would wait for the client's delayed ACK of the head, 40 ms on Linux.
        connection, address = super().get_request()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.settimeout(TCP_IDLE_S)  # a peer that sends nothing does not hold a thread forever
        return connection, address


def parse_listen(raw: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:PORT`` for IPv6) as an address to bind."""
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {raw!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def read_secret(path: str) -> bytes:
    """The worker's secret from ``path`` (a Docker secret file), stripped."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the worker secret {path}: {exc.strerror or exc}") from None
    if len(secret) < 16:
        raise ValueError(f"the worker secret in {path} is shorter than 16 bytes")
    return secret


def serve(
    predictor: Predictor | None,
    socket_path: str = DEFAULT_SOCKET,
    max_body: int = DEFAULT_MAX_BODY,
    stem: Stem | None = None,
    listen: tuple[str, int] | None = None,
    secret: bytes | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then remove the socket. With ``listen``, serve on
    that TCP address instead, answering only requests that carry ``secret``."""
    server: WorkerServer | TcpWorkerServer
    if listen is not None:
        if secret is None:
            raise ValueError("a TCP worker needs a secret")
        server = TcpWorkerServer(listen, predictor, secret, max_body, stem)
        where = f"tcp {listen[0]}:{listen[1]}"
    else:
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        server = WorkerServer(socket_path, predictor, max_body, stem)
        where = socket_path

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if predictor is not None:
        log.info(
            "serving model %s on %s (device %s, load %.0f ms, warm-up %.0f ms)",
            predictor.bundle.name,
            where,
            predictor.device,
            predictor.load_ms,
            predictor.warmup_ms,
        )
    elif stem is not None:
        log.info("stem cell on %s (device %s, models under %s)", where, stem.device, stem.models_root)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
