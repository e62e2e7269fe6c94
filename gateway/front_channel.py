"""One client connection of the HTTP front (``GuardedChannel``, waitress's channel with
the clocks the server's guard reads) and the JSON error answers the front gives before
the app sees a request. See ``gateway.server`` for the limits they enforce."""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask
from waitress.utilities import BadRequest, Error

from .app import MULTIPART_SLACK, in_networks, peer_key

if TYPE_CHECKING:
    from .server import FrontServer

MAX_CHUNK_LINE_BYTES = 4096  # a chunked body's size line (waitress keeps it in memory and rescans it)
MAX_TRAILER_BYTES = 8192
LINGER_S = 2.0  # after an error answer, how long unread input is drained before the close
ERROR_CODES = {
    400: "bad_request",
    408: "request_timeout",
    413: "too_large",
    429: "too_many_connections",
    431: "headers_too_large",
    501: "not_implemented",
    503: "server_busy",
}


class RequestTimeout(Error):  # type: ignore[misc]
    code = 408
    reason = "Request Timeout"


class TooLarge(Error):  # type: ignore[misc]
    code = 413
    reason = "Content Too Large"


def error_body(status: int, message: str, request_id: str) -> bytes:
    """The API's error shape for answers the front gives before the app sees a request."""
    error = {"code": ERROR_CODES.get(status, "bad_request"), "message": message, "request_id": request_id}
    return json.dumps({"error": error}).encode()


def canned(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection."""
    request_id = uuid.uuid4().hex
    body = error_body(status, message, request_id)
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"X-Request-ID: {request_id}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class JsonErrorTask(ErrorTask):  # type: ignore[misc]
    """waitress's error answers (bad request line, head too large, 408, 413) in the
    API's JSON error shape."""

    def execute(self) -> None:
        error = self.request.error
        request_id = uuid.uuid4().hex
        body = error_body(error.code, f"{error.reason}: {error.body}", request_id)
        self.status = f"{error.code} {error.reason}"
        self.response_headers += [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class GuardedChannel(HTTPChannel):  # type: ignore[misc]
    """One client connection. The server's ``guard`` looks at it every
    ``GUARD_INTERVAL_S`` and times it out by the clocks kept here."""

    error_task_class = JsonErrorTask
    server: FrontServer

    def __init__(self, server: FrontServer, sock: socket.socket, addr: Any, adj: Adjustments, map: Any = None) -> None:  # noqa: A002 (waitress's name)
        self.began: float | None = None  # the first byte of the request being read (blank lines included)
        self.headers_at: float | None = None  # its head complete, its body being read
        self.sized = False  # its body's length checked against its route
        self.quiet_since = time.monotonic()  # opened, or its last answer was handed over
        self.sent_at = 0.0  # the last time some of an answer went out
        self.pending_since: float | None = None  # answer bytes waiting to go out since
        self.lingering_until: float | None = None
        self.linger = False  # drain unread input before closing (after an error answer)
        self.key = peer_key(addr[0]) if isinstance(addr, tuple) else str(addr)
        self.trusted = isinstance(addr, tuple) and in_networks(addr[0], server.limits.trusted)
        super().__init__(server, sock, addr, adj, map)
        server.opened(self)

    # -- reading -----------------------------------------------------------------------

    def received(self, data: bytes) -> bool:
        now = time.monotonic()
        if self.began is None:
            self.began = now
        before = len(self.requests)
        accepted: bool = super().received(data)
        if len(self.requests) > before:  # a whole request went to a thread
            self.began = now if self.request is not None else None
            self.headers_at, self.sized = None, False
        request = self.request
        if request is None or (not request.headers_finished and not request.header_plus.strip()):
            self.began = None  # nothing, or only blank lines (a client's stray CRLF): idle, on the keep-alive clock
        if request is not None and request.headers_finished and not request.completed:
            receiver = request.body_rcv
            if (
                request.chunked
                and receiver is not None
                and (len(receiver.control_line) > MAX_CHUNK_LINE_BYTES or len(receiver.trailer) > MAX_TRAILER_BYTES)
            ):
                self.answer_error(BadRequest("a chunk-size line or trailer that does not end"))
                return accepted
            if self.headers_at is None:
                self.headers_at = now
            limit, what = self.server.limits.body_limit(request.path or "")
            length = request.content_length if not request.chunked else request.body_bytes_received
            if not self.sized or request.chunked:
                self.sized = True
                if length > limit:
                    self.answer_error(TooLarge(f"the {what} is larger than {limit - MULTIPART_SLACK} bytes"))
        return accepted

    def answer_error(self, error: Error) -> None:
        """Answer the request being read with ``error`` (through a request thread, in
        order after any answer in flight) and close the connection after it."""
        with self.requests_lock:
            request: Any = getattr(self, "request")  # noqa: B009 (waitress sets it untyped)
            if request is None or not request.headers_finished:
                request = self.parser_class(self.adj)
                request.parse_header(b"GET / HTTP/1.1\r\n")
            request.error = error
            request.completed = True
            self.request = None
            self.requests.append(request)
            if len(self.requests) == 1:
                self.server.add_task(self)
        self.began = self.headers_at = None
        self.linger = True

    def _flush_some(self, do_close: bool = True) -> bool:
        sent: bool = super()._flush_some(do_close)
        if sent:
            self.sent_at = time.monotonic()
        return sent

    def service(self) -> None:
        if self.requests and self.requests[0].error is not None:
            self.linger = True  # waitress's own 400/431 too: the client may still be sending
        super().service()
        self.quiet_since = time.monotonic()

    # -- closing -----------------------------------------------------------------------

    def readable(self) -> bool:
        if self.lingering_until is not None:
            return True
        return bool(super().readable())

    def writable(self) -> bool:
        if self.lingering_until is not None:
            return False
        return bool(super().writable())

    def handle_read(self) -> None:
        if self.lingering_until is None:
            super().handle_read()
            return
        try:
            self.recv(64 * 1024)  # discarded; EOF closes through handle_close
        except OSError:
            self.close_now()

    def handle_close(self) -> None:
        if self.linger and self.lingering_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)  # the answer is out; the client sees EOF after it
            except OSError:
                self.close_now()
                return
            self.lingering_until = time.monotonic() + LINGER_S
            self.will_close = self.close_when_flushed = False
            return
        self.close_now()

    def close_now(self) -> None:
        self.lingering_until = None
        super().handle_close()

    def del_channel(self, map: Any = None) -> None:  # noqa: A002
        if self._fileno is not None and self._fileno in self.server.active_channels:
            self.server.closed(self)
        super().del_channel(map)

    def has_input(self) -> bool:
        """Bytes (a request) waiting in the socket that the loop has not read yet."""
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return False

    def closable(self) -> bool:
        """Idle, and closing it now loses nothing (no unread request to be reset)."""
        return self.idle() and not self.has_input()

    def refuse(self, answer: bytes) -> None:
        """Answer a connection the server will not serve, then close it."""
        with self.outbuf_lock:
            self.outbufs[-1].append(answer)
            self.total_outbufs_len += len(answer)
        self.close_when_flushed = True
        self.linger = True

    def idle(self) -> bool:
        return (
            (self.request is None or not self.request.header_plus.strip())
            and self.began is None
            and not self.requests
            and not self.total_outbufs_len
            and self.lingering_until is None
            and not self.close_when_flushed
        )
