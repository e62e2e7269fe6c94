"""What a worker answers, checked and shaped: the pure half of talking to a worker
(no sockets, no clocks), which ``scheduler.worker_client`` drives.

A worker is not trusted to answer sensibly. Its answer's head must be strictly HTTP/1.x
with one Content-Length and no other framing (``_parse_head``); its body strict JSON,
without NaN or Infinity (``_DECODER``); and each image's entry is checked and rebuilt
from what a worker may say (``_entry``): labels are strings, scores and vectors finite
numbers, no more predictions than asked for, and raw scores for exactly the labels
:class:`Scores` asked for. Whatever is wrong raises ``_Malformed``, whose message says
how ("with ..." or "without ..."); the client makes it a WorkerCrashed naming the worker.
What the pool gets back is a :class:`WorkerAnswer` or a :class:`WorkerBatchAnswer`.

The names with a leading underscore are the client's helpers, not the package's API.
"""

from __future__ import annotations

import base64
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

MAX_HEADER_LINES = 100
MAX_INT = 2**53  # a larger JSON integer is no score, timing or size a worker measures

# HTTP/1.x, a 2xx to 5xx status and a reason without control characters; header fields
# are a token, a colon and a value without control characters (no folded lines).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)  # NaN, Infinity and -Infinity are garbage
_REPR = reprlib.Repr()  # what error messages quote of an answer: short, however deep or long it is
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60


class _Malformed(Exception):
    """The worker's answer is garbage; the message says how ("with ..." or "without ...")."""


# What a worker may answer for one image besides its predictions: an embedding model's
# vector and width, and the raw scores of the labels a subset asked for.
EXTRA_KEYS = ("embedding", "dim", "logits", "logits_of", "groups")


