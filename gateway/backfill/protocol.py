"""Talking to the gateway: the limits it states, how a batch request's answer is judged,
and the backoff between tries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BackfillError


@dataclass(frozen=True)
class Limits:
    """What the gateway accepts, from ``GET /v1/models``."""

    max_upload_bytes: int
    max_batch_images: int
    max_batch_upload_bytes: int

    @classmethod
    def from_json(cls, raw: Any, url: str) -> Limits:
        try:
            return cls(
                int(float(raw["max_upload_mb"]) * 2**20),
                int(raw["max_batch_images"]),
                int(float(raw["max_batch_upload_mb"]) * 2**20),
            )
        except (KeyError, TypeError, ValueError):
            raise BackfillError(
                f"{url}/v1/models has no batch limits: the gateway predates the batch endpoint"
            ) from None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; a server's Retry-After is the floor."""

    base_s: float = 0.5
    cap_s: float = 60.0

    def delay(self, attempt: int, floor_s: float = 0.0, rand: float = 0.5) -> float:
        """Seconds before retry number ``attempt`` (0 first); ``rand`` in [0, 1)."""
        grown = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32))
        return max(floor_s, grown * (0.5 + rand / 2))


@dataclass(frozen=True)
class Reply:
    """A batch request's outcome, judged by its status.

    ``kind``: ``ok`` (per-image results), ``busy`` (503/429: retry after ``retry_after_s``,
    for ever), ``retry`` (502/504/500, a timeout, a garbled answer: a few times),
    ``split`` (413: send halves), ``fatal`` (stop the job)."""

    kind: str
    code: str = ""
    message: str = ""
    results: tuple[Any, ...] = ()
    retry_after_s: float = 0.0


def judge(status: int, body: Any, retry_after: str | None, model: str) -> Reply:
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code, message = str(error.get("code", f"http_{status}")), str(error.get("message", ""))[:500]
    if status == 200:
        results = body.get("results") if isinstance(body, dict) else None
        if isinstance(results, list):
            return Reply("ok", results=tuple(results))
        return Reply("retry", "bad_answer", "the gateway answered 200 without results")
    if status in (429, 503):
        return Reply("busy", code, message, retry_after_s=_seconds(retry_after))
    if status == 413:
        return Reply("split", "too_large" if code == "http_413" else code, message or "the request is too large")
    if status in (500, 502, 504):
        return Reply("retry", code, message or f"the gateway answered {status}")
    if status == 404 and code == "unknown_model":
        return Reply("fatal", code, f"the gateway serves no model named {model}: {message}")
    if status == 404:
        return Reply("fatal", code, f"the gateway has no batch endpoint (404 {code}): it predates wanwu backfill")
    return Reply("fatal", code, f"the gateway refused a batch with {status} {code}: {message}")


def _seconds(raw: str | None) -> float:
    try:
        value = float(raw) if raw is not None else 1.0
    except ValueError:
        return 1.0  # an HTTP date: not worth parsing, the backoff grows anyway
    return value if 0 <= value < float("inf") else 1.0
