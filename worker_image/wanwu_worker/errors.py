"""The worker's errors. Each carries a stable ``code`` for clients and the HTTP status
the serve mode answers with; messages name the file or field at fault."""

from __future__ import annotations


class WorkerError(Exception):
    """Base class: an error with a machine-readable code and an HTTP status."""

    code = "worker_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BundleError(WorkerError):
    """The model bundle is missing, malformed or inconsistent."""

    code = "bad_bundle"
    status = 500


class InputError(WorkerError):
    """The request's image or parameters cannot be used (a client error)."""

    code = "bad_input"
    status = 400


class PayloadTooLarge(InputError):
    code = "too_large"
    status = 413


class InferenceError(WorkerError):
    """The model raised while running on a valid input."""

    code = "inference_failed"
    status = 500


class LengthRequired(InputError):
    code = "length_required"
    status = 411