@dataclass(frozen=True)
class Scores:
    """The labels a call wants raw scores (``logits``) for, to score label subsets:
    the model's named ``subsets``, then ``columns`` (label indices, ascending, of a
    model with ``width`` labels); ``labels`` is what that comes to, in the order the
    worker answers, each label once, and ``digest`` their ``labels_digest``, which the
    worker's answer must carry."""

    subsets: tuple[str, ...]
    columns: tuple[int, ...]
    width: int
    labels: tuple[str, ...]
    digest: str

    def query(self) -> str:
        """The query parameters: named subsets by name, columns as a list or, where
        shorter, as a bitmap (bounded by the number of labels, however many are asked)."""
        named = "".join(f"&subset={quote(name, safe='')}" for name in self.subsets)
        if not self.columns:
            return named
        listed = ",".join(map(str, self.columns))
        mask = bytearray((self.width + 7) // 8)
        for column in self.columns:
            mask[column // 8] |= 1 << (column % 8)
        packed = base64.urlsafe_b64encode(bytes(mask)).rstrip(b"=").decode("ascii")
        return named + (f"&columns={listed}" if len(listed) <= len(packed) else f"&column_mask={packed}")


@dataclass(frozen=True)
class WorkerAnswer:
    predictions: list[dict[str, Any]]  # empty for an embedding model
    timing_ms: dict[str, float]
    round_trip_ms: float
    extra: dict[str, Any] = field(default_factory=dict)  # EXTRA_KEYS the worker answered

    def entry(self) -> dict[str, Any]:
        """The answer as one image's entry, shaped like a batch answer's."""
        return {"predictions": self.predictions, **self.extra}


@dataclass(frozen=True)
class WorkerBatchAnswer:
    """One entry per image sent, in order: ``{"predictions": [...]}`` or, for an image
    the worker could not decode, ``{"error": {"code", "message"}}``."""

    results: list[dict[str, Any]]
    timing_ms: dict[str, float]
    round_trip_ms: float


def _parse_head(head: bytearray) -> tuple[int, int, bool]:
    """An answer's status line and headers (without the blank line): its status,
    Content-Length, and whether the worker closes the connection after it."""
    lines = head.split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise _Malformed(f"with a malformed status line: {bytes(lines[0][:100])!r}")
    if len(lines) > MAX_HEADER_LINES + 1:
        raise _Malformed(f"with more than {MAX_HEADER_LINES} header lines")
    length, close = None, status[1] == b"0"
    for line in lines[1:]:
        header = _FIELD.fullmatch(line)
        if header is None:
            raise _Malformed(f"with a malformed header line: {bytes(line[:100])!r}")
        name = header[1].lower()
        if name == b"content-length":
            value = header[2]
            if length is not None or not value.isdigit() or len(value) > 15:
                raise _Malformed(f"with a bad or second Content-Length: {bytes(value[:30])!r}")
            length = int(value)
        elif name == b"connection":
            close = header[2].lower() == b"close"
        elif name == b"transfer-encoding":
            raise _Malformed(f"with Transfer-Encoding {bytes(header[2][:30])!r} (only Content-Length is understood)")
    if length is None:
        raise _Malformed("without Content-Length")
    return int(status[2]), length, close


def _is_result(entry: Any) -> bool:
    """One image's answer: predictions, an embedding, or an error."""
    return isinstance(entry, dict) and (
        isinstance(entry.get("predictions"), list)
        or isinstance(entry.get("embedding"), list)
        or isinstance(entry.get("error"), dict)
    )


def _entry(entry: dict[str, Any], top_k: int, scores: Scores | None) -> dict[str, Any]:
    """One image's answer (``_is_result``) checked and rebuilt from what a worker may
    say: an error, or predictions (at most ``top_k``) and EXTRA_KEYS, with the raw
    scores ``scores`` asks for. Raises _Malformed naming what is wrong."""
    error = entry.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if type(code) is not str or type(message) is not str:
            raise _Malformed(f"with an error whose code and message are not strings: {_clip(error)}")
        return {"error": {"code": code, "message": message}}
    checked: dict[str, Any] = {}
    if entry.get("predictions") is not None:
        checked["predictions"] = _labelled(entry["predictions"], "predictions", top_k)
    if entry.get("embedding") is not None:
        embedding = checked["embedding"] = _numbers(entry["embedding"], "embedding")
        dim = entry.get("dim", len(embedding))
        if type(dim) is not int or dim != len(embedding):
            raise _Malformed(f"with dim {_clip(dim)} for an embedding of {len(embedding)} numbers")
        checked["dim"] = dim
    if entry.get("groups") is not None:
        checked["groups"] = _labelled(entry["groups"], "groups")
    if scores is not None and "predictions" in checked:
        logits = _numbers(entry.get("logits"), "logits")
        if len(logits) != len(scores.labels):
            raise _Malformed(f"with {len(logits)} raw scores for {len(scores.labels)} labels")
        if type(entry.get("logits_of")) is not str:
            raise _Malformed(f"with raw scores whose logits_of is {_clip(entry.get('logits_of'))}, not a string")
        checked["logits"], checked["logits_of"] = logits, entry["logits_of"]
    return checked


def _labelled(items: Any, what: str, most: int | None = None) -> list[dict[str, Any]]:
    """``items`` as a list of ``{"label": str, "score": finite number}`` (at most ``most``)."""
    if type(items) is not list:
        raise _Malformed(f"with {what} that are {_kind(items)}, not a list")
    if most is not None and len(items) > most:
        raise _Malformed(f"with {len(items)} {what} where top_k was {most}")
    checked = []
    for index, item in enumerate(items):
        if type(item) is not dict or type(item.get("label")) is not str or not _number(item.get("score")):
            raise _Malformed(f"with {what}[{index}] {_clip(item)}, not a string label and a finite score")
        checked.append({"label": item["label"], "score": item["score"]})
    return checked


def _number(value: Any) -> bool:
    """A finite number, as JSON gives one (a bool is not one)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -MAX_INT <= value <= MAX_INT


_FLOATS = {float}


def _numbers(values: Any, what: str) -> list[float]:
    """``values`` as a list of finite numbers (a vector of floats is checked in C)."""
    if type(values) is not list:
        raise _Malformed(f"with {what} that are {_kind(values)}, not a list of numbers")
    if set(map(type, values)) <= _FLOATS:
        good = all(map(math.isfinite, values))
    else:
        good = all(map(_number, values))
    if not good:
        index = next(i for i, value in enumerate(values) if not _number(value))
        raise _Malformed(f"with {what}[{index}] {_clip(values[index])}, not a finite number")
    return values


def _check_timing(timing: Any) -> None:
    """A worker's ``timing_ms``: an object of finite numbers."""
    if type(timing) is not dict:
        raise _Malformed(f"with timing_ms {_clip(timing)}, not an object")
    for name, value in timing.items():
        if not _number(value):
            raise _Malformed(f"with timing_ms {_clip(name)} {_clip(value)}, not a finite number")


def _check_health(health: dict[str, Any]) -> None:
    """What the pool takes from a worker's health: its status and GPU memory."""
    if not isinstance(health.get("status", ""), str):
        raise _Malformed(f"with status {_clip(health['status'])}, not a string")
    gpu_mb = health.get("gpu_memory_mb")
    if gpu_mb is not None and not (_number(gpu_mb) and gpu_mb >= 0):
        raise _Malformed(f"with gpu_memory_mb {_clip(gpu_mb)}, not a finite number of megabytes")


def _error(payload: dict[str, Any]) -> tuple[str | None, str | None]:
    """An error answer's code and message, where they are strings."""
    error = payload.get("error")
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (code if isinstance(code, str) else None), (message if isinstance(message, str) else None)


def _kind(value: Any) -> str:
    """What JSON value ``value`` is, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _clip(value: Any) -> str:
    """``value`` quoted for a message: short, however deep or long it is."""
    return _REPR.repr(value)
