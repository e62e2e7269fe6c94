"""The HTTP API (Flask application factory).

    POST /predict                       multipart field "image"; the default model
    POST /v1/models/<name>/predict      multipart "image" or a raw image/* body;
                                        ?top_k=, ?labels=a,b (or repeated label=), ?subset=
    POST /v1/models/<name>/predict:batch  many multipart "image" parts; per-image results
    POST /v1/models/<name>/embed        an embedding model's L2-normalised vector; ?encoding=base64
    POST /v1/models/<name>/embed:batch  many images, one vector each
    GET  /v1/models  /v1/pool  /healthz  /readyz  /metrics

A prediction's priority is ``interactive`` or ``batch``: the ``X-Wanwu-Priority`` header
or the ``priority`` query parameter; ``:batch`` routes default to ``batch``, the others to
``interactive``. Batch work waits behind interactive work and never takes the pool's last
free worker while interactive work waits.

One client (an address, an IPv6 /64; behind a proxy in ``trusted_proxies``, the address
it forwards) has at most ``client_max_requests`` requests in the app at once; past that,
a 429 with Retry-After (``ClientGate``). /healthz, /readyz and /metrics are not counted.

Uploads are validated here, before any worker is touched: size (413), content sniffed
from the bytes (415 for non-images, 400 for corrupt ones, 413 past the pixel cap),
top_k, the label subset (400 naming an unknown label), the model (404) and its task (400
``wrong_task``: predict on an embedding model or embed on a classifier). Every error is ``{"error": {"code", "message",
"request_id"}}``; scheduler errors map to one status each (``STATUS``).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import logging
import os
import re
import sys
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, current_app, g, jsonify, request
from wanwu_worker.errors import InputError
from wanwu_worker.preprocess import CHECK_DRAFT, sniff
from werkzeug.exceptions import HTTPException

from scheduler.backends.factory import build_pool
from scheduler.core import BATCH, INTERACTIVE, PRIORITIES
from scheduler.errors import (
    INPUT_STATUS,
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
from scheduler.models import CLASSIFY, EMBED, ModelCatalog, ModelInfo
from scheduler.pool import WarmPool
from scheduler.scoring import LabelSubset
from scheduler.settings import Settings

from .accesslog import JsonAccessLog
from .admin import Admin
from .admin import bp as admin_bp
from .cache import ResultCache
from .dashboard import bp as dashboard_bp
from .metrics import Metrics
from .openapi import bp as openapi_bp

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
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PRIORITY_HEADER = "X-Wanwu-Priority"
MULTIPART_SLACK = 64 * 1024
MAX_TOP_K = 1000  # the most predictions a worker ranks (wanwu_worker.predictor.MAX_TOP_K)
UNCOUNTED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: never refused by ClientGate
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``trusted_proxies``: addresses or CIDR networks, comma-separated (checked by Settings)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def peer_key(address: str) -> str:
    """One client for the per-client bounds: its address, an IPv6 one by its /64."""
    ip = _ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(remote: str, forwarded: str | None, trusted: tuple[Network, ...]) -> str:
    """Who sent a request: the peer, or, when the peer is a trusted proxy, the
    right-most address in X-Forwarded-For that is not a trusted proxy (the ones left of
    it are whatever the client claimed)."""
    if not forwarded or not in_networks(remote, trusted):
        return remote
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if in_networks(hop, trusted):
            continue
        return hop if _ip(hop) is not None else remote
    return remote


class ClientGate:
    """At most ``limit`` requests in the app at once per client key."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()

    def enter(self, key: str) -> bool:
        with self._lock:
            if self._held[key] >= self.limit:
                return False
            self._held[key] += 1
            return True

    def leave(self, key: str) -> None:
        with self._lock:
            self._held[key] -= 1
            if self._held[key] <= 0:
                del self._held[key]

    def held(self) -> int:
        with self._lock:
            return sum(self._held.values())


NOT_READY = "failing; the gateway's log and `wanwu doctor` say why"


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


