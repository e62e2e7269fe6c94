"""The HTTP front's limits (``FrontLimits``, from the settings) and what it did to
connections (``FrontStats``), counted for /metrics (``FrontCollector``). See
``gateway.server`` for what the front does with them."""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.settings import Settings

from .app import MULTIPART_SLACK, parse_networks


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
