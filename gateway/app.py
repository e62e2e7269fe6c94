"""The HTTP API (Flask application factory).

    POST /predict                       multipart field "image"; the default model
    POST /v1/models/<name>/predict      multipart "image" or a raw image/* body; ?top_k=
    GET  /v1/models  /v1/pool  /healthz  /readyz  /metrics

Uploads are validated here, before any worker is touched: size (413), content sniffed
from the bytes (415 for non-images, 400 for corrupt ones, 413 past the pixel cap),
top_k, and the model (404). Every error is ``{"error": {"code", "message",
"request_id"}}``; scheduler errors map to one status each (``STATUS``).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, current_app, g, jsonify, request
from wanwu_worker.errors import InputError
from wanwu_worker.preprocess import sniff
from werkzeug.exceptions import HTTPException

from scheduler.errors import (
    BackendUnavailable,
    CapacityExhausted,
    ModelUnavailable,
    UnknownModel,
    WanwuError,
    WorkerCrashed,
    WorkerError,
    WorkerRejected,
    WorkerStartError,
    WorkerStartTimeout,
    WorkerTimeout,
)
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings

from .accesslog import JsonAccessLog
from .cache import ResultCache
from .metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("wanwu.access")

# Scheduler errors to HTTP status, most specific first.
STATUS: tuple[tuple[type[WanwuError], int, str], ...] = (
    (UnknownModel, 404, "unknown_model"),
    (CapacityExhausted, 503, "no_capacity"),
    (ModelUnavailable, 503, "model_unavailable"),
    (BackendUnavailable, 503, "backend_unavailable"),
    (WorkerStartTimeout, 504, "worker_start_timeout"),
    (WorkerTimeout, 504, "worker_timeout"),
    (WorkerStartError, 502, "worker_start_failed"),
    (WorkerCrashed, 502, "worker_failed"),
    (WorkerError, 502, "worker_failed"),
    (WanwuError, 500, "internal"),
)
# Sniffing codes that are not plain 400s.
INPUT_STATUS = {"not_an_image": 415, "unsupported_format": 415, "image_too_large": 413, "too_large": 413}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MULTIPART_SLACK = 64 * 1024


@dataclass
class Services:
    """What the routes use; built by ``create_app`` or injected by tests."""

    settings: Settings
    pool: WarmPool
    catalog: ModelCatalog
    metrics: Metrics
    cache: ResultCache
    access_log: JsonAccessLog | None = None


def services() -> Services:
    svc: Services = current_app.extensions["wanwu"]
    return svc


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def translate(exc: WanwuError) -> ApiError:
    """The one place scheduler errors become HTTP errors."""
    if isinstance(exc, WorkerRejected):
        return ApiError(exc.status if 400 <= exc.status < 500 else 400, exc.code, str(exc))
    for kind, status, code in STATUS:
        if isinstance(exc, kind):
            retry = getattr(exc, "retry_after_s", None)
            if status == 503 and retry is None:
                retry = 5.0
            return ApiError(status, code, str(exc), retry)
    raise AssertionError("unreachable: WanwuError is the last entry")


def create_app(
    settings: Settings | None = None, pool: WarmPool | None = None, test_config: dict[str, Any] | None = None
) -> Flask:
    """Build the app around ``pool`` (tests inject one with a fake backend); without
    one, a Docker-backed pool is made from ``settings`` and started."""
    settings = settings or Settings.load()
    if pool is None:
        from .server import build_pool

        pool = build_pool(settings)
    app = Flask("wanwu")
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
    )
    _register(app)
    return app


def _error_response(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "request_id": g.get("request_id")}})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


def _register(app: Flask) -> None:
    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        g.arrived = time.time()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        g.model = None
        g.timing = None
        g.cold_start = None
        g.cached = None

    @app.after_request
    def finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        total = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        timing = g.get("timing") or {}
        access_log.info(
            "%s %s %s %d model=%s cold_start=%s cached=%s queue_ms=%.1f spawn_ms=%.1f inference_ms=%.1f worker_ms=%.1f "
            "total_ms=%.1f",
            g.get("request_id"),
            request.method,
            request.path,
            response.status_code,
            g.get("model") or "-",
            g.get("cold_start"),
            g.get("cached"),
            timing.get("queue", 0.0),
            timing.get("spawn", 0.0),
            timing.get("inference", 0.0),
            timing.get("worker", 0.0),
            total,
        )
        journal = services().access_log
        if journal is not None:
            journal.write(
                {
                    "ts": round(g.get("arrived", time.time()), 6),
                    "request_id": g.get("request_id"),
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "model": g.get("model"),
                    "cold_start": g.get("cold_start"),
                    "cached": g.get("cached"),
                    "timing_ms": {
                        **{k: timing.get(k, 0.0) for k in ("queue", "spawn", "worker")},
                        "total": round(total, 3),
                    },
                }
            )
        return response

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return _error_response(exc.status, exc.code, exc.message, exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if status == 413:
            code = "too_large"
            message = f"the upload is larger than {services().settings.max_upload_mb:g} MB"
        return _error_response(status, code, message)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal", "internal error; see the gateway log")

    @app.post("/predict")
    def predict_default() -> Response:
        return _predict(services().settings.default_model, raw_allowed=False)

    @app.post("/v1/models/<name>/predict")
    def predict_model(name: str) -> Response:
        return _predict(name, raw_allowed=True)

    @app.get("/v1/models")
    def models() -> Response:
        svc = services()
        listed = [
            {
                "name": m.name,
                "labels": list(m.labels),
                "input_size": list(m.input_size),
                "precision": m.precision,
                "gpu_memory_mb": m.gpu_memory_mb,
                "idle_ttl_s": m.idle_ttl_s or svc.settings.idle_ttl_s,
                "default": m.name == svc.settings.default_model,
            }
            for m in svc.catalog.all()
        ]
        return jsonify({"models": listed, "invalid": svc.catalog.problems})

    @app.get("/v1/pool")
    def pool_status() -> Response:
        return jsonify(services().pool.snapshot().to_json())

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        checks = services().pool.readiness()
        ready = all(ok for ok, _ in checks.values())
        body = {"ready": ready, "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}}
        response = jsonify(body)
        response.status_code = 200 if ready else 503
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(services().metrics.render(), mimetype="text/plain; version=0.0.4")


def _read_upload(raw_allowed: bool) -> bytes:
    content_type = request.mimetype or ""
    if content_type == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            sent = ", ".join(sorted(request.files)) or "none"
            raise ApiError(400, "missing_field", f"send the image in the multipart field 'image' (fields sent: {sent})")
        data: bytes = upload.read()
        return data
    if raw_allowed and (content_type.startswith("image/") or content_type == "application/octet-stream"):
        return request.get_data(cache=False)
    expected = "multipart/form-data with a field 'image'" + (", or an image/* body" if raw_allowed else "")
    raise ApiError(
        415, "unsupported_media_type", f"Content-Type {content_type or 'none'} is not accepted; send {expected}"
    )


def _top_k(labels: int) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return min(5, labels)
    if not raw.isdigit() or not 1 <= int(raw) <= labels:
        raise ApiError(400, "bad_parameter", f"top_k is {raw!r}; expected an integer from 1 to {labels} for this model")
    return int(raw)


def _predict(model: str, raw_allowed: bool) -> Response:
    svc = services()
    g.model = model
    label = "-"  # the metrics label: a model name only once it is known to exist
    try:
        info = svc.catalog.get(model)
        label = info.name
        top_k = _top_k(len(info.labels))
        image = _read_upload(raw_allowed)
        if len(image) > svc.settings.max_upload_bytes:
            raise ApiError(
                413, "too_large", f"the image is {len(image)} bytes; the limit is {svc.settings.max_upload_mb:g} MB"
            )
        try:
            checked = sniff(image, svc.settings.max_pixels)
            if checked.format == "PNG":
                checked.verify()  # chunk CRCs: catches truncated and damaged PNGs without decoding
        except InputError as exc:
            raise ApiError(INPUT_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        except Exception as exc:  # noqa: BLE001 - Pillow's verify raises many kinds
            raise ApiError(400, "corrupt_image", f"the image is damaged: {exc}") from None
        # Cache-Control: no-cache asks for a fresh answer from a worker (wanwu replay sends it).
        key = svc.cache.key(image, info.name, top_k)
        cached = None if request.cache_control.no_cache else svc.cache.get(key)
        if cached is not None:
            svc.metrics.cache_hits.labels(info.name).inc()
            svc.metrics.requests.labels(info.name, "ok").inc()
            g.cached = True
            return _answer(dict(cached, cached=True, cold_start=False, start="cached"))
        result = svc.pool.predict(info.name, image, top_k)
    except ApiError as exc:
        svc.metrics.requests.labels(label, exc.code).inc()
        raise
    except WanwuError as exc:
        error = translate(exc)
        svc.metrics.requests.labels(label, error.code).inc()
        if error.status >= 500:
            log.warning("%s %s: %s", g.get("request_id"), model, exc)
        raise error from None
    g.cold_start, g.cached, g.timing = result.cold_start, False, result.timing_ms
    m = svc.metrics
    m.requests.labels(info.name, "ok").inc()
    (m.cold_starts if result.cold_start else m.warm_hits).labels(info.name).inc()
    if result.start == "stem":
        m.stem_starts.labels(info.name).inc()
    m.queue.labels(info.name).observe(result.timing_ms["queue"] / 1000)
    if result.cold_start:
        m.spawn.labels(info.name).observe(result.timing_ms["spawn"] / 1000)
    m.inference.labels(info.name).observe(result.timing_ms["worker"] / 1000)
    body = {
        "result": result.predictions[0]["label"] if result.predictions else None,
        "predictions": result.predictions,
        "model": info.name,
        "cold_start": result.cold_start,
        "start": result.start,
        "cached": False,
    }
    svc.cache.put(key, {k: v for k, v in body.items() if k not in ("cold_start", "start", "cached")})
    return _answer(body, timing=result.timing_ms)


def _answer(body: dict[str, Any], timing: dict[str, float] | None = None) -> Response:
    total = round((time.perf_counter() - g.started) * 1000, 3)
    timing = timing or {"queue": 0.0, "spawn": 0.0, "worker": 0.0}
    body["timing_ms"] = {"queue": timing["queue"], "spawn": timing["spawn"], "worker": timing["worker"], "total": total}
    body["timing_ms"].update({k: v for k, v in timing.items() if k.startswith("spawn_")})  # how the start went
    body["request_id"] = g.request_id
    model = body.get("model") or "-"
    services().metrics.total.labels(model).observe(total / 1000)
    return jsonify(body)
