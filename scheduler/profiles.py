"""Profiles: how long a simulated worker's starts, loads, inferences and stops take,
and how much memory it holds.

A :class:`Profile` is what the simulator (``scheduler.sim``) charges for each thing a
pool does: a new container's start-up (``spawn_ms``), a stem cell's load of a model
(``load_ms``), one inference (``infer_ms``, or the trace's own durations), a stop
(``stop_ms``), and the memory a worker and a waiting stem cell hold; with ``gpus``, the
simulated GPUs a pool places workers on.

Where the figures come from: ``GENERAL_PROFILE`` is the default model as ``make bench``
measured it; :func:`bundle_profile` and :func:`load_bundle_profile` put a bundle's own
check (``bundle_report.json``, which ``wanwu bundle create`` writes) in its place; and
:func:`resolve_profile` lays ``wanwu tune``'s flags over either, and says in words where
each figure came from.

    profile, source = load_bundle_profile(bundle_dir)  # "bundle NAME (PATH; GPU memory measured)"
    profile.describe()  # "spawn 2300 ms, stem load 130 ms, inference 20 ms, stop 300 ms, ..."
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .policy import STEM
from .tuning import TuneError


@dataclass(frozen=True)
class Profile:
    """How long things take. ``infer_ms`` None: each request takes a duration drawn
    from its model's trace profile; ``memory_mb`` None: the trace's memory per model.
    A stem cell starts in ``spawn_ms`` less ``load_ms``, loads a model in ``load_ms``
    and holds ``stem_memory_mb`` while it waits (the runtime and, on a GPU, the CUDA
    context). ``gpus``: the simulated GPUs' total memory by device (empty: a CPU pool);
    ``cpu_slowdown``: how many times longer an inference takes on a CPU fallback worker
    (an assumption, not a measurement: a small CNN on a few cores against one GPU;
    its start-up is taken to be a GPU worker's). The defaults are round figures for
    tests and sketches; ``GENERAL_PROFILE`` is the default model's, as measured."""

    spawn_ms: float = 1700.0
    stop_ms: float = 300.0
    infer_ms: float | None = None
    memory_mb: float | None = None
    model_spawn_ms: Mapping[str, float] = field(default_factory=dict)
    load_ms: float = 150.0
    stem_memory_mb: float = 500.0
    stem_spawn_ms: float | None = None  # a stem cell's own start; None: spawn_ms - load_ms
    gpus: Mapping[str, float] = field(default_factory=dict)  # device -> total MB; empty: no GPUs
    cpu_slowdown: float = 8.0  # inference on a CPU fallback worker against a GPU worker (assumed)
    failure_rate: float = 0.0  # the share of worker calls that crash (the core tries them again)

    def spawn_s(self, model: str) -> float:
        if model == STEM:
            return (self.runtime_ms if self.stem_spawn_ms is None else max(0.0, self.stem_spawn_ms)) / 1000
        return self.model_spawn_ms.get(model, self.spawn_ms) / 1000

    @property
    def runtime_ms(self) -> float:
        """A worker's start-up before its model: the container and the runtime's imports
        (``spawn_ms`` less ``load_ms``), which is also how long a stem cell takes to start."""
        return max(0.0, self.spawn_ms - self.load_ms)

    def describe(self) -> str:
        """The figures in words, e.g. "spawn 2300 ms, stem load 130 ms, inference 20 ms,
        stop 300 ms, worker 700 MB, stem cell 500 MB"; a figure left to the trace says so."""
        infer = "inference from the trace" if self.infer_ms is None else f"inference {self.infer_ms:g} ms"
        memory = "worker memory from the trace" if self.memory_mb is None else f"worker {self.memory_mb:g} MB"
        failures = f", {self.failure_rate:.0%} of calls fail and are tried again" if self.failure_rate else ""
        return (
            f"spawn {self.spawn_ms:g} ms, stem load {self.load_ms:g} ms, {infer}, stop {self.stop_ms:g} ms, "
            f"{memory}, stem cell {self.stem_memory_mb:g} MB{failures}"
        )


GENERAL_PROFILE = Profile(
    spawn_ms=2000.0,
    load_ms=175.0,
    infer_ms=13.0,
    stop_ms=300.0,
    memory_mb=700.0,
    stem_memory_mb=500.0,
)
"""The default model, ``general`` (EfficientNet-Lite0, ONNX on onnxruntime, in the CPU
worker image), as ``make bench`` measured it (core section, 2 vCPUs, p50s; README,
Performance):

- ``spawn_ms``: a new container's cold start, from create to the first answer (2004);
- ``load_ms``: a stem cell's load request, the model's load and warm-up (173);
- ``infer_ms``: one photo, one intra-op thread, on the CPU: the worker's own time
  (13.3; its socket round trip 13.4);
- ``stop_ms``: stopping and removing a container (not re-measured: the figure of the
  demo model's runs, which a model does not change);
- ``memory_mb``: an ESTIMATE, not a measurement: the general bundle's ``gpu_memory_mb``
  (no GPU was there to measure it);
- ``stem_memory_mb``: an ESTIMATE of a CUDA context, what a waiting stem cell holds.

``wanwu tune`` starts from it; ``bundle_profile`` puts a bundle's own check in its place.
"""

_REPORT = "bundle_report.json"  # written beside model.json by `wanwu bundle create`


def bundle_profile(
    report: Mapping[str, Any], estimate_mb: float | None = None, base: Profile = GENERAL_PROFILE
) -> Profile:
    """``base`` with a bundle's own measurements, the check ``wanwu bundle create``
    writes to ``bundle_report.json``: a stem cell loads in ``load_ms`` + ``warmup_ms``; a
    new worker starts in base's runtime start (the container and the runtime's imports,
    which a bundle does not change) plus that load; an inference takes ``infer_ms`` (the
    median of the requests after the first) where the check has it, else ``first_ms``; a
    worker holds ``gpu_memory_mb`` where a GPU measured it, else ``estimate_mb`` (the
    bundle's estimate in model.json), else base's. Stop time and a stem cell's memory are
    base's. Raises TuneError naming a key that is missing or not a number >= 0."""

    def figure(key: str) -> float | None:
        value = report.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf
        ):
            raise TuneError(f"{key} is {value!r}; expected a number >= 0")
        return None if value is None else float(value)

    def required(key: str) -> float:
        value = figure(key)
        if value is None:
            raise TuneError(f"no {key}; expected the report of `wanwu bundle check` (load_ms, warmup_ms, first_ms)")
        return value

    if report.get("ok") is False:
        raise TuneError(f"the bundle failed its check: {report.get('error')}")
    load = required("load_ms") + required("warmup_ms")
    infer = figure("infer_ms")
    memory = next((mb for mb in (figure("gpu_memory_mb"), estimate_mb, base.memory_mb) if mb is not None), None)
    return replace(
        base,
        spawn_ms=base.runtime_ms + load,
        load_ms=load,
        infer_ms=required("first_ms") if infer is None else infer,
        memory_mb=memory,
    )


