"""The gateway's one error type and its one body.

Every error a client reads is an ``ApiError`` (status, code, message, and where it
applies Retry-After or another header) answered as
``{"error": {"code", "message", "request_id"}}`` by ``error_response``; a batch entry
that failed carries the same error object (``error_object``). Scheduler errors become
ApiErrors in one place (``translate``), and so do werkzeug's HTTP errors
(``from_http``), so the app's error handlers, the admin routes and the batch entries
all say an error the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flask import Response, jsonify
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

from .shapes import ErrorBody, ErrorObject

__all__ = ["PUBLIC_MESSAGES", "STATUS", "ApiError", "error_object", "error_response", "from_http", "translate"]

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
UNEXPECTED = "internal error; see the gateway log"


class ApiError(Exception):
    """An HTTP error answer. ``message`` is what the client reads; ``detail`` (server-side
    failures) is what the gateway's log gets under the request id, never the client.
    ``retry_after`` (seconds) becomes a Retry-After header, rounded up to whole seconds
    (at least 1); ``headers`` are sent as they are (WWW-Authenticate, Allow)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        detail: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.detail = detail
        self.headers = dict(headers or {})

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def error_object(code: str, message: str, request_id: str) -> ErrorObject:
    """The error as every body that carries one says it (a whole answer, a batch entry)."""
    return {"code": code, "message": message, "request_id": request_id}


def error_response(error: ApiError, request_id: str) -> Response:
    """The one error answer: ``{"error": {"code", "message", "request_id"}}`` and its headers."""
    body: ErrorBody = {"error": error_object(error.code, error.message, request_id)}
    response = jsonify(body)
    response.status_code = error.status
    for name, value in error.response_headers().items():
        response.headers[name] = value
    return response


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


def from_http(exc: HTTPException, too_large: str) -> ApiError:
    """werkzeug's HTTP error (404, 405, 413, 431...) as an ApiError: its name as the code
    and its description as the message; a 413 is ``too_large`` with ``too_large`` as the
    message (the limit of the route it was sent to). Its headers (Allow on a 405,
    Content-Range on a 416) are kept."""
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name
    if status == 413:
        code, message = "too_large", too_large
    headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
    return ApiError(status, code, message, headers=headers)
