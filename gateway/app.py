"""The HTTP API: the Flask application factory, its services and its request hooks.

The routes are Blueprints, one module per concern:

    gateway.predict   POST /predict, /v1/models/<name>/predict, /v1/models/<name>/embed
    gateway.batch     POST /v1/models/<name>/predict:batch, /v1/models/<name>/embed:batch
    gateway.catalog   GET  /v1/models
    gateway.health    GET  /v1/pool, /healthz, /readyz, /metrics
    gateway.admin     GET, PATCH /v1/pool/settings
    gateway.dashboard GET  /dashboard, /dashboard/<asset>
    gateway.openapi   GET  /openapi.json (gateway/openapi.json; its shapes: gateway.shapes)

Here, around every request: its id (``X-Request-ID``, echoed or made), the client gate
(one client, an address, an IPv6 /64 or behind a trusted proxy the address it
forwards, has at most ``client_max_requests`` requests in the app at once; past that a
429 with Retry-After; /healthz, /readyz and /metrics are not counted), the error
handlers (every error is ``{"error": {"code", "message", "request_id"}}``, built by
``gateway.errors``; scheduler errors map to one status each), and at the end the access
log and the request's metrics (``Metrics.record``), from the ``RequestRecord`` the
route filled in.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from scheduler.assembly import build_pool
from scheduler.errors import WanwuError
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from . import admin, batch, catalog, dashboard, health, openapi, predict
from .accesslog import JsonAccessLog
from .cache import ResultCache
from .clients import ClientGate, Network, client_address, in_networks, parse_networks, peer_key
from .errors import UNEXPECTED, ApiError, error_response, from_http, translate
from .health import UNCOUNTED
from .inputs import MULTIPART_SLACK
from .metrics import Metrics, RequestRecord
from .services import ReadinessLog, Services, record, services

__all__ = [
    "MULTIPART_SLACK",
    "ApiError",
    "ClientGate",
    "Network",
    "ReadinessLog",
    "Services",
    "client_address",
    "create_app",
    "in_networks",
    "parse_networks",
    "peer_key",
    "services",
]

log = logging.getLogger(__name__)
access_log = logging.getLogger("wanwu.access")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
BLUEPRINTS = (predict.bp, batch.bp, catalog.bp, health.bp, admin.bp, dashboard.bp, openapi.bp)


def create_app(
    settings: Settings | None = None, pool: WarmPool | None = None, test_config: dict[str, Any] | None = None
) -> Flask:
    """Build the app around ``pool`` (tests inject one with a fake backend); without
    one, a pool over the configured backend is made from ``settings`` and started."""
    settings = settings or Settings.load()
    if pool is None:
        pool = build_pool(settings)
    app = Flask("wanwu", static_folder=None)  # the dashboard serves its own assets
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_SLACK
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if test_config:
        app.config.update(test_config)
    app.extensions["wanwu"] = Services(
        settings,
        pool,
        pool.catalog,
        Metrics(pool.snapshot),
        ResultCache(settings.cache_size, settings.cache_ttl_s, settings.cache_enabled),
        JsonAccessLog(Path(settings.access_log).expanduser()) if settings.access_log else None,
        ClientGate(settings.client_max_requests),
        parse_networks(settings.trusted_proxies),
    )
    keeper = admin.Admin(settings, pool)
    app.extensions["wanwu_admin"] = keeper
    app.before_request(_arrived)
    app.teardown_request(_left)
    app.after_request(_finished)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(WanwuError, _scheduler_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    keeper.restore()
    return app


# -- around every request ------------------------------------------------------------------


def _arrived() -> None:
    """Start the request's record (its id, when it arrived) and let its client in, or not."""
    given = request.headers.get("X-Request-ID", "")
    rec = g.record = RequestRecord(
        given if REQUEST_ID.match(given) else uuid.uuid4().hex, time.perf_counter(), time.time()
    )
    svc = services()
    if svc.gate is not None and request.path not in UNCOUNTED:
        forwarded = request.headers.get("X-Forwarded-For")
        key = peer_key(client_address(request.remote_addr or "", forwarded, svc.trusted))
        if not svc.gate.enter(key):
            rec.refused = True
            limit = svc.gate.limit
            raise ApiError(429, "too_many_requests", f"{key} has {limit} requests in flight; wait for one to finish", 1)
        g.client_key = key


def _left(_: BaseException | None) -> None:
    key = g.pop("client_key", None)
    if key is not None:
        services().gate.leave(key)  # type: ignore[union-attr]


def _finished(response: Response) -> Response:
    """The request's end: its id on the answer, its access-log lines, its metrics."""
    rec = record()
    response.headers["X-Request-ID"] = rec.request_id
    total = (time.perf_counter() - rec.started) * 1000
    _log_access(rec, response.status_code, total)
    svc = services()
    if svc.access_log is not None:
        svc.access_log.write(_journal_entry(rec, response.status_code, total))
    svc.metrics.record(rec, response.status_code)
    return response


def _logged(text: str) -> str:
    """A path or model name for the text access log, percent-encoded as on the wire: a
    client's space or ``=`` cannot add a field to its own line (``model=x cached=True``)."""
    return quote(text, safe="/:@!$&'()*+,;~-._")


def _log_access(rec: RequestRecord, status: int, total: float) -> None:
    timing = rec.timing or {}
    access_log.info(
        "%s %s %s %d model=%s cold_start=%s cached=%s queue_ms=%.1f spawn_ms=%.1f inference_ms=%.1f worker_ms=%.1f "
        "total_ms=%.1f",
        rec.request_id,
        request.method,
        _logged(request.path),
        status,
        _logged(rec.model or "-"),
        rec.cold_start,
        rec.cached,
        timing.get("queue", 0.0),
        timing.get("spawn", 0.0),
        timing.get("inference", 0.0),
        timing.get("worker", 0.0),
        total,
    )


def _journal_entry(rec: RequestRecord, status: int, total: float) -> dict[str, Any]:
    """The request's line in the JSON access log (``gateway.accesslog``)."""
    timing = rec.timing or {}
    return {
        "ts": round(rec.arrived, 6),
        "request_id": rec.request_id,
        "method": request.method,
        "path": request.path,
        "status": status,
        "model": rec.model,
        "cold_start": rec.cold_start,
        "cached": rec.cached,
        "timing_ms": {**{k: timing.get(k, 0.0) for k in ("queue", "spawn", "worker")}, "total": round(total, 3)},
    }


# -- errors ---------------------------------------------------------------------------------


def _api_error(exc: ApiError) -> Response:
    rec = record()
    rec.error = exc.code
    if exc.detail is not None:  # a server-side failure: what happened is the operator's
        log.warning("%s %s: %s", rec.request_id, rec.model or request.path, exc.detail)
    return error_response(exc, rec.request_id)


def _scheduler_error(exc: WanwuError) -> Response:
    return _api_error(translate(exc))


def _http_error(exc: HTTPException) -> Response:
    s = services().settings
    batched = request.path.endswith(":batch")
    limit = s.max_batch_upload_mb if batched else s.max_upload_mb
    return _api_error(from_http(exc, f"the {'batch' if batched else 'upload'} is larger than {limit:g} MB"))


def _unexpected(exc: Exception) -> Response:
    log.exception("%s unhandled error in %s %s", record().request_id, request.method, request.path)
    return _api_error(ApiError(500, "internal", UNEXPECTED))