def resolve_profile(
    bundle: tuple[Profile, str] | None,
    access_log: bool,
    infer_ms: float | str | None,
    memory_mb: float | str | None,
    figures: Mapping[str, float | None],
) -> tuple[Profile, str]:
    """The Profile ``wanwu tune`` simulates, and where it came from in words: flags
    (``figures``, ``infer_ms``, ``memory_mb``; None where not given) over ``bundle`` (a
    bundle's profile and its source) over the general model, except that an access
    log's inference is its own (it holds the model's times) unless ``infer_ms`` or a
    bundle says otherwise; "trace" leaves a figure to the trace, model by model."""
    base, source = bundle or (GENERAL_PROFILE, "the general model (make bench, 2 vCPUs)")

    def figure(flag: float | str | None, default: float | None) -> float | None:
        return default if flag is None else None if flag == "trace" else float(flag)

    given: dict[str, Any] = {name: value for name, value in figures.items() if value is not None}
    flags = [
        name for name, value in {**given, "infer_ms": infer_ms, "memory_mb": memory_mb}.items() if value is not None
    ]
    if flags:
        source += ", with " + ", ".join("--" + name.replace("_", "-") for name in flags)
    profile = replace(
        base,
        **given,
        infer_ms=figure(infer_ms, None if access_log and bundle is None else base.infer_ms),
        memory_mb=figure(memory_mb, base.memory_mb),
    )
    return profile, source


def load_bundle_profile(path: str | Path, base: Profile = GENERAL_PROFILE) -> tuple[Profile, str]:
    """:func:`bundle_profile` of a bundle directory or its ``bundle_report.json`` (the
    estimate from the model.json beside it), and where its figures came from in words.
    Raises TuneError naming the file when it is missing, not JSON or not a check's report."""
    path = Path(path)
    report_path = path / _REPORT if path.is_dir() else path
    report = _json_object(report_path)
    config_path = report_path.with_name("model.json")
    config = _json_object(config_path) if config_path.is_file() else {}
    estimate = config.get("gpu_memory_mb")
    estimate_mb = float(estimate) if isinstance(estimate, int | float) and not isinstance(estimate, bool) else None
    try:
        profile = bundle_profile(report, estimate_mb, base)
    except TuneError as exc:
        raise TuneError(f"{report_path}: {exc}") from exc
    if isinstance(report.get("gpu_memory_mb"), int | float):
        memory = "GPU memory measured"
    elif estimate_mb is not None:
        memory = "GPU memory the bundle's estimate"
    else:
        memory = "GPU memory unknown: the default profile's"
    name = report.get("name") or config.get("name") or report_path.parent.name
    return profile, f"bundle {name} ({report_path}; {memory})"


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TuneError(f"{path}: no such file; expected a bundle directory or its {_REPORT}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TuneError(f"{path}: cannot read it: {exc}") from exc
    except ValueError as exc:
        raise TuneError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TuneError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