class ApiError(Exception):
    """An HTTP error answer. ``message`` is what the client reads; ``detail`` (server-side
    failures) is what the gateway's log gets under the request id, never the client."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.detail = detail


# What a client reads for each server-side failure: no worker names, images, paths,
# versions or log lines (those go to the gateway's log under the request id).
PUBLIC_MESSAGES = {
    "no_capacity": "no worker was free in time; retry after the Retry-After delay",
    "model_unavailable": "the model's workers are failing to start; retry after the Retry-After delay",
    "backend_unavailable": "the worker backend is not available; retry after the Retry-After delay",
    "worker_start_timeout": "the model's worker did not start in time",
    "worker_timeout": "the model's worker did not answer in time",
    "worker_start_failed": "the model's worker failed to start",
    "worker_failed": "the model's worker failed to answer",
    "internal": "internal error",
}
SEE_LOG = "; the operator finds the details in the gateway's log under this request id"


def translate(exc: WanwuError) -> ApiError:
    """The one place scheduler errors become HTTP errors. A client error keeps its own
    message (it is about the client's input); a server-side one gets its code's public
    message and carries the real one as ``detail`` for the log."""
    if isinstance(exc, WorkerRejected):
        return ApiError(exc.status if 400 <= exc.status < 500 else 400, exc.code, str(exc))
    for kind, status, code in STATUS:
        if isinstance(exc, kind):
            if status < 500:
                return ApiError(status, code, str(exc))
            retry = getattr(exc, "retry_after_s", None)
            if status == 503 and retry is None:
                retry = 5.0
            return ApiError(status, code, PUBLIC_MESSAGES[code] + SEE_LOG, retry, detail=str(exc))
    raise AssertionError("unreachable: WanwuError is the last entry")


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
    metrics = Metrics(pool.snapshot)
    app.extensions["wanwu"] = Services(
        settings,
        pool,
        pool.catalog,
        metrics,
        ResultCache(settings.cache_size, settings.cache_ttl_s, settings.cache_enabled),
        JsonAccessLog(Path(settings.access_log).expanduser()) if settings.access_log else None,
        ClientGate(settings.client_max_requests),
        parse_networks(settings.trusted_proxies),
    )
    _register(app)
    keeper = Admin(settings, pool, on_change=lambda key: metrics.settings_changes.labels(key).inc())
    app.extensions["wanwu_admin"] = keeper
    app.register_blueprint(admin_bp)
    app.register_blueprint(dashboard_bp)
    app.register_blueprint(openapi_bp)
    keeper.restore()
    return app


def _logged(text: str) -> str:
    """A path or model name for the text access log, percent-encoded as on the wire: a
    client's space or ``=`` cannot add a field to its own line (``model=x cached=True``)."""
    return quote(text, safe="/:@!$&'()*+,;~-._")


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
        svc = services()
        if svc.gate is not None and request.path not in UNCOUNTED:
            forwarded = request.headers.get("X-Forwarded-For")
            key = peer_key(client_address(request.remote_addr or "", forwarded, svc.trusted))
            if not svc.gate.enter(key):
                svc.metrics.client_refused.inc()
                raise ApiError(
                    429,
                    "too_many_requests",
                    f"{key} has {svc.gate.limit} requests in flight; wait for one to finish",
                    retry_after=1,
                )
            g.client_key = key

    @app.teardown_request
    def leave(_: BaseException | None) -> None:
        key = g.pop("client_key", None)
        if key is not None:
            services().gate.leave(key)  # type: ignore[union-attr]

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
            _logged(request.path),
            response.status_code,
            _logged(g.get("model") or "-"),
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
            s = services().settings
            batch = request.path.endswith(":batch")
            limit = s.max_batch_upload_mb if batch else s.max_upload_mb
            message = f"the {'batch' if batch else 'upload'} is larger than {limit:g} MB"
        response = _error_response(status, code, message)
        for name, value in exc.get_headers():  # Allow on 405, Content-Range on 416
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("%s unhandled error in %s %s", g.get("request_id"), request.method, request.path)
        return _error_response(500, "internal", "internal error; see the gateway log")

    @app.post("/predict")
    def predict_default() -> Response:
        return _predict(services().settings.default_model, raw_allowed=False)

    @app.post("/v1/models/<name>/predict")
    def predict_model(name: str) -> Response:
        return _predict(name, raw_allowed=True)

    @app.post("/v1/models/<name>/predict:batch")
    def predict_batch(name: str) -> Response:
        with _lowered(_priority()):
            return _predict_batch(name)

    @app.post("/v1/models/<name>/embed")
    def embed_model(name: str) -> Response:
        return _predict(name, raw_allowed=True, task=EMBED)

    @app.post("/v1/models/<name>/embed:batch")
    def embed_batch(name: str) -> Response:
        with _lowered(_priority()):
            return _predict_batch(name, task=EMBED)

    @app.get("/v1/models")
    def models() -> Response:
        svc = services()
        listed = [
            {
                "name": m.name,
                "task": m.task,
                "format": m.format,
                "labels": list(m.labels),
                "subsets": {name: list(labels) for name, labels in m.subsets.items()},
                "groups": list(m.groups),
                "language": m.language,
                "languages": list(m.languages),
                "confidence_threshold": m.confidence_threshold,
                "embedding_dim": m.embedding_dim,
                "cpu_fallback": m.cpu_fallback,
                "input_size": list(m.input_size),
                "precision": m.precision,
                "gpu_memory_mb": m.gpu_memory_mb,
                "idle_ttl_s": m.idle_ttl_s or svc.settings.idle_ttl_s,
                "batching": None
                if m.batching is None
                else {"max_batch_size": m.batching.max_batch_size, "max_wait_ms": m.batching.max_wait_ms},
                "default": m.name == svc.settings.default_model,
            }
            for m in svc.catalog.all()
        ]
        s = svc.settings
        limits = {
            "max_upload_mb": s.max_upload_mb,
            "max_batch_images": s.max_batch_images,
            "max_batch_upload_mb": s.max_batch_upload_mb,
        }
        return jsonify({"models": listed, "limits": limits, "invalid": svc.catalog.problems})

    @app.get("/v1/pool")
    def pool_status() -> Response:
        return jsonify(services().pool.snapshot().to_json())

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        svc = services()
        checks = svc.pool.readiness()
        ready = all(ok for ok, _ in checks.values())
        svc.readiness.report(checks)
        # The details (engine version, image, paths) are the operator's: the log and `wanwu doctor`.
        body = {
            "ready": ready,
            "checks": {name: {"ok": ok, "detail": "ok" if ok else NOT_READY} for name, (ok, _) in checks.items()},
        }
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


def _priority() -> str:
    """The query's priority, else the header's, else ``batch`` on a ``:batch`` route
    and ``interactive`` elsewhere; a bad value in either is a 400 (even where the other
    one is fine)."""
    given = [raw for raw in (request.args.get("priority"), request.headers.get(PRIORITY_HEADER)) if raw is not None]
    for raw in given:
        if raw not in PRIORITIES:
            expected = " or ".join(PRIORITIES)
            where = f"query or {PRIORITY_HEADER}"
            raise ApiError(400, "bad_parameter", f"priority is {raw!r}; expected {expected} ({where})")
    if given:
        return given[0]
    return BATCH if request.path.endswith(":batch") else INTERACTIVE


@functools.cache
def _can_renice() -> bool:
    """Whether a thread may lower its CPU priority and raise it back (root, CAP_SYS_NICE)."""
    result = [False]

    def probe() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, before + 1))
            os.setpriority(os.PRIO_PROCESS, tid, before)
            result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe)  # a throwaway thread keeps whatever it is left with
    thread.start()
    thread.join()
    return result[0]


