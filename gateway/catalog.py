"""``GET /v1/models``: the served models (task, format, labels, named subsets, groups,
languages, confidence threshold, input size, precision, GPU estimate, CPU fallback,
embedding size, idle TTL, batching), the gateway's upload limits, and the bundles that
are not served with what is wrong with each."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from scheduler.models import ModelInfo
from scheduler.settings import Settings

from .services import services
from .shapes import Batching, Limits, ModelEntry, ModelList

bp = Blueprint("catalog", __name__)


@bp.get("/v1/models")
def models() -> Response:
    svc = services()
    s = svc.settings
    limits: Limits = {
        "max_upload_mb": s.max_upload_mb,
        "max_batch_images": s.max_batch_images,
        "max_batch_upload_mb": s.max_batch_upload_mb,
    }
    listed: ModelList = {
        "models": [entry(m, s) for m in svc.catalog.all()],
        "limits": limits,
        "invalid": dict(svc.catalog.problems),
    }
    return jsonify(listed)


def entry(m: ModelInfo, settings: Settings) -> ModelEntry:
    """One served model as the list shows it."""
    batching: Batching | None = None
    if m.batching is not None:
        batching = {"max_batch_size": m.batching.max_batch_size, "max_wait_ms": m.batching.max_wait_ms}
    return {
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
        "idle_ttl_s": m.idle_ttl_s or settings.idle_ttl_s,
        "batching": batching,
        "default": m.name == settings.default_model,
    }
