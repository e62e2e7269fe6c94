"""Single predictions: ``POST /predict`` (the default model, multipart field ``image``),
``POST /v1/models/<name>/predict`` (multipart ``image`` or a raw ``image/*`` body;
``?top_k=``, ``?labels=a,b`` or repeated ``label=``, ``?subset=``, ``?lang=``) and
``POST /v1/models/<name>/embed`` (an embedding model's L2-normalised vector;
``?encoding=base64``).

The model is resolved here, once, to its catalog entry (``resolve``), and that entry
is what the request is checked against, what the pool serves and what the answer is
shaped from. Identical uploads are answered from the result cache (``Cache-Control:
no-cache`` skips it). Errors are raised as they are met, ``ApiError`` or the pool's
``WanwuError``, and answered by the app's handlers (``gateway.app``).
"""

from __future__ import annotations

import base64
import sys
import time
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from flask import Blueprint, Response, jsonify, request

from scheduler.calls import PoolAnswer
from scheduler.models import CLASSIFY, EMBED, ModelInfo

from .inputs import Asked, asked, check_upload, priority, read_upload
from .services import record, request_id, services
from .shapes import EmbedBody, PredictBody, Prediction, Timing

bp = Blueprint("predict", __name__)


@bp.post("/predict")
def predict_default() -> Response:
    return _single(services().settings.default_model, raw_allowed=False, task=CLASSIFY)


@bp.post("/v1/models/<name>/predict")
def predict_model(name: str) -> Response:
    return _single(name, raw_allowed=True, task=CLASSIFY)


@bp.post("/v1/models/<name>/embed")
def embed_model(name: str) -> Response:
    return _single(name, raw_allowed=True, task=EMBED)


def resolve(model: str) -> ModelInfo:
    """The catalog's entry for ``model`` (UnknownModel, a 404, if none), recorded as the
    request's model: a prediction is counted under its model once that is known to exist."""
    rec = record()
    rec.model, rec.label = model, "-"
    info = services().catalog.get(model)
    rec.label = info.name
    return info


@dataclass(frozen=True)
class Served:
    """How an answer was had: a worker's (how it started, how long it took) or the cache's."""

    cold_start: bool = False
    start: str = "cached"
    cached: bool = True
    timing: Mapping[str, float] | None = None  # the pool's, in ms; None: no worker was asked
    cpu_fallback: bool = False  # no GPU had room: a CPU worker answered

    @classmethod
    def by(cls, answer: PoolAnswer) -> Served:
        return cls(answer.cold_start, answer.start, False, answer.timing_ms, answer.cpu_fallback)


def _single(model: str, raw_allowed: bool, task: str) -> Response:
    svc = services()
    info = resolve(model)
    want = asked(info, task)
    wanted = priority()
    image = read_upload(raw_allowed)
    check_upload(image, svc.settings)
    key = svc.cache.key(image, info.name, info.digest, *want.cache_key())
    # Cache-Control: no-cache asks for a fresh answer from a worker (wanwu replay sends it).
    outcome = None if request.cache_control.no_cache else svc.cache.get(key)
    served = Served()
    if outcome is None:
        answer = svc.pool.predict(info, image, want.top_k, priority=wanted, subset=want.subset)
        served = Served.by(answer)
        outcome = {"predictions": answer.predictions, "groups": answer.groups}
        if task == EMBED:
            outcome = {"embedding": answer.embedding, "dim": answer.dim}
        svc.cache.put(key, outcome)
    rec = record()
    rec.cached = served.cached
    if served.timing is not None:
        rec.cold_start, rec.start, rec.timing = served.cold_start, served.start, dict(served.timing)
    if task == EMBED:
        return jsonify(_embedding(info, want, outcome, served))
    return jsonify(_classification(info, want, outcome, served))


def _classification(info: ModelInfo, want: Asked, outcome: Mapping[str, Any], served: Served) -> PredictBody:
    """A classification answer from the pool's (or the cache's) predictions and groups."""
    predictions = predictions_of(outcome["predictions"])
    body: PredictBody = {
        "result": predictions[0]["label"] if predictions else None,
        "predictions": predictions,
        "model": info.name,
        "cold_start": served.cold_start,
        "start": served.start,
        "cached": served.cached,
        "timing_ms": timing_ms(served.timing),
        "request_id": request_id(),
    }
    if outcome.get("groups") is not None:
        body["groups"] = predictions_of(outcome["groups"])
    want.describe(body, info)
    want.dress(body, info)
    if served.cpu_fallback:
        body["cpu_fallback"] = True
    return body


def _embedding(info: ModelInfo, want: Asked, outcome: Mapping[str, Any], served: Served) -> EmbedBody:
    """An embedding answer in the encoding asked for."""
    vector: list[float] = outcome["embedding"] or []
    body: EmbedBody = {
        "model": info.name,
        "embedding": encoded(vector, want.encoding),
        "dim": int(outcome.get("dim") or len(vector)),
        "encoding": want.encoding,
        "cold_start": served.cold_start,
        "start": served.start,
        "cached": served.cached,
        "timing_ms": timing_ms(served.timing),
        "request_id": request_id(),
    }
    if served.cpu_fallback:
        body["cpu_fallback"] = True
    return body


def predictions_of(items: list[dict[str, Any]]) -> list[Prediction]:
    """The pool's predictions as the answer's: each is a label and a score already
    (``scheduler.answers`` checks a worker's, ``scheduler.scoring`` makes a subset's)."""
    return cast(list[Prediction], items)


def encoded(vector: list[float], encoding: str) -> list[float] | str:
    """An embedding as a JSON list, or (``base64``) the base64 of its float32 values,
    little-endian (``numpy.frombuffer(base64.b64decode(s), "<f4")``)."""
    if encoding != "base64":
        return vector
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def timing_ms(timing: Mapping[str, float] | None) -> Timing:
    """The answer's ``timing_ms``: the pool's queue, spawn and worker times (0 without a
    worker), how a cold start went, and the total as the gateway saw it until now."""
    rec = record()
    rec.total_ms = total = round((time.perf_counter() - rec.started) * 1000, 3)
    timing = timing or {}
    shown: Timing = {
        "queue": timing.get("queue", 0.0),
        "spawn": timing.get("spawn", 0.0),
        "worker": timing.get("worker", 0.0),
        "total": total,
    }
    shown.update(cast(Timing, {key: value for key, value in timing.items() if key.startswith("spawn_")}))
    return shown