@contextlib.contextmanager
def _lowered(priority: str) -> Iterator[None]:
    """Run batch-priority work in this thread at a lower CPU priority (nice +10), so the
    gateway's time goes to interactive requests first; only where it can be undone."""
    if priority != BATCH or not _can_renice():
        yield
        return
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(19, before + 10))
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, before)


def _failed(exc: ApiError | WanwuError, label: str, model: str) -> ApiError:
    """A predict request's failure as the HTTP error to raise, counted under ``label``
    (the model, once known to exist); a server-side one is logged."""
    error = exc if isinstance(exc, ApiError) else translate(exc)
    services().metrics.requests.labels(label, error.code).inc()
    if error.detail is not None:
        log.warning("%s %s: %s", g.get("request_id"), model, error.detail)
    return error


def _check_upload(image: bytes, settings: Settings) -> None:
    """One image as uploaded: within the size limit (413), then ``_check_image``."""
    if len(image) > settings.max_upload_bytes:
        raise ApiError(413, "too_large", f"the image is {len(image)} bytes; the limit is {settings.max_upload_mb:g} MB")
    _check_image(image, settings.max_pixels)


def _check_image(image: bytes, max_pixels: int) -> None:
    """Sniff an upload before any worker sees it; ApiError (400/413/415) if it is no image we take.
    A large JPEG is measured at the reduced scale a worker decodes it at (see CHECK_DRAFT)."""
    try:
        checked = sniff(image, max_pixels, CHECK_DRAFT)
        if checked.format == "PNG":
            checked.verify()  # chunk CRCs: catches truncated and damaged PNGs without decoding
    except InputError as exc:
        raise ApiError(INPUT_STATUS.get(exc.code, 400), exc.code, exc.message) from None
    except Exception as exc:  # noqa: BLE001 - Pillow's verify raises many kinds
        raise ApiError(400, "corrupt_image", f"the image is damaged: {exc}") from None


