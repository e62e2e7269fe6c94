"""Run the gateway: prepare the pool, then serve the app with waitress behind guards.

Why waitress: its event loop reads every request whole, headers and body (the body
spooled to a temporary file past ``INBUF_SPOOL_BYTES``), before a request thread sees
it, so a slow client costs a socket and a little memory, never one of the
``http_threads`` threads that run the app. gunicorn's ``gthread`` worker read the body
in the thread: 32 stalled uploads stopped every route.

What this module adds to waitress (``FrontServer`` here, ``GuardedChannel`` in
``front_channel``, their limits and counters in ``front_limits``):

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
import logging
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

from waitress.adjustments import Adjustments
from waitress.server import TcpWSGIServer

from scheduler.assembly import build_pool
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from .app import create_app
from .front_channel import (
    ERROR_CODES,
    LINGER_S,
    MAX_CHUNK_LINE_BYTES,
    MAX_TRAILER_BYTES,
    GuardedChannel,
    JsonErrorTask,
    RequestTimeout,
    TooLarge,
    canned,
    error_body,
)
from .front_limits import FrontCollector, FrontLimits, FrontStats

__all__ = [
    "ERROR_CODES",
    "GUARD_INTERVAL_S",
    "INBUF_SPOOL_BYTES",
    "LINGER_S",
    "MAX_CHUNK_LINE_BYTES",
    "MAX_HEAD_BYTES",
    "MAX_TRAILER_BYTES",
    "FrontCollector",
    "FrontLimits",
    "FrontServer",
    "FrontStats",
    "GatewayServer",
    "GuardedChannel",
    "JsonErrorTask",
    "RequestTimeout",
    "TooLarge",
    "canned",
    "error_body",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)

INBUF_SPOOL_BYTES = 256 * 1024  # a body past this is spooled to a temporary file
MAX_HEAD_BYTES = 64 * 1024  # request line and headers: room for a ?labels= list of a few hundred labels
GUARD_INTERVAL_S = 0.25  # how often the guards look at every connection


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
