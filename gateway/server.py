"""Run the gateway: prepare the pool, then serve the app with waitress behind guards.

Why waitress: its event loop reads every request whole, headers and body (the body
spooled to a temporary file past ``INBUF_SPOOL_BYTES``), before a request thread sees
it, so a slow client costs a socket and a little memory, never one of the
``http_threads`` threads that run the app. gunicorn's ``gthread`` worker read the body
in the thread: 32 stalled uploads stopped every route.

What this module adds to waitress (``GuardedChannel``, ``FrontServer``):

* a request's head must arrive within ``http_header_timeout_s`` of its first byte, and
  its body at no less than ``http_body_min_kb_s`` after ``http_body_grace_s``; otherwise
  a JSON 408 and the connection closed (a lingering close: the client reads the 408
  rather than a reset);
* a body longer than its route allows is a JSON 413 as soon as the head says so;
* an idle keep-alive connection closes after ``http_keepalive_s``; one whose client stops
  reading the answer after ``http_header_timeout_s`` without progress;
* at most ``http_max_connections`` open connections: at the bound the longest-idle
  keep-alive connection is closed to make room, else the new one gets a JSON 503; at most
  ``http_max_connections_per_client`` from one address (an IPv6 /64), else a JSON 429;
  addresses in ``trusted_proxies`` are exempt (the app bounds each client behind them
  by its forwarded address);
* out of file descriptors, accepting pauses for a moment instead of spinning;
* on SIGTERM: stop accepting, finish what is in flight (``shutdown_grace_s``), then stop
  the pool's workers. A second signal is logged and ignored; one during start-up stops it.

Every time here is ``time.monotonic()`` (waitress's own idle clock is the wall clock and
is switched off): a wall-clock step neither closes every connection nor keeps a stalled
one open.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import resource
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import BadRequest, Error

from scheduler.backends.factory import build_pool
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from .app import MULTIPART_SLACK, create_app, in_networks, parse_networks, peer_key

log = logging.getLogger(__name__)

INBUF_SPOOL_BYTES = 256 * 1024  # a body past this is spooled to a temporary file
MAX_HEAD_BYTES = 64 * 1024  # request line and headers: room for a ?labels= list of a few hundred labels
MAX_CHUNK_LINE_BYTES = 4096  # a chunked body's size line (waitress keeps it in memory and rescans it)
MAX_TRAILER_BYTES = 8192
LINGER_S = 2.0  # after an error answer, how long unread input is drained before the close
GUARD_INTERVAL_S = 0.25  # how often the guards look at every connection
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


@dataclass(frozen=True)
class FrontLimits:
    header_timeout_s: float
    body_min_bytes_s: float
    body_grace_s: float
    keepalive_s: float
    max_connections: int
    max_per_client: int
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    upload_bytes: int  # a predict or embed body
    batch_bytes: int  # a :batch body

    @classmethod
    def of(cls, settings: Settings) -> FrontLimits:
        return cls(
            settings.http_header_timeout_s,
            settings.http_body_min_kb_s * 1024,
            settings.http_body_grace_s,
            settings.http_keepalive_s,
            settings.http_max_connections,
            settings.http_max_connections_per_client,
            parse_networks(settings.trusted_proxies),
            settings.max_upload_bytes + MULTIPART_SLACK,
            settings.max_batch_upload_bytes + MULTIPART_SLACK,
        )

    def body_limit(self, path: str) -> tuple[int, str]:
        if path.endswith(":batch"):
            return self.batch_bytes, "batch"
        return self.upload_bytes, "upload"


class FrontStats:
    """What the front did to connections, for /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.timed_out: Counter[str] = Counter()  # by phase: header, body, idle, send
        self.refused: Counter[str] = Counter()  # by reason: connections, per_client, descriptors
        self.reclaimed = 0  # idle keep-alive connections closed to make room
        self.open = 0

    def count(self, kind: str, key: str) -> None:
        with self._lock:
            getattr(self, kind)[key] += 1