def _top_k(labels: int) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return min(5, labels)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= labels:
        raise ApiError(400, "bad_parameter", f"top_k is {raw!r}; expected an integer from 1 to {labels} for this model")
    return int(raw)


@dataclass(frozen=True)
class _Asked:
    """What a request asks of its model: top_k over all labels or over a subset, or
    (an embedding model) its vector in an encoding."""

    top_k: int = 1
    subset: LabelSubset | None = None
    encoding: str = "json"
    lang: str | None = None  # a translation's code; None: the labels as the bundle has them

    def cache_key(self) -> tuple[Any, ...]:
        return (self.top_k, self.subset, self.lang)  # the encoding is applied to the cached vector

    def describe(self, body: dict[str, Any]) -> None:
        """Say in an answer which labels it was scored over."""
        if self.subset is not None:
            body["labels"] = list(self.subset.labels)
            if self.subset.name is not None:
                body["subset"] = self.subset.name

    def dress(self, body: dict[str, Any], info: ModelInfo) -> None:
        """Finish a classification answer (or a batch entry) as asked: ``confident``
        where the model sets a threshold (over all labels, not a subset), and the labels
        and groups in ``lang``."""
        predictions = body.get("predictions")
        # Over a subset the scores are renormalised among its labels: a photo of a car
        # asked "which dog breed?" has a top score near 1. Confidence is for whole answers.
        whole = self.subset is None
        if info.confidence_threshold is not None and whole and isinstance(predictions, list) and predictions:
            body["confident"] = float(predictions[0]["score"]) >= info.confidence_threshold
        if self.lang is None:
            return
        labels, groups = info.translator(self.lang)
        if isinstance(predictions, list):
            body["predictions"] = [dict(e, label=labels.get(e["label"], e["label"])) for e in predictions]
        if isinstance(body.get("groups"), list):
            body["groups"] = [dict(e, label=groups.get(e["label"], e["label"])) for e in body["groups"]]
        if body.get("result") is not None:
            body["result"] = labels.get(body["result"], body["result"])
        if "labels" in body:
            body["labels"] = [labels.get(label, label) for label in body["labels"]]
        body["lang"] = self.lang


ENCODINGS = ("json", "base64")


def _asked(info: ModelInfo, task: str) -> _Asked:
    """The request's parameters for ``info``, checked against its task and labels."""
    if info.task != task:
        route = "embed" if info.task == EMBED else "predict"
        raise ApiError(
            400,
            "wrong_task",
            f"model {info.name!r} is {'an embedding' if info.task == EMBED else 'a classification'} model: "
            f"POST /v1/models/{info.name}/{route}",
        )
    if task == EMBED:
        extra = [name for name in ("top_k", "labels", "label", "subset", "lang") if name in request.args]
        if extra:
            raise ApiError(400, "bad_parameter", f"an embedding model takes no {', '.join(extra)}")
        encoding = request.args.get("encoding", "json")
        if encoding not in ENCODINGS:
            raise ApiError(400, "bad_parameter", f"encoding is {encoding!r}; expected json or base64")
        return _Asked(encoding=encoding)
    subset = _subset(info)
    # Over all labels the worker ranks them (at most MAX_TOP_K); a subset is ranked here.
    most = len(subset.labels) if subset is not None else min(len(info.labels), MAX_TOP_K)
    return _Asked(_top_k(most), subset, lang=_lang(info))


def _lang(info: ModelInfo) -> str | None:
    """``lang``: the language to answer in, one of the model's; None for its own labels."""
    raw = request.args.get("lang")
    if raw is None or raw == "" or raw == info.language:
        return None
    if raw not in info.translations:
        known = ", ".join(info.languages) or "only its own labels"
        raise ApiError(400, "bad_parameter", f"lang is {raw!r}; model {info.name!r} answers in {known}")
    return raw


