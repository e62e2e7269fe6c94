"""The pool and the process: ``GET /v1/pool`` (workers, queue, counters, reaps, GPUs,
back-offs, the live settings and keep-alive), ``GET /healthz`` (the process is up),
``GET /readyz`` (200 when every readiness check passes, else 503 naming the failing
ones; why is in the log and ``wanwu doctor``, never in the answer) and ``GET /metrics``
(Prometheus text). The client gate does not count these (``UNCOUNTED``)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from scheduler.snapshot import PoolSnapshot

from .services import services
from .shapes import Check, GpuEntry, Health, KeepAliveView, PoolBody, Readiness, WorkerEntry

bp = Blueprint("health", __name__)

UNCOUNTED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: never refused by ClientGate
NOT_READY = "failing; the gateway's log and `wanwu doctor` say why"


@bp.get("/v1/pool")
def pool_status() -> Response:
    return jsonify(pool_body(services().pool.snapshot()))


@bp.get("/healthz")
def healthz() -> Response:
    body: Health = {"status": "ok"}
    return jsonify(body)


@bp.get("/readyz")
def readyz() -> Response:
    svc = services()
    checks = svc.pool.readiness()
    svc.readiness.report(checks)
    # The details (engine version, image, paths) are the operator's: the log and `wanwu doctor`.
    shown: dict[str, Check] = {
        name: {"ok": ok, "detail": "ok" if ok else NOT_READY} for name, (ok, _) in checks.items()
    }
    body: Readiness = {"ready": all(check["ok"] for check in shown.values()), "checks": shown}
    response = jsonify(body)
    response.status_code = 200 if body["ready"] else 503
    return response


@bp.get("/metrics")
def metrics() -> Response:
    return Response(services().metrics.render(), mimetype="text/plain; version=0.0.4")


def pool_body(snap: PoolSnapshot) -> PoolBody:
    """``GET /v1/pool``'s answer from the pool's snapshot."""
    workers: list[WorkerEntry] = [
        {
            "id": w.id,
            "model": w.model,
            "state": w.state,
            "idle_s": w.idle_s,
            "age_s": w.age_s,
            "gpu_mb": w.gpu_mb,
            "device": w.device,
            "requests": w.requests,
        }
        for w in snap.workers
    ]
    gpus: list[GpuEntry] = [
        {"device": g.device, "used_mb": round(g.used_mb, 1), "total_mb": round(g.total_mb, 1)} for g in snap.gpus
    ]
    keepalive: KeepAliveView = {
        "policy": str(snap.keepalive.get("policy", "")),
        "models": dict(snap.keepalive.get("models") or {}),
    }
    return {
        "capacity": snap.capacity,
        "queue_depth": snap.queue_depth,
        "waiting": snap.waiting,
        "workers": workers,
        "counters": snap.counters,
        "reaps": snap.reaps,
        "gpus": gpus,
        "backoff_s": snap.backoff,
        "settings": snap.settings,
        "keepalive": keepalive,
    }
