"""Many images in one request: ``POST /v1/models/<name>/predict:batch`` and
``.../embed:batch``, multipart with one ``image`` part per image.

Each image is checked on its own, the good ones go to the pool in calls
(``policy.batch_calls``), and the answer has one entry per image, in order: its
predictions (or vector), or its own error object (the one every error body carries),
with ``retryable`` where the pool failed the call that carried it. If no image could be
answered because the pool could serve none, the request fails as a single one would
(503 with Retry-After, 502, 504). These routes default to ``batch`` priority, and run
their gateway work at a lower CPU priority where that can be undone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.datastructures import FileStorage

from scheduler.calls import BatchAnswer
from scheduler.core import BATCH
from scheduler.errors import INPUT_STATUS, WanwuError
from scheduler.models import CLASSIFY, EMBED, ModelInfo
from scheduler.settings import Settings

from .errors import ApiError, error_object, translate
from .inputs import MULTIPART_SLACK, Asked, asked, check_upload, priority
from .predict import encoded, predictions_of, resolve, timing_ms
from .services import record, request_id, services
from .shapes import AnsweredEntry, BatchBody, BatchEntry, EmbeddedEntry, FailedEntry

log = logging.getLogger("gateway.app")  # the request path's lines keep the name they had

bp = Blueprint("batch", __name__)


@bp.post("/v1/models/<name>/predict:batch")
def predict_batch(name: str) -> Response:
    with _lowered(priority()):
        return _batch(name, CLASSIFY)


@bp.post("/v1/models/<name>/embed:batch")
def embed_batch(name: str) -> Response:
    with _lowered(priority()):
        return _batch(name, EMBED)


@dataclass(frozen=True)
class _Part:
    """One image part as sent: its bytes, or why it is not sent on."""

    index: int
    file: str
    data: bytes = b""
    error: ApiError | None = None


def _batch(model: str, task: str) -> Response:
    svc = services()
    info = resolve(model)
    want = asked(info, task)
    wanted = priority()
    # A batch may be larger than one upload; the per-image limit still holds (_checked).
    request.max_content_length = svc.settings.max_batch_upload_bytes + MULTIPART_SLACK
    parts = [_checked(index, upload, svc.settings) for index, upload in enumerate(_uploads(svc.settings))]
    good = [part.data for part in parts if part.error is None]
    answer = svc.pool.predict_batch(info, good, want.top_k, priority=wanted, subset=want.subset) if good else None
    done = _entries(parts, answer, want, info)
    failures = done.failures
    rec = record()
    rec.batch, rec.cached, rec.images = True, False, done.outcomes
    if failures and "ok" not in done.outcomes and len(failures) == len(good):
        # Nothing could be served: the whole request fails like a single one, so a
        # client backs off on Retry-After instead of reading per-image errors.
        raise failures[0]
    for detail in dict.fromkeys(f.detail for f in failures if f.detail is not None):
        log.warning("%s %s: part of a batch failed: %s", request_id(), model, detail)
    rec.cold_start = answer is not None and answer.cold_start
    rec.timing = dict(answer.timing_ms) if answer is not None else None
    return jsonify(_body(info, want, done, answer))


def _uploads(settings: Settings) -> list[FileStorage]:
    """The request's ``image`` parts: multipart (415), at least one (400), at most
    ``max_batch_images`` (413)."""
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
    if len(uploads) > settings.max_batch_images:
        limit = settings.max_batch_images
        raise ApiError(413, "too_many_images", f"{len(uploads)} images in one request; the limit is {limit}")
    return uploads


def _checked(index: int, upload: FileStorage, settings: Settings) -> _Part:
    data = upload.read()
    try:
        check_upload(data, settings)
    except ApiError as exc:
        return _Part(index, upload.filename or "", error=exc)
    return _Part(index, upload.filename or "", data)


@dataclass
class _Entries:
    """A batch's entries, in order, each image's outcome ("ok" or its error's code), and
    the errors of the pool's calls that failed."""

    entries: list[BatchEntry]
    outcomes: list[str]
    failures: list[ApiError]

    def add(self, entry: BatchEntry, error: ApiError | None = None) -> None:
        self.entries.append(entry)
        self.outcomes.append("ok" if error is None else error.code)


def _entries(parts: list[_Part], answer: BatchAnswer | None, want: Asked, info: ModelInfo) -> _Entries:
    """Each image's entry from its check and what the pool gave it: predictions (or a
    vector), its own error, or the error of the call that carried it."""
    results = iter(answer.results if answer is not None else ())
    done = _Entries([], [], [])
    for part in parts:
        if part.error is not None:
            done.add(_failed(part, part.error, retryable=False), part.error)
            continue
        outcome = next(results)
        if isinstance(outcome, WanwuError):
            error = translate(outcome)  # the call that carried it failed: send it again later
            done.failures.append(error)
            done.add(_failed(part, error, retryable=error.status >= 500), error)
        elif "error" in outcome:  # the worker refused this image
            raw = outcome["error"] if isinstance(outcome["error"], dict) else {}
            code = str(raw.get("code", "bad_input"))
            refused = ApiError(INPUT_STATUS.get(code, 400), code, str(raw.get("message", "")))
            done.add(_failed(part, refused, retryable=False), refused)
        elif "embedding" in outcome:
            vector = outcome["embedding"]
            embedded: EmbeddedEntry = {
                "index": part.index,
                "file": part.file,
                "embedding": encoded(vector, want.encoding),
                "dim": int(outcome.get("dim") or len(vector)),
            }
            done.add(embedded)
        else:
            done.add(_answered(part, outcome, want, info))
    return done


def _answered(part: _Part, outcome: dict[str, Any], want: Asked, info: ModelInfo) -> AnsweredEntry:
    predictions = predictions_of(outcome.get("predictions") or [])
    entry: AnsweredEntry = {
        "index": part.index,
        "file": part.file,
        "result": predictions[0]["label"] if predictions else None,
        "predictions": predictions,
    }
    if isinstance(outcome.get("groups"), list):
        entry["groups"] = predictions_of(outcome["groups"])
    want.dress(entry, info)
    return entry


def _failed(part: _Part, error: ApiError, retryable: bool) -> FailedEntry:
    return {
        "index": part.index,
        "file": part.file,
        "error": error_object(error.code, error.message, request_id()),
        "retryable": retryable,
    }


def _body(info: ModelInfo, want: Asked, done: _Entries, answer: BatchAnswer | None) -> BatchBody:
    body: BatchBody = {
        "model": info.name,
        "results": done.entries,
        "count": len(done.entries),
        "failed": len(done.entries) - done.outcomes.count("ok"),
        "cold_start": answer.cold_start if answer is not None else False,
        "calls": answer.calls if answer is not None else 0,
        "timing_ms": timing_ms(answer.timing_ms if answer is not None else None),
        "request_id": request_id(),
    }
    want.describe(body, info)
    if info.task == EMBED:
        body["encoding"] = want.encoding
    if answer is not None and answer.cpu_fallback:
        body["cpu_fallback"] = True
    return body


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
def _lowered(wanted: str) -> Iterator[None]:
    """Run batch-priority work in this thread at a lower CPU priority (nice +10), so the
    gateway's time goes to interactive requests first; only where it can be undone."""
    if wanted != BATCH or not _can_renice():
        yield
        return
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(19, before + 10))
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, before)
