"""Shaping a worker's answer as each request asked: pure functions, no I/O, no threads.

A request scores over all of its model's labels, or over a subset of them (``LabelSubset``:
one of the model's named subsets, or labels named in the request), renormalised over it
and cut to its own top_k. One worker call may serve several requests (a dynamic batch):
``label_scores`` says which raw scores the call asks the worker for, ``slices`` which part
of the call's results is each request's, and ``shape`` turns one image's entry into what
its request asked for.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from wanwu_worker.bundle import labels_digest

from .errors import WorkerCrashed
from .models import ModelInfo
from .worker_client import Scores

__all__ = ["LabelSubset", "label_scores", "shape", "slices", "subset_predictions"]


@dataclass(frozen=True)
class LabelSubset:
    """The labels a request scores over (renormalised over them): one of the model's
    named subsets, or labels named in the request (``name`` None)."""

    labels: tuple[str, ...]
    name: str | None = None


def label_scores(info: ModelInfo, subsets: Iterable[LabelSubset | None]) -> Scores | None:
    """The raw scores one worker call asks for to score every request's subset: the
    named subsets by name, the other labels by column; None when no request has one."""
    given = [subset for subset in subsets if subset is not None]
    named = tuple(dict.fromkeys(s.name for s in given if s.name is not None))
    listed = tuple(dict.fromkeys(label for s in given if s.name is None for label in s.labels))
    if not named and not listed:
        return None
    columns = tuple(sorted(info.columns[label] for label in listed))
    in_order = [label for name in named for label in info.subsets[name]] + [info.labels[c] for c in columns]
    labels = tuple(dict.fromkeys(in_order))
    return Scores(named, columns, len(info.labels), labels, labels_digest(labels))


def shape(entry: dict[str, Any], top_k: int, subset: LabelSubset | None, scores: Scores | None) -> dict[str, Any]:
    """One image's entry as its request asked: the top ``top_k`` predictions over all
    labels, or over ``subset`` (scored from the raw scores the worker gave for
    ``scores.labels``); never the raw scores themselves."""
    shaped = {key: value for key, value in entry.items() if key not in ("logits", "logits_of")}
    if "error" in entry:
        return shaped
    if subset is not None:
        if scores is None or entry.get("logits_of") != scores.digest:
            # The worker loaded another version of the bundle than the catalog knows
            # (replaced while it ran, before the catalog's rescan retired it): its scores
            # are of other labels. Fail loudly.
            raise WorkerCrashed(
                "the worker's raw scores are not of the labels asked for: its bundle differs from the "
                "gateway's catalog (the bundle was replaced; the worker is retired at the next rescan)"
            )
        shaped["predictions"] = subset_predictions(entry.get("logits"), scores.labels, subset.labels, top_k)
    elif isinstance(entry.get("predictions"), list):
        shaped["predictions"] = entry["predictions"][:top_k]
    return shaped


def subset_predictions(logits: Any, asked: Sequence[str], subset: Sequence[str], top_k: int) -> list[dict[str, Any]]:
    """The top ``top_k`` of ``subset`` with scores renormalised over it: a softmax over
    those labels' raw scores (``logits``, one per label ``asked``), which equals the
    model's probabilities divided by their sum over the subset, without their underflow
    for a model with tens of thousands of labels. Ties keep the subset's order."""
    if not isinstance(logits, list) or len(logits) != len(asked):
        raise WorkerCrashed(f"the worker answered {str(logits)[:80]} for the raw scores of {len(asked)} labels")
    where = {label: index for index, label in enumerate(asked)}
    raw = [float(logits[where[label]]) for label in subset]
    top = max(raw)
    weights = [math.exp(value - top) for value in raw]
    total = sum(weights)
    ranked = sorted(range(len(subset)), key=lambda i: -weights[i])[:top_k]
    return [{"label": subset[i], "score": round(weights[i] / total, 6)} for i in ranked]


def slices(sizes: Sequence[int]) -> list[slice]:
    """Each batch member's part of a batch call's results, given how many images each
    member sent, in the order they were sent: ``slices([2, 1, 3])`` is
    ``[slice(0, 2), slice(2, 3), slice(3, 6)]``."""
    ends = itertools.accumulate(sizes)
    return [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]