def _subset(info: ModelInfo) -> LabelSubset | None:
    """The labels to score over: ``labels=a,b`` and ``label=`` (each may repeat), or a
    named ``subset`` the bundle declares; None for all of them."""
    named = request.args.getlist("subset")
    given = [part for raw in request.args.getlist("labels") for part in raw.split(",")]
    given += request.args.getlist("label")
    if named and given:
        raise ApiError(400, "bad_parameter", "give labels or a subset, not both")
    if len(named) > 1:
        raise ApiError(400, "bad_parameter", f"one subset at a time; {len(named)} were given")
    if named:
        subset = info.subsets.get(named[0])
        if subset is None:
            known = ", ".join(sorted(info.subsets)) or "none"
            raise ApiError(400, "unknown_subset", f"model {info.name!r} has no subset {named[0]!r} (subsets: {known})")
        return LabelSubset(subset, named[0])
    if not given:
        return None
    wanted = tuple(dict.fromkeys(label.strip() for label in given if label.strip()))
    if not wanted:
        raise ApiError(400, "bad_parameter", "labels is empty; name at least one label")
    known_labels = set(info.labels)
    unknown = [label for label in wanted if label not in known_labels]
    if unknown:
        shown = ", ".join(repr(label) for label in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ApiError(400, "unknown_label", f"model {info.name!r} has no label {shown}")
    return LabelSubset(wanted)


def _predict(model: str, raw_allowed: bool, task: str = CLASSIFY) -> Response:
    svc = services()
    g.model = model
    label = "-"  # the metrics label: a model name only once it is known to exist
    try:
        info = svc.catalog.get(model)
        label = info.name
        asked = _asked(info, task)
        priority = _priority()
        image = _read_upload(raw_allowed)
        _check_upload(image, svc.settings)
        # Cache-Control: no-cache asks for a fresh answer from a worker (wanwu replay sends it).
        key = svc.cache.key(image, info.name, info.digest, *asked.cache_key())
        cached = None if request.cache_control.no_cache else svc.cache.get(key)
        if cached is not None:
            svc.metrics.cache_hits.labels(info.name).inc()
            svc.metrics.requests.labels(info.name, "ok").inc()
            g.cached = True
            return _answer(_encoded(dict(cached, cached=True, cold_start=False, start="cached"), asked))
        result = svc.pool.predict(info.name, image, asked.top_k, priority=priority, subset=asked.subset)
    except (ApiError, WanwuError) as exc:
        raise _failed(exc, label, model) from None
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
    body: dict[str, Any]
    if task == EMBED:
        body = {"model": info.name, "embedding": result.embedding, "dim": result.dim}
    else:
        body = {
            "result": result.predictions[0]["label"] if result.predictions else None,
            "predictions": result.predictions,
            "model": info.name,
        }
        if result.groups is not None:
            body["groups"] = result.groups
    asked.describe(body)
    asked.dress(body, info)
    svc.cache.put(key, dict(body))
    body.update(cold_start=result.cold_start, start=result.start, cached=False)
    if result.cpu_fallback:
        body["cpu_fallback"] = True  # no GPU had room: a CPU worker answered
    return _answer(_encoded(body, asked), timing=result.timing_ms)


def _encoded(body: dict[str, Any], asked: _Asked) -> dict[str, Any]:
    """An embedding answer in the encoding asked for: a JSON list, or base64 of the
    float32 values, little-endian (``numpy.frombuffer(base64.b64decode(s), "<f4")``)."""
    if "embedding" not in body:
        return body
    body["encoding"] = asked.encoding
    if asked.encoding == "base64":
        body["embedding"] = _base64_floats(body["embedding"])
    return body


def _base64_floats(values: list[float]) -> str:
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _answer(body: dict[str, Any], timing: dict[str, float] | None = None) -> Response:
    total = round((time.perf_counter() - g.started) * 1000, 3)
    timing = timing or {"queue": 0.0, "spawn": 0.0, "worker": 0.0}
    body["timing_ms"] = {"queue": timing["queue"], "spawn": timing["spawn"], "worker": timing["worker"], "total": total}
    body["timing_ms"].update({k: v for k, v in timing.items() if k.startswith("spawn_")})  # how the start went
    body["request_id"] = g.request_id
    model = body.get("model") or "-"
    services().metrics.total.labels(model).observe(total / 1000)
    return jsonify(body)


def _predict_batch(model: str, task: str = CLASSIFY) -> Response:
    """Many images in one request: each is checked on its own, the good ones go to the
    pool in calls (``policy.batch_calls``), and the answer has one entry per image,
    in order. A bad image gets its own error; if no image could be answered because the
    pool could not serve any, the request fails as a single one would (503 + Retry-After)."""
    svc = services()
    s = svc.settings
    g.model = model
    label = "-"
    try:
        info = svc.catalog.get(model)
        label = info.name
        asked = _asked(info, task)
        priority = _priority()
        # A batch may be larger than one upload; the per-image limit still holds below.
        request.max_content_length = s.max_batch_upload_bytes + MULTIPART_SLACK
        if request.mimetype != "multipart/form-data":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {request.mimetype or 'none'} is not accepted; send multipart/form-data "
                "with one 'image' part per image",
            )
        uploads = request.files.getlist("image")
        if not uploads:
            sent = ", ".join(sorted(request.files)) or "none"
            raise ApiError(400, "missing_field", f"send the images in multipart fields 'image' (fields sent: {sent})")
        if len(uploads) > s.max_batch_images:
            raise ApiError(
                413, "too_many_images", f"{len(uploads)} images in one request; the limit is {s.max_batch_images}"
            )
        entries: list[dict[str, Any]] = []
        good: list[bytes] = []
        for index, upload in enumerate(uploads):
            entry: dict[str, Any] = {"index": index, "file": upload.filename or ""}
            data = upload.read()
            try:
                _check_upload(data, s)
            except ApiError as exc:
                entry.update(error={"code": exc.code, "message": exc.message}, retryable=False)
            else:
                good.append(data)
            entries.append(entry)
        answer = (
            svc.pool.predict_batch(info.name, good, asked.top_k, priority=priority, subset=asked.subset)
            if good
            else None
        )
    except (ApiError, WanwuError) as exc:
        raise _failed(exc, label, model) from None
    failures: list[ApiError] = []
    outcomes = iter(answer.results if answer is not None else ())
    for entry in entries:
        if "error" not in entry:
            _fill(entry, next(outcomes), failures, asked, info)
        svc.metrics.batch_images.labels(info.name, entry["error"]["code"] if "error" in entry else "ok").inc()
    answered = sum(1 for e in entries if "error" not in e)
    if failures and answered == 0 and len(failures) == len(good):
        # Nothing could be served: the whole request fails like a single one, so a
        # client backs off on Retry-After instead of reading per-image errors.
        worst = failures[0]
        svc.metrics.requests.labels(info.name, worst.code).inc()
        log.warning("%s %s: batch of %d failed: %s", g.get("request_id"), model, len(entries), worst.detail)
        raise worst
    for detail in dict.fromkeys(f.detail for f in failures if f.detail is not None):
        log.warning("%s %s: part of a batch failed: %s", g.get("request_id"), model, detail)
    svc.metrics.requests.labels(info.name, "ok").inc()
    g.cold_start = answer.cold_start if answer is not None else False
    g.cached = False
    g.timing = dict(answer.timing_ms) if answer is not None else None
    body = {
        "model": info.name,
        "results": entries,
        "count": len(entries),
        "failed": len(entries) - answered,
        "cold_start": g.cold_start,
        "calls": answer.calls if answer is not None else 0,
    }
    asked.describe(body)
    asked.dress(body, info)
    if task == EMBED:
        body["encoding"] = asked.encoding
    if answer is not None and answer.cpu_fallback:
        body["cpu_fallback"] = True
    return _answer(body, timing=g.timing)


def _fill(
    entry: dict[str, Any],
    outcome: dict[str, Any] | WanwuError,
    failures: list[ApiError],
    asked: _Asked,
    info: ModelInfo,
) -> None:
    """One image's entry from what the pool gave it: predictions, its own error, or the
    error of the call that carried it (``retryable``: send the image again later)."""
    if isinstance(outcome, WanwuError):
        error = translate(outcome)
        failures.append(error)
        entry.update(error={"code": error.code, "message": error.message}, retryable=error.status >= 500)
        return
    if "error" in outcome:
        raw = outcome["error"] if isinstance(outcome["error"], dict) else {}
        entry.update(
            error={"code": str(raw.get("code", "bad_input")), "message": str(raw.get("message", ""))}, retryable=False
        )
        return
    if "embedding" in outcome:
        encoded = outcome["embedding"] if asked.encoding == "json" else _base64_floats(outcome["embedding"])
        entry.update(embedding=encoded, dim=outcome.get("dim"))
        return
    predictions = outcome.get("predictions") or []
    entry.update(result=predictions[0]["label"] if predictions else None, predictions=predictions)
    if isinstance(outcome.get("groups"), list):
        entry["groups"] = outcome["groups"]
    asked.dress(entry, info)
