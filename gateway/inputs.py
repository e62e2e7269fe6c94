"""What a prediction request sends and asks, checked before any worker is touched.

The upload: its size (413), its content sniffed from the bytes (415 for non-images,
400 for corrupt ones, 413 past the pixel cap). What it asks: ``top_k``, a label subset
(400 naming an unknown label or subset), ``lang``, an embedding's ``encoding``, and the
route's task against the model's (400 ``wrong_task``). Its priority: ``interactive``
or ``batch``, the ``X-Wanwu-Priority`` header or the ``priority`` query parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import request
from wanwu_worker.errors import InputError
from wanwu_worker.preprocess import CHECK_DRAFT, sniff

from scheduler.core import BATCH, INTERACTIVE, PRIORITIES
from scheduler.errors import INPUT_STATUS
from scheduler.models import EMBED, ModelInfo
from scheduler.scoring import LabelSubset
from scheduler.settings import Settings

from .errors import ApiError
from .shapes import Described, Prediction, Scored

PRIORITY_HEADER = "X-Wanwu-Priority"
MULTIPART_SLACK = 64 * 1024
MAX_TOP_K = 1000  # the most predictions a worker ranks (wanwu_worker.predictor.MAX_TOP_K)
ENCODINGS = ("json", "base64")
LABEL_PARAMETERS = ("top_k", "labels", "label", "subset", "lang")  # what an embedding model does not take


@dataclass(frozen=True)
class Asked:
    """What a request asks of its model: top_k over all labels or over a subset, or
    (an embedding model) its vector in an encoding."""

    top_k: int = 1
    subset: LabelSubset | None = None
    encoding: str = "json"
    lang: str | None = None  # a translation's code; None: the labels as the bundle has them

    def cache_key(self) -> tuple[Any, ...]:
        return (self.top_k, self.subset, self.lang)  # the encoding is applied to the cached vector

    def describe(self, body: Described, info: ModelInfo) -> None:
        """Say in an answer which labels it was scored over, and in which language."""
        if self.subset is not None:
            labels = info.translator(self.lang)[0] if self.lang is not None else {}
            body["labels"] = [labels.get(label, label) for label in self.subset.labels]
            if self.subset.name is not None:
                body["subset"] = self.subset.name
        if self.lang is not None:
            body["lang"] = self.lang

    def dress(self, body: Scored, info: ModelInfo) -> None:
        """Finish a classification (an answer or a batch entry) as asked: ``confident``
        where the model sets a threshold (over all labels, not a subset), and the labels
        and groups in ``lang``."""
        predictions = body["predictions"]
        # Over a subset the scores are renormalised among its labels: a photo of a car
        # asked "which dog breed?" has a top score near 1. Confidence is for whole answers.
        if info.confidence_threshold is not None and self.subset is None and predictions:
            body["confident"] = float(predictions[0]["score"]) >= info.confidence_threshold
        if self.lang is None:
            return
        labels, groups = info.translator(self.lang)
        body["predictions"] = _renamed(predictions, labels)
        if "groups" in body:
            body["groups"] = _renamed(body["groups"], groups)
        if body["result"] is not None:
            body["result"] = labels.get(body["result"], body["result"])
        body["lang"] = self.lang


def _renamed(predictions: list[Prediction], names: Mapping[str, str]) -> list[Prediction]:
    return [{"label": names.get(e["label"], e["label"]), "score": e["score"]} for e in predictions]


def asked(info: ModelInfo, task: str) -> Asked:
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
        extra = [name for name in LABEL_PARAMETERS if name in request.args]
        if extra:
            raise ApiError(400, "bad_parameter", f"an embedding model takes no {', '.join(extra)}")
        encoding = request.args.get("encoding", "json")
        if encoding not in ENCODINGS:
            raise ApiError(400, "bad_parameter", f"encoding is {encoding!r}; expected json or base64")
        return Asked(encoding=encoding)
    subset = _subset(info)
    # Over all labels the worker ranks them (at most MAX_TOP_K); a subset is ranked here.
    most = len(subset.labels) if subset is not None else min(len(info.labels), MAX_TOP_K)
    return Asked(_top_k(most), subset, lang=_lang(info))


def _top_k(labels: int) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return min(5, labels)
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= labels:
        raise ApiError(400, "bad_parameter", f"top_k is {raw!r}; expected an integer from 1 to {labels} for this model")
    return int(raw)


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


def priority() -> str:
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


def read_upload(raw_allowed: bool) -> bytes:
    """The image of a single request: the multipart field ``image``, or (where the route
    takes one) a raw ``image/*`` or ``application/octet-stream`` body."""
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


def check_upload(image: bytes, settings: Settings) -> None:
    """One image as uploaded: within the size limit (413), then ``check_image``."""
    if len(image) > settings.max_upload_bytes:
        raise ApiError(413, "too_large", f"the image is {len(image)} bytes; the limit is {settings.max_upload_mb:g} MB")
    check_image(image, settings.max_pixels)


def check_image(image: bytes, max_pixels: int) -> None:
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
