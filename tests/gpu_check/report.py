"""The pure parts of the GPU check: statistics, the report and its steps, the LRU-order
check, reap-log parsing, watermark and ballast sizing, comparisons and the summary.

No torch, no NVML, no processes, no clock reads except through the ``clock`` a Report
is given, so every rule here is tested with plain numbers (tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import itertools
import math
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

MIB = 2**20
GIB = 2**30

# Steps in the order they run; ``--skip`` takes any of SKIPPABLE.
STEPS = ("env", "bundles", "nvml", "throughput", "gateway", "serve", "reap", "shutdown", "stem")
SKIPPABLE = ("nvml", "throughput", "serve", "reap", "stem")
GPU_ONLY = ("nvml", "reap")  # recorded as skipped in --cpu mode


# -- statistics ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between the two nearest
    ranks (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, min, p50, p90, p99 and max of millisecond timings, rounded to µs."""

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "n": len(values_ms),
        "mean": r(sum(values_ms) / len(values_ms)) if values_ms else None,
        "min": r(min(values_ms)) if values_ms else None,
        "p50": r(percentile(values_ms, 50)),
        "p90": r(percentile(values_ms, 90)),
        "p99": r(percentile(values_ms, 99)),
        "max": r(max(values_ms)) if values_ms else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 3 places; None if either is missing or the
    denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


# -- the report --------------------------------------------------------------------------


class StepFailed(Exception):
    """A step that failed but has results worth keeping (some models served, some not)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class Report:
    """Steps and their outcome: ``ok`` with a result, ``failed`` with the error (the
    run goes on), ``skipped`` with a reason, or ``interrupted`` (Ctrl-C, then re-raised)."""

    def __init__(
        self,
        mode: str,
        options: Mapping[str, Any],
        clock: Callable[[], float] = time.time,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.clock = clock
        self.progress = progress or (lambda line: None)
        self.started = clock()
        self.mode = mode
        self.options = dict(options)
        self.steps: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}  # more top-level keys (gateway log tails)

    def skip(self, name: str, reason: str) -> None:
        self.steps[name] = {"status": "skipped", "reason": reason}
        self.progress(f"{name}: skipped ({reason})")

    def run(self, name: str, fn: Callable[[], T]) -> T | None:
        """Run one step; record its result or its error. Exceptions stop here, except
        KeyboardInterrupt and SystemExit, which are recorded and passed on."""
        self.progress(f"{name}: start")
        started = self.clock()
        try:
            result = fn()
        except (KeyboardInterrupt, SystemExit) as exc:
            self.steps[name] = {"status": "interrupted", "seconds": self._since(started), "error": error_info(exc)}
            raise
        except Exception as exc:  # noqa: BLE001 - a failing step is recorded and the check goes on
            self.steps[name] = {"status": "failed", "seconds": self._since(started), "error": error_info(exc)}
            if isinstance(exc, StepFailed):
                self.steps[name]["result"] = exc.result
            self.progress(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            return None
        self.steps[name] = {"status": "ok", "seconds": self._since(started), "result": result}
        self.progress(f"{name}: ok ({self.steps[name]['seconds']:.1f} s)")
        return result

    def result(self, name: str) -> Any:
        """A step's result, or None if it did not run or did not succeed."""
        step = self.steps.get(name, {})
        return step.get("result") if step.get("status") == "ok" else None

    def _partial(self, name: str) -> Any:
        """A step's result, also of a step that failed part way (StepFailed)."""
        return self.steps.get(name, {}).get("result")

    def note(self, line: str) -> None:
        self.notes.append(line)
        self.progress(f"note: {line}")

    def _since(self, started: float) -> float:
        return round(self.clock() - started, 3)

    @property
    def failed(self) -> list[str]:
        return [name for name, step in self.steps.items() if step["status"] in ("failed", "interrupted")]

    def to_json(self) -> dict[str, Any]:
        ordered = {name: self.steps[name] for name in STEPS if name in self.steps}
        ordered.update({name: step for name, step in self.steps.items() if name not in ordered})
        return {
            "tool": "wanwu gpu check (python -m tests.gpu_check)",
            "format": 1,
            "mode": self.mode,
            "started_at": _iso(self.started),
            "seconds": round(self.clock() - self.started, 3),
            "ok": not self.failed,
            "failed_steps": self.failed,
            "options": self.options,
            "notes": self.notes,
            "comparison": compare_precisions(self._partial("serve"), self._partial("throughput")),
            "steps": ordered,
            **self.extra,
        }


