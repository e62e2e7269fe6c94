"""What the routes use: the app's services (``create_app`` builds them, or tests inject
a pool) and the record of the request at hand."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from flask import current_app, g

from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from .accesslog import JsonAccessLog
from .cache import ResultCache
from .clients import ClientGate, Network
from .metrics import Metrics, RequestRecord

log = logging.getLogger("gateway.app")  # the readiness lines keep the name they had


class ReadinessLog:
    """Logs each readiness check's detail when it changes (a probe every few seconds
    would otherwise repeat it): the details /readyz no longer gives to anyone asking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[bool, str]] = {}

    def report(self, checks: dict[str, tuple[bool, str]]) -> None:
        with self._lock:
            changed = {name: check for name, check in checks.items() if self._last.get(name) != check}
            self._last = dict(checks)
        for name, (ok, detail) in changed.items():
            (log.info if ok else log.warning)("readiness check %s: %s: %s", name, "ok" if ok else "failing", detail)


@dataclass
class Services:
    """What the routes use; built by ``create_app`` or injected by tests."""

    settings: Settings
    pool: WarmPool
    catalog: ModelCatalog
    metrics: Metrics
    cache: ResultCache
    access_log: JsonAccessLog | None = None
    gate: ClientGate | None = None
    trusted: tuple[Network, ...] = ()
    readiness: ReadinessLog = field(default_factory=ReadinessLog)


def services() -> Services:
    svc: Services = current_app.extensions["wanwu"]
    return svc


def record() -> RequestRecord:
    """The record of the request at hand (made as it arrives; ``gateway.app``)."""
    rec: RequestRecord | None = g.get("record")
    if rec is None:  # an error before the request's first hook ran
        rec = g.record = RequestRecord("-", time.perf_counter(), time.time())
    return rec


def request_id() -> str:
    return record().request_id