class FrontCollector(Collector):
    def __init__(self, stats: FrontStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._stats
        yield GaugeMetricFamily("wanwu_http_connections_open", "Open HTTP connections", value=s.open)
        timed = CounterMetricFamily(
            "wanwu_http_connections_timed_out", "HTTP connections closed by a time limit, by phase", labels=["phase"]
        )
        for phase in ("header", "body", "idle", "send"):
            timed.add_metric([phase], s.timed_out[phase])
        yield timed
        refused = CounterMetricFamily(
            "wanwu_http_connections_refused", "HTTP connections refused, by reason", labels=["reason"]
        )
        for reason in ("connections", "per_client", "descriptors"):
            refused.add_metric([reason], s.refused[reason])
        yield refused
        reclaimed = CounterMetricFamily(
            "wanwu_http_connections_reclaimed", "Idle keep-alive connections closed to make room for a new one"
        )
        reclaimed.add_metric([], s.reclaimed)
        yield reclaimed


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


class FrontServer(TcpWSGIServer):  # type: ignore[misc]
    """waitress's TCP server with ``GuardedChannel`` connections, the connection bounds
    and a loop that can drain."""

    channel_class = GuardedChannel

    def __init__(self, app: Any, host: str, port: int, threads: int, limits: FrontLimits, stats: FrontStats) -> None:
        self.limits, self.stats = limits, stats
        self.per_client: Counter[str] = Counter()
        self.paused_until = 0.0
        adj = Adjustments(
            host=host,
            port=port,
            threads=threads,
            connection_limit=2**31 - 1,  # the bound is ours (handle_accept): waitress's stops accepting
            channel_timeout=2**31 - 1,  # idle closes are ours (guard), on the monotonic clock
            cleanup_interval=2**31 - 1,
            max_request_header_size=MAX_HEAD_BYTES,
            max_request_body_size=max(limits.upload_bytes, limits.batch_bytes) + 1,
            inbuf_overflow=INBUF_SPOOL_BYTES,
            asyncore_use_poll=True,  # select() cannot watch descriptors past 1024
            ident="wanwu",
            expose_tracebacks=False,
            backlog=1024,
        )
        super().__init__(app, adj=adj, sockinfo=adj.listen[0])

    def opened(self, channel: GuardedChannel) -> None:
        self.per_client[channel.key] += 1
        self.stats.open += 1

    def closed(self, channel: GuardedChannel) -> None:
        self.per_client[channel.key] -= 1
        if self.per_client[channel.key] <= 0:
            del self.per_client[channel.key]
        self.stats.open -= 1

    def readable(self) -> bool:
        if time.monotonic() < self.paused_until:
            return False
        return bool(super().readable())

    def maintenance(self, now: float) -> None:
        pass  # guard() does this, on the monotonic clock

    def handle_accept(self) -> None:
        try:
            pair = self.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.paused_until = time.monotonic() + 0.5
                self.stats.count("refused", "descriptors")
                log.warning("out of file descriptors: not accepting for 0.5 s (%s)", exc)
            return
        if pair is None:
            return
        conn, addr = pair
        try:
            self.set_socket_options(conn)  # TCP_NODELAY: an answer's head and body are separate writes
        except OSError:
            conn.close()  # the client left before it was accepted
            return
        channel = GuardedChannel(self, conn, addr, self.adj, map=self._map)
        limits = self.limits
        if not channel.trusted and self.per_client[channel.key] > limits.max_per_client:
            self.stats.count("refused", "per_client")
            message = f"{channel.key} has {limits.max_per_client} connections open; reuse one (keep-alive)"
            channel.refuse(canned(429, "Too Many Requests", message, retry_after=1))
        elif self.stats.open > limits.max_connections and not self._reclaim(channel):
            self.stats.count("refused", "connections")
            message = f"the gateway has {limits.max_connections} connections open; retry shortly"
            channel.refuse(canned(503, "Service Unavailable", message, retry_after=1))

    def handle_error(self) -> None:
        """waitress's default closes the listening socket: log and keep listening."""
        log.exception("unexpected error while accepting a connection")

    def _reclaim(self, newcomer: GuardedChannel) -> bool:
        """Close the longest-idle keep-alive connection to make room; False if none is idle."""
        idle = [c for c in self.active_channels.values() if c is not newcomer and c.closable()]
        if not idle:
            return False
        min(idle, key=lambda c: c.quiet_since).close_now()
        self.stats.reclaimed += 1
        return True

    def guard(self, now: float) -> None:
        """Time out what has waited too long: heads, slow bodies, idle keep-alive
        connections, clients that stopped reading, lingering closes."""
        limits = self.limits
        for channel in list(self.active_channels.values()):
            if channel.lingering_until is not None:
                if now >= channel.lingering_until:
                    channel.close_now()
                continue
            if channel.total_outbufs_len:
                # A client that stops reading, whether or not a thread still writes to it
                # (pipelined requests answered into a buffer nobody reads: the thread
                # blocks at waitress's high watermark until this close wakes it).
                if channel.pending_since is None:
                    channel.pending_since = now
                if now - max(channel.sent_at, channel.pending_since) > limits.header_timeout_s:
                    self.stats.count("timed_out", "send")
                    channel.close_now()
                continue
            channel.pending_since = None
            if channel.requests:
                continue  # a thread has it
            if channel.began is not None and channel.headers_at is None:
                if now - channel.began > limits.header_timeout_s:
                    self.stats.count("timed_out", "header")
                    channel.answer_error(
                        RequestTimeout(f"the request's head did not arrive within {limits.header_timeout_s:g} s")
                    )
            elif channel.headers_at is not None and channel.request is not None:
                late = now - channel.headers_at - limits.body_grace_s
                if late > 0 and channel.request.body_bytes_received < limits.body_min_bytes_s * late:
                    self.stats.count("timed_out", "body")
                    channel.answer_error(
                        RequestTimeout(f"the body arrived slower than {limits.body_min_bytes_s / 1024:g} KB/s")
                    )
            elif channel.idle() and now - channel.quiet_since > limits.keepalive_s:
                self.stats.count("timed_out", "idle")
                channel.close_now()

    def serve(self, stopping: Callable[[], bool], grace_s: float) -> None:
        """Serve until ``stopping()``, then drain: stop accepting, let requests in
        flight finish for up to ``grace_s``, close the rest."""
        next_guard = 0.0
        while not stopping():
            self.asyncore.loop(timeout=GUARD_INTERVAL_S, map=self._map, use_poll=True, count=1)
            now = time.monotonic()
            if now >= next_guard:
                self.guard(now)
                next_guard = now + GUARD_INTERVAL_S
        self.accepting = False
        self.del_channel()
        self.socket.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            for channel in list(self.active_channels.values()):
                if channel.closable():
                    channel.close_now()
            if not self.active_channels:
                break
            self.asyncore.loop(timeout=0.1, map=self._map, use_poll=True, count=1)
            self.guard(time.monotonic())
        for channel in list(self.active_channels.values()):
            channel.close_now()
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        self.trigger.close()


class GatewayServer:
    """``wanwu serve``: the pool prepared (bundles provided), then the app served by
    ``FrontServer`` until SIGTERM or SIGINT."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.stats = FrontStats()
        self._building = True  # a signal now stops start-up at once
        self._stop_asked = threading.Event()

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._building:
            log.info("%s during start-up: stopping", name)
            self._building = False
            self._stop_asked.set()  # a second signal must not break into the clean-up this starts
            raise SystemExit(128 + signum)
        if self._stop_asked.is_set():
            log.info("%s again: already stopping (in-flight requests have %g s)", name, self.settings.shutdown_grace_s)
            return
        log.info("%s: finishing in-flight requests (up to %g s), then stopping", name, self.settings.shutdown_grace_s)
        self._stop_asked.set()

    def run(self) -> None:
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" on every queued request
        raise_fd_limit(3 * self.settings.http_max_connections + 256)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)
        pool: WarmPool | None = None
        try:
            pool = build_pool(self.settings, start=False)  # may provide the default model: minutes, interruptible
            self._building = False
            pool.start()
            app = create_app(self.settings, pool)
            services_ = app.extensions["wanwu"]
            services_.metrics.registry.register(FrontCollector(self.stats))
            front = FrontServer(
                app, self.host, self.port, self.settings.http_threads, FrontLimits.of(self.settings), self.stats
            )
            log.info("listening on http://%s:%d", self.host, self.port)
            front.serve(self._stop_asked.is_set, self.settings.shutdown_grace_s)
        finally:
            self._building = False
            self._stop_asked.set()  # a signal from here on is logged and ignored: the workers must go
            if pool is not None:
                log.info("shutting down: removing the pool's workers")
                pool.shutdown()


def raise_fd_limit(wanted: int) -> None:
    """Room for every connection the front allows (a descriptor each, and spooled
    bodies): raise the soft limit as far as the hard one permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning("the descriptor limit (%d) is below what %d connections need", hard, wanted)