def error_info(exc: BaseException) -> dict[str, Any]:
    """An exception as JSON: its type, message and the last frames of its traceback."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(frames)[-3000:]}


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# -- least recently used first ---------------------------------------------------------------


def check_lru(expected: Sequence[str], observed: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Did the reaps go least recently used first? ``expected``: the workers from least
    to most recently used; ``observed``: the reaped workers in the order seen, as groups
    that could not be told apart (reaped between the same two polls). Every reaped
    worker must be one of the least recently used ones, earlier groups before later
    ones, and all of ``expected`` must have gone."""
    rank = {worker: i for i, worker in enumerate(expected)}
    flat = [worker for group in observed for worker in group]
    problems: list[str] = []
    unknown = [w for w in flat if w not in rank]
    if unknown:
        problems.append(f"reaped workers that were not in the test: {', '.join(unknown)}")
    if len(set(flat)) != len(flat):
        problems.append("a worker was reaped twice")
    known = [w for w in flat if w in rank]
    should_have_gone = set(expected[: len(set(known))])
    spared = [w for w in expected if w in should_have_gone and w not in known]
    if spared:
        problems.append(
            f"reaped {', '.join(sorted(set(known) - should_have_gone, key=rank.__getitem__))} "
            f"while less recently used {', '.join(spared)} stayed"
        )
    groups = [[w for w in group if w in rank] for group in observed]
    groups = [group for group in groups if group]
    for before, after in itertools.pairwise(groups):
        if max(rank[w] for w in before) > min(rank[w] for w in after):
            problems.append(f"{', '.join(before)} went before {', '.join(after)}, which was used less recently")
    missing = [w for w in expected if w not in known]
    if missing:
        problems.append(f"not reaped: {', '.join(missing)}")
    return {
        "ok": not problems,
        "expected": list(expected),
        "observed": [list(group) for group in observed],
        "problems": problems,
    }


_REAP_LINE = re.compile(
    r"reaping worker (?P<worker>\S+) \(model (?P<model>.+?)\): (?P<reason>\w+) after (?P<idle>[\d.]+) s idle"
)


def parse_reaps(log_text: str, reason: str | None = None) -> list[dict[str, Any]]:
    """The pool's "reaping worker W (model M): REASON after S s idle" log lines, in
    the order the pool decided them; only ``reason`` if given."""
    out = []
    for match in _REAP_LINE.finditer(log_text):
        if reason is None or match["reason"] == reason:
            out.append(
                {
                    "worker": match["worker"],
                    "model": match["model"],
                    "reason": match["reason"],
                    "idle_s": float(match["idle"]),
                }
            )
    return out


def group_by_time(events: Iterable[tuple[str, float]]) -> list[list[str]]:
    """Workers grouped by the poll time they were first seen reaped, earliest first."""
    groups: dict[float, list[str]] = {}
    for worker, seen in events:
        groups.setdefault(seen, []).append(worker)
    return [groups[t] for t in sorted(groups)]


# -- GPU memory sizing ------------------------------------------------------------------------


def plan_watermarks(
    total_mb: float, used_mb: float, headroom_mb: float = 8192, drop_mb: float = 4096, cap: float = 0.95
) -> tuple[float, float]:
    """Watermarks for the pressure test on a GPU with ``used_mb`` in use before any worker:
    the high one ``headroom_mb`` above that (room for the workers, so nothing is reaped
    before the ballast), the low one ``drop_mb`` below it (more than the idle workers
    report holding, so one pressure tick reaps them all). Raises ValueError when the
    GPU has not that much room."""
    if total_mb <= 0:
        raise ValueError(f"total GPU memory is {total_mb} MB")
    high = min(cap, (used_mb + headroom_mb) / total_mb)
    if high * total_mb < used_mb + headroom_mb / 2:
        raise ValueError(
            f"the GPU has {used_mb:.0f} of {total_mb:.0f} MB in use: no room for {headroom_mb:.0f} MB of workers "
            f"under a high watermark of {cap}"
        )
    low = high - drop_mb / total_mb
    if low <= 0:
        raise ValueError(f"a low watermark {drop_mb:.0f} MB below the high one ({high:.4f}) is not above 0")
    return round(high, 6), round(low, 6)


def ballast_mb(
    total_mb: float,
    used_mb: float,
    high: float,
    margin_mb: float = 512,
    free_mb: float | None = None,
    reserve_mb: float = 2048,
) -> int:
    """MB to allocate so that used memory ends ``margin_mb`` above the high watermark.
    Raises ValueError when the GPU is already above it (the reaps could not be told
    from ones that were due anyway) or when it would leave less than ``reserve_mb`` free."""
    ceiling = high * total_mb
    if used_mb >= ceiling:
        raise ValueError(f"{used_mb:.0f} MB already in use, above the high watermark ({ceiling:.0f} MB)")
    need = math.ceil(ceiling - used_mb + margin_mb)
    free = total_mb - used_mb if free_mb is None else free_mb
    if need > free - reserve_mb:
        raise ValueError(f"a {need} MB ballast would leave less than {reserve_mb:.0f} MB of the {free:.0f} MB free")
    return need


