"""Invocation traces for the pool simulator: when each model is asked for, and how long
one request of it runs.

Two sources, chosen by what the path is:

- a directory in the Azure Functions 2019 format (``inv.csv``, and optionally
  ``run.csv`` and ``mem.csv``). Each function is one model, named ``fn-`` and the first
  8 hex characters of its hash (more where two would collide). A minute's N invocations
  are spread uniformly at random over that minute with ``random.Random(seed)``, drawing
  for every function in file order and every minute, whatever is filtered out, so a
  filtered or windowed load equals the full load filtered afterwards.
- a file of JSON lines, the gateway's access log: each POST naming a model is one
  arrival; its durations are the percentiles of the worker times of its fresh answers.

A trace that cannot be read raises TraceError naming the file, and the line where one
line is at fault.

The types are in ``scheduler.trace_types`` and the two readers in
``scheduler.trace_azure`` and ``scheduler.trace_access_log``; this module picks the
reader, and the types are importable from here as before.
"""

from __future__ import annotations

from pathlib import Path

from .trace_access_log import load_access_log
from .trace_azure import load_azure
from .trace_types import _EXPECTED, ModelProfile, Trace, TraceError

# The types moved to scheduler.trace_types; importable from here as before.
__all__ = ["ModelProfile", "Trace", "TraceError", "load_trace"]


def load_trace(
    path: str | Path,
    *,
    max_per_day: float | None = None,
    minutes: tuple[int, int] | None = None,
    seed: int = 0,
) -> Trace:
    """Load an Azure Functions 2019 trace directory or a gateway JSON-lines access log.

    ``max_per_day`` keeps only models invoked at most that often per day over the whole
    source; ``minutes=(A, B)`` keeps minutes A..B-1 (0-based) rebased to 0; ``seed``
    drives the spreading of Azure per-minute counts (access logs have exact times).
    """
    source = Path(path)
    if max_per_day is not None and not max_per_day >= 0.0:
        raise TraceError(f"{source}: max_per_day must be >= 0, got {max_per_day}")
    if source.is_dir():
        if not (source / "inv.csv").is_file():
            raise TraceError(f"{source}: no inv.csv in this directory; {_EXPECTED}")
        return load_azure(source, max_per_day, minutes, seed)
    if source.is_file():
        return load_access_log(source, max_per_day, minutes)
    raise TraceError(f"{source}: no such file or directory; {_EXPECTED}")
