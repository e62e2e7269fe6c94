"""The backfill's errors, and the hint that ends a message whose work a rerun finishes."""

from __future__ import annotations

from scheduler.errors import WanwuError

RESUME_HINT = "rerun the same command to resume"


class BackfillError(WanwuError):
    """The backfill cannot go on: a bad source or results file, an unknown model, or a
    request the gateway refuses as a whole."""


class OptionsMismatch(BackfillError):
    """The results file was made with other options than the ones given now."""