def nvml_target(cuda_visible_devices: str | None, torch_index: int) -> str:
    """The NVML name (an index or a ``GPU-``/``MIG-`` UUID) of torch's device
    ``cuda:torch_index``, which CUDA_VISIBLE_DEVICES renumbers."""
    if cuda_visible_devices is None or not cuda_visible_devices.strip():
        return str(torch_index)
    visible = [item.strip() for item in cuda_visible_devices.split(",") if item.strip()]
    if torch_index >= len(visible):
        raise ValueError(f"cuda:{torch_index} is not among CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    return visible[torch_index]


def compare_allocation(
    requested_bytes: int, nvml_before: float, nvml_after: float, allocated: int, reserved: int
) -> dict[str, float]:
    """One allocation seen by NVML (used bytes before and after) and by torch's allocator,
    all in MiB; ``nvml_minus_reserved`` is what NVML counts beyond torch's reservation."""
    delta = nvml_after - nvml_before
    return {
        "requested_mib": round(requested_bytes / MIB, 1),
        "nvml_delta_mib": round(delta / MIB, 1),
        "torch_allocated_mib": round(allocated / MIB, 1),
        "torch_reserved_mib": round(reserved / MIB, 1),
        "nvml_minus_reserved_mib": round((delta - reserved) / MIB, 1),
    }


# -- fp16 against fp32 -----------------------------------------------------------------------


def compare_precisions(serve: Mapping[str, Any] | None, throughput: Mapping[str, Any] | None) -> dict[str, Any]:
    """fp16 / fp32 ratios of the ResNet-50 bundles: warm latency and GPU memory through
    the gateway, and in-process throughput per batch size (below 1 for memory and latency,
    above 1 for throughput, is fp16 doing better)."""
    out: dict[str, Any] = {}
    models = (serve or {}).get("models", {})
    fp32, fp16 = models.get("resnet50-fp32") or {}, models.get("resnet50-fp16") or {}
    if fp32 and fp16:
        out["warm_p50_ms"] = _pair(fp32, fp16, ("warm", "client_ms", "p50"))
        out["warm_p99_ms"] = _pair(fp32, fp16, ("warm", "client_ms", "p99"))
        out["worker_p50_ms"] = _pair(fp32, fp16, ("warm", "worker_ms", "p50"))
        out["nvml_process_mib"] = _pair(fp32, fp16, ("memory", "nvml_process_mib"))
        out["torch_reserved_mb"] = _pair(fp32, fp16, ("memory", "health_gpu_memory_mb"))
    per_batch = (throughput or {}).get("precisions", {})
    rows = {p: {row["batch"]: row for row in per_batch.get(p, {}).get("batches", [])} for p in ("fp32", "fp16")}
    batches = sorted(set(rows["fp32"]) & set(rows["fp16"]))
    if batches:
        out["throughput_images_per_s"] = {
            str(b): {
                "fp32": rows["fp32"][b].get("images_per_s"),
                "fp16": rows["fp16"][b].get("images_per_s"),
                "fp16_over_fp32": ratio(rows["fp16"][b].get("images_per_s"), rows["fp32"][b].get("images_per_s")),
            }
            for b in batches
        }
    return out


def _pair(fp32: Mapping[str, Any], fp16: Mapping[str, Any], path: Sequence[str]) -> dict[str, Any]:
    a, b = _dig(fp32, path), _dig(fp16, path)
    return {"fp32": a, "fp16": b, "fp16_over_fp32": ratio(b, a)}


def _dig(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


# -- the readable summary ---------------------------------------------------------------------


def render_summary(report: Mapping[str, Any]) -> str:
    """A few lines per step, from the report's JSON; never fails on missing parts."""
    lines = [f"wanwu GPU check ({report.get('mode')} mode): {'OK' if report.get('ok') else 'FAILED'}"]
    for name, step in report.get("steps", {}).items():
        status = step.get("status")
        if status == "skipped":
            lines.append(f"  {name:<10} skipped: {step.get('reason')}")
            continue
        if status != "ok":
            error = step.get("error") or {}
            lines.append(f"  {name:<10} {status.upper()}: {error.get('type')}: {error.get('message')}")
            continue
        lines.append(f"  {name:<10} ok ({step.get('seconds', 0):.1f} s)")
        try:
            lines += [f"      {line}" for line in _DETAILS.get(name, _none)(step.get("result") or {})]
        except Exception as exc:  # noqa: BLE001 - a summary line must not lose the report
            lines.append(f"      (no summary: {type(exc).__name__}: {exc})")
    comparison = report.get("comparison") or {}
    if comparison:
        lines.append("  fp16 / fp32:")
        for key, value in comparison.items():
            if key == "throughput_images_per_s":
                for batch, row in value.items():
                    lines.append(
                        f"      batch {batch:>3}: {_n(row['fp32'])} vs {_n(row['fp16'])} images/s "
                        f"(x{_n(row['fp16_over_fp32'])})"
                    )
            elif value["fp32"] is not None or value["fp16"] is not None:
                lines.append(
                    f"      {key}: {_n(value['fp32'])} vs {_n(value['fp16'])} (x{_n(value['fp16_over_fp32'])})"
                )
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _none(result: Mapping[str, Any]) -> list[str]:
    return []


def _env_lines(r: Mapping[str, Any]) -> list[str]:
    gpu = r.get("gpu") or {}
    return [
        f"GPU {gpu.get('name', '-')} ({_n(gpu.get('memory_total_mib'))} MiB), driver {gpu.get('driver_version', '-')}, "
        f"CUDA driver {gpu.get('cuda_driver_version', '-')}, NVML devices {gpu.get('device_count', '-')}",
        f"torch {r.get('torch')} (CUDA {r.get('torch_cuda')}), python {r.get('python')}",
    ]


def _bundle_lines(r: Mapping[str, Any]) -> list[str]:
    return [
        f"{name}: {b.get('precision', '-')}, input {b.get('input_size')}, {_n(b.get('file_mib'))} MiB"
        f"{' (reused)' if b.get('reused') else ''}"
        for name, b in (r.get("bundles") or {}).items()
    ]


def _nvml_lines(r: Mapping[str, Any]) -> list[str]:
    lines = [
        f"CUDA context: {_n(r.get('context_overhead_mib'))} MiB beyond torch's reservation "
        f"({r.get('context_overhead_from')}), made in {_n(r.get('context_s'))} s"
    ]
    for row in r.get("allocations", []):
        if "skipped" in row:
            lines.append(f"{row.get('label')}: skipped ({row['skipped']})")
        else:
            lines.append(
                f"{row.get('label')}: NVML +{_n(row['nvml_delta_mib'])} MiB, "
                f"torch allocated {_n(row['torch_allocated_mib'])} / reserved {_n(row['torch_reserved_mib'])} MiB"
            )
    return lines


def _throughput_lines(r: Mapping[str, Any]) -> list[str]:
    lines = []
    for precision, data in (r.get("precisions") or {}).items():
        if "skipped" in data:
            lines.append(f"{precision}: skipped ({data['skipped']})")
            continue
        cells = ", ".join(f"b{row['batch']} {_n(row['images_per_s'])}/s" for row in data.get("batches", []))
        lines.append(f"{precision}: {cells}")
    return lines


def _gateway_lines(r: Mapping[str, Any]) -> list[str]:
    return [f"ready in {_n(r.get('ready_s'))} s, watermarks {r.get('watermarks')}"]


def _serve_lines(r: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, m in (r.get("models") or {}).items():
        if "error" in m:
            lines.append(f"{name}: FAILED: {m['error'].get('message')}")
            continue
        cold, warm, mem = m.get("cold") or {}, (m.get("warm") or {}).get("client_ms") or {}, m.get("memory") or {}
        lines.append(
            f"{name}: cold {_n(cold.get('client_ms'))} ms ({cold.get('start')}), warm p50 {_n(warm.get('p50'))} / "
            f"p99 {_n(warm.get('p99'))} ms, device {m.get('device')}, GPU {_n(mem.get('nvml_process_mib'))} MiB "
            f"(torch {_n(mem.get('health_gpu_memory_mb'))} MB)"
        )
    return lines


def _reap_lines(r: Mapping[str, Any]) -> list[str]:
    lru = r.get("lru") or {}
    return [
        f"ballast {_n(r.get('ballast_mb'))} MB; reaped {r.get('reaped_models')} "
        f"({'LRU order OK' if lru.get('ok') else 'LRU order WRONG: ' + '; '.join(lru.get('problems', []))})",
        f"first reap {_n(r.get('first_reap_ms'))} ms, all gone {_n(r.get('all_gone_ms'))} ms after the ballast",
    ]


def _shutdown_lines(r: Mapping[str, Any]) -> list[str]:
    return [f"stopped in {_n(r.get('stop_s'))} s, exit {r.get('exit_code')}, leftover processes {r.get('leftover')}"]


def _stem_lines(r: Mapping[str, Any]) -> list[str]:
    return [
        f"{name}: {m.get('start')} start, {_n(m.get('client_ms'))} ms"
        if "error" not in m
        else f"{name}: FAILED: {m['error'].get('message')}"
        for name, m in (r.get("models") or {}).items()
    ]


_DETAILS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "env": _env_lines,
    "bundles": _bundle_lines,
    "nvml": _nvml_lines,
    "throughput": _throughput_lines,
    "gateway": _gateway_lines,
    "serve": _serve_lines,
    "reap": _reap_lines,
    "shutdown": _shutdown_lines,
    "stem": _stem_lines,
}
