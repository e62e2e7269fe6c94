"""The scheduler's errors, translated once at the boundary they cross.

    WanwuError
    ├── ConfigError            a setting has a bad value (names the key and the value)
    ├── ImageBuildError        the worker image could not be built
    ├── BackendUnavailable     the container engine cannot be reached         -> 503
    ├── CapacityExhausted      no worker became free before the deadline      -> 503
    ├── UnknownModel           no bundle of that name                         -> 404
    ├── ModelUnavailable       its workers keep failing to start (backoff)   -> 503
    └── WorkerError            a worker failed a request
        ├── WorkerStartError       it did not become ready (carries its logs) -> 502
        │   └── WorkerStartTimeout                                        -> 504
        ├── WorkerCrashed          it died or answered garbage                -> 502
        ├── WorkerTimeout          it did not answer in time                  -> 504
        └── WorkerRejected         it refused the input (client error)       -> 4xx

Each is raised ``from`` its cause; messages carry worker ids, images and exit statuses.
"""

from __future__ import annotations


class WanwuError(Exception):
    """Base of every error wanwu raises on purpose."""


class ConfigError(WanwuError, ValueError):
    """A setting is invalid."""


class ImageBuildError(WanwuError):
    """Building the worker image (base image, wheelhouse or docker build) failed."""


class BackendUnavailable(WanwuError):
    """The container engine cannot be reached or refuses to work."""


class CapacityExhausted(WanwuError):
    """No worker could be had before the request's deadline."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownModel(WanwuError, LookupError):
    """No model bundle of that name is configured."""


class WorkerError(WanwuError):
    """A worker failed to serve a request."""

    def __init__(self, message: str, worker_id: str | None = None) -> None:
        super().__init__(message)
        self.worker_id = worker_id


class WorkerStartError(WorkerError):
    """A worker did not become ready; the message carries its last log lines."""


class WorkerStartTimeout(WorkerStartError):
    """A worker was not ready within the spawn timeout."""


class WorkerCrashed(WorkerError):
    """A worker died mid-request, or answered something that is not a prediction."""


class WorkerTimeout(WorkerError):
    """A worker did not answer within the request timeout."""


class WorkerRejected(WorkerError):
    """A worker refused the request's input (4xx): the client's fault, never retried."""

    def __init__(self, message: str, status: int, code: str, worker_id: str | None = None) -> None:
        super().__init__(message, worker_id)
        self.status = status
        self.code = code


class ModelUnavailable(WanwuError):
    """A model is backing off after its workers failed to start; try again later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Image error codes that are not plain 400s (a worker's per-image errors and the gateway's checks).
INPUT_STATUS = {"not_an_image": 415, "unsupported_format": 415, "image_too_large": 413, "too_large": 413}
