"""The trace simulator: the pool core driven in virtual time.

The same ``PoolCore`` the live pool runs gets the same events, in an order an event
heap gives them: requests from a trace arrive, spawns take the profile's start-up time,
inferences the profile's inference time (or, without one, the trace's own durations),
stops the profile's stop time. Nothing sleeps, so a day of traffic replays in seconds.
``GENERAL_PROFILE`` is the default model as measured; ``bundle_profile`` makes one from
a bundle's own check.

    result = simulate(trace, CoreConfig(capacity=4, default_ttl_s=60), GENERAL_PROFILE)
    result.metrics()   # cold_rate, reject_rate, p50_ms, p99_ms, idle_worker_s, idle_gb_h

What it counts: a request is cold when it waited for a worker started for it; its
latency is queueing + start-up + inference. Idle cost is the time workers sit idle
(and pre-warmed workers spend starting) times their model's memory; the simulation
runs past the trace's end until the last worker is reaped, so a long TTL pays for the
tail it keeps.

GPUs (``Profile.gpus``, device -> total MB) are optional: with them the core places
workers by memory, from readings the simulator computes out of the workers it runs
(each holds its model's memory), and a model in ``CoreConfig.cpu_fallback`` that no
GPU has room for gets a CPU worker; its inferences take ``Profile.cpu_slowdown`` times
as long and hold no GPU memory (``fallback_serves`` counts the requests they served).
Without GPUs nothing is placed and nothing falls back, as on a CPU pool.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import multiprocessing
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, assert_never

from .core import CoreConfig, PoolCore
from .errors import WorkerCrashed
from .events import (
    Arrive,
    Command,
    Configure,
    Event,
    Expire,
    Fail,
    Grant,
    LoadWorker,
    Ready,
    Released,
    RemoveStray,
    Retry,
    SpawnWorker,
    Stopped,
    StopWorker,
    Tick,
)
from .policy import STEM, GpuReading, State
from .traces import Trace
from .tuning import Point, TuneError

_READY, _DONE, _STOPPED, _EXPIRE, _TICK, _CONFIGURE = range(6)


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
        return (
            f"spawn {self.spawn_ms:g} ms, stem load {self.load_ms:g} ms, {infer}, stop {self.stop_ms:g} ms, "
            f"{memory}, stem cell {self.stem_memory_mb:g} MB"
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


@dataclass
class SimResult:
    requests: int = 0
    served: int = 0
    cold_starts: int = 0
    stem_starts: int = 0  # cold starts a stem cell served
    fallback_serves: int = 0  # requests served by CPU fallback workers
    rejected: int = 0
    retries: int = 0  # requests a failed call sent round to another worker
    failed: int = 0  # requests that failed on a worker every try
    prewarms: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    idle_worker_s: float = 0.0
    idle_mb_s: float = 0.0
    peak_workers: int = 0
    wall_s: float = 0.0
    events: int = 0

    def metrics(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "requests": self.requests,
            "cold_starts": self.cold_starts,
            "stem_starts": self.stem_starts,
            "fallback_serves": self.fallback_serves,
            "fallback_rate": self.fallback_serves / self.requests if self.requests else 0.0,
            "cold_rate": self.cold_starts / self.requests if self.requests else 0.0,
            "reject_rate": self.rejected / self.requests if self.requests else 0.0,
            "retries": self.retries,
            "failure_rate": self.failed / self.requests if self.requests else 0.0,
            "p50_ms": percentile(ordered, 0.50),
            "p99_ms": percentile(ordered, 0.99),
            "idle_worker_s": self.idle_worker_s,
            "idle_gb_h": self.idle_mb_s / 1024 / 3600,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (NaN when empty)."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Simulator:
    """One run of ``trace`` through a ``PoolCore`` (module doc). ``tick_s``: ticks come
    only on multiples of it (keep-alive ends are noticed at the next one); None: at
    once, as the live pool's timer ticks. ``changes``: settings an operator changes
    during the run, as (time, config) pairs (``wanwu pool set`` on the live pool)."""

    def __init__(
        self,
        trace: Trace,
        config: CoreConfig,
        profile: Profile,
        queue_timeout_s: float = 10.0,
        tick_s: float | None = None,
        seed: int = 0,
        changes: Sequence[tuple[float, CoreConfig]] = (),
    ) -> None:
        self.trace, self.profile = trace, profile
        config = replace(config, tick_s=tick_s or 0.0)
        if profile.gpus:  # placement needs every model's memory: the trace's, unless the config says
            known = {m: self._memory_mb(m) for m in (*trace.profiles, STEM)}
            config = replace(config, estimates_mb={**known, **config.estimates_mb})
        self.core = PoolCore(config, id_prefix="sim")
        self.queue_timeout_s = queue_timeout_s
        self.tick_s = tick_s
        self._rng = random.Random(seed)
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._arrived: dict[int, float] = {}
        self._idle_since: dict[str, tuple[float, str]] = {}  # worker -> (idle since, model)
        self._call_ms: dict[str, float] = {}  # worker -> how long its current call takes
        self._calls: dict[str, tuple[int, ...]] = {}  # worker -> the requests its current call carries
        self._latency: dict[int, float] = {}  # request -> its latency, once its call succeeds
        self._cpu: set[str] = set()  # CPU fallback workers (no GPU memory, slower inference)
        self._next_tick = math.inf
        self.result = SimResult()
        for at, change in changes:
            estimates = {**config.estimates_mb, **change.estimates_mb}
            self._push(at, _CONFIGURE, replace(change, tick_s=config.tick_s, estimates_mb=estimates))
        self.log: list[tuple[Event, list[Command]]] | None = None  # (event, commands) if kept

    def run(self) -> SimResult:
        started = time.perf_counter()
        arrivals = self.trace.arrivals
        heap, result = self._heap, self.result
        i, now = 0, 0.0
        self._carry_out(self._feed(Tick(now)), now)  # as the live pool's start: stem cells begin
        while i < len(arrivals) or heap:
            if i < len(arrivals) and (not heap or arrivals[i][0] <= heap[0][0]):
                now, model = arrivals[i]
                i += 1
                request_id = result.requests = i
                self._arrived[request_id] = now
                deadline = now + self.queue_timeout_s
                commands = self._feed(Arrive(request_id, model, now, deadline))
                if not any(isinstance(c, Grant | Fail) and c.request_id == request_id for c in commands):
                    self._push(deadline, _EXPIRE, (request_id, 1))  # still waiting: it may time out
            else:
                now, _, kind, payload = heapq.heappop(heap)
                commands = self._event(kind, payload, now)
            self._carry_out(commands, now)
            self._schedule_tick(now)
            result.events += 1
        for worker_id, (since, model) in self._idle_since.items():  # workers kept for ever (an infinite keep-alive)
            self._add_idle(model, since, now, worker_id in self._cpu)
        result.wall_s = time.perf_counter() - started
        return result

    # -- events ----------------------------------------------------------------------

    def _event(self, kind: int, payload: Any, now: float) -> list[Command]:
        if kind == _TICK:
            if now < self._next_tick:
                return []  # a tick that a later schedule made stale
            self._next_tick = math.inf
            return self._feed(Tick(now))
        if kind == _READY:
            worker_id, spawn_ms = payload
            return self._feed(Ready(worker_id, now, spawn_ms))
        if kind == _DONE:
            return self._done(payload, now)
        if kind == _CONFIGURE:
            return self._feed(Configure(payload, now))
        if kind == _STOPPED:
            self._cpu.discard(payload)
            return self._feed(Stopped(payload, now))
        request_id, attempt = payload
        return self._feed(Expire(request_id, now, attempt))

    def _done(self, worker_id: str, now: float) -> list[Command]:
        """A worker call ends: it succeeds, or (``failure_rate``) its worker crashes on it."""
        requests = self._calls.pop(worker_id, ())
        rate = self.profile.failure_rate
        if rate > 0 and self._rng.random() < rate:
            error = WorkerCrashed(f"worker {worker_id} crashed (simulated)", worker_id)
            for request_id in requests:
                self._latency.pop(request_id, None)
            return self._feed(Released(worker_id, now, ok=False, reason="crashed", error=error))
        for request_id in requests:
            self.result.latencies_ms.append(self._latency.pop(request_id))
            self.result.served += 1
            self._arrived.pop(request_id, None)
        return self._feed(Released(worker_id, now))

    def _feed(self, event: Event) -> list[Command]:
        if self.profile.gpus:
            self.core.readings = self._readings()
        commands = self.core.handle(event)
        if self.log is not None:
            self.log.append((event, commands))
        if isinstance(event, Released | Ready):
            worker = self.core.workers.get(event.worker_id)
            if worker is not None and worker.state is State.IDLE and event.worker_id not in self._idle_since:
                self._idle_since[event.worker_id] = (event.now, worker.model)
        return commands

    def _carry_out(self, commands: list[Command], now: float) -> None:
        result, profile = self.result, self.profile
        for command in commands:
            if isinstance(command, Grant):
                arrived = self._arrived[command.request_id]
                if not command.batch or command.request_id == command.batch[0]:
                    # One worker call per batch; it lasts as long as its slowest member would alone.
                    self._busy(command.worker_id, now)
                    infer_ms = max(self._infer_ms(command.model) for _ in command.batch or (None,))
                    if command.cpu_fallback:
                        infer_ms *= profile.cpu_slowdown
                    self._call_ms[command.worker_id] = infer_ms
                    self._calls[command.worker_id] = command.batch or (command.request_id,)
                    self._push(now + infer_ms / 1000, _DONE, command.worker_id)
                result.cold_starts += command.cold_start
                result.stem_starts += command.start == "stem"
                result.fallback_serves += command.cpu_fallback
                self._latency[command.request_id] = (now - arrived) * 1000 + self._call_ms[command.worker_id]
            elif isinstance(command, Retry):
                result.retries += 1
                self._push(command.deadline, _EXPIRE, (command.request_id, command.attempt))
            elif isinstance(command, Fail):
                self._arrived.pop(command.request_id, None)
                if isinstance(command.error, WorkerCrashed):
                    result.failed += 1
                else:
                    result.rejected += 1
            elif isinstance(command, SpawnWorker):
                for victim in command.evict:
                    self._busy(victim, now)
                if command.cpu_fallback:
                    self._cpu.add(command.worker_id)
                if command.request_id is None:
                    result.prewarms += command.model != STEM
                    self._idle_since[command.worker_id] = (now, command.model)  # a guess holds memory while it starts
                spawn_s = profile.spawn_s(command.model)
                ready_at = now + len(command.evict) * profile.stop_ms / 1000 + spawn_s
                self._push(ready_at, _READY, (command.worker_id, spawn_s * 1000))
                result.peak_workers = max(result.peak_workers, len(self.core.workers))
            elif isinstance(command, LoadWorker):
                self._busy(command.worker_id, now)  # the stem cell stops waiting
                if command.request_id is None:
                    result.prewarms += 1
                    self._idle_since[command.worker_id] = (now, command.model)
                self._push(now + profile.load_ms / 1000, _READY, (command.worker_id, profile.load_ms))
            elif isinstance(command, StopWorker):
                self._busy(command.worker_id, now)
                self._push(now + profile.stop_ms / 1000, _STOPPED, command.worker_id)
            elif isinstance(command, RemoveStray):
                pass  # a simulated engine never loses a container
            else:
                assert_never(command)

    def _infer_ms(self, model: str) -> float:
        if self.profile.infer_ms is not None:
            return self.profile.infer_ms
        return self.trace.profiles[model].sample_ms(self._rng.random())

    def _busy(self, worker_id: str, now: float) -> None:
        """``worker_id`` stops being idle (taken, stopped or evicted)."""
        idle = self._idle_since.pop(worker_id, None)
        if idle is not None:
            self._add_idle(idle[1], idle[0], now, worker_id in self._cpu)

    def _add_idle(self, model: str, since: float, now: float, cpu: bool = False) -> None:
        """``model``'s worker was idle from ``since`` to ``now``; a CPU one holds no GPU memory."""
        seconds = max(0.0, now - since)
        self.result.idle_worker_s += seconds
        if not cpu:
            self.result.idle_mb_s += seconds * self._memory_mb(model)

    def _memory_mb(self, model: str) -> float:
        """The GPU memory a worker of ``model`` holds: the profile's, else the trace's."""
        memory = self.profile.stem_memory_mb if model == STEM else self.profile.memory_mb
        if memory is None:
            known = self.trace.profiles.get(model)
            memory = known.memory_mb if known is not None else 0.0
        return memory

    def _readings(self) -> list[GpuReading]:
        """What NVML would read now: the memory of the workers on each GPU. A starting
        worker's model is left out (the core adds it to the reading itself); a stem
        cell loading a model keeps its own part."""
        used = dict.fromkeys(self.profile.gpus, 0.0)
        estimates = self.core.config.estimates_mb
        for worker in self.core.workers.values():
            if worker.device in used:
                loading = estimates.get(worker.model, 0.0) if worker.state is State.STARTING else 0.0
                used[worker.device] += max(0.0, worker.gpu_mb - loading)
        return [GpuReading(device, used[device], total) for device, total in self.profile.gpus.items()]

    def _schedule_tick(self, now: float) -> None:
        wake = self.core.next_wakeup()
        if wake is None:
            return
        wake = max(wake, now) + 1e-6  # keep-alive ends are strict: idle longer than the window
        if self.tick_s:
            wake = math.ceil(wake / self.tick_s) * self.tick_s
            batch = self.core.next_batch_due()  # the live batcher ticks to the millisecond, not with the reaper
            if batch is not None:
                wake = min(wake, max(batch, now))
        if wake < self._next_tick:
            self._next_tick = wake
            self._push(wake, _TICK, None)

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, payload))


def simulate(
    trace: Trace,
    config: CoreConfig,
    profile: Profile,
    queue_timeout_s: float = 10.0,
    tick_s: float | None = None,
    seed: int = 0,
) -> SimResult:
    """Run ``trace`` through a pool with ``config`` (module doc)."""
    return Simulator(trace, config, profile, queue_timeout_s, tick_s, seed).run()


@dataclass(frozen=True)
class Grid:
    """The settings ``wanwu tune`` tries: every combination."""

    max_workers: Sequence[int] = (1, 2, 4, 8)
    ttl_s: Sequence[float] = (10, 30, 60, 120, 300, 600)
    keepalive: Sequence[str] = ("fixed", "adaptive")
    stem_cells: Sequence[int] = (0,)

    def configs(self, base: CoreConfig) -> list[CoreConfig]:
        return [
            replace(base, capacity=n, default_ttl_s=ttl, keepalive=policy, stem_cells=stems)
            for policy in self.keepalive
            for n in self.max_workers
            for stems in self.stem_cells
            for ttl in self.ttl_s
        ]


def point(config: CoreConfig, result: SimResult) -> Point:
    m = result.metrics()
    return Point(
        keepalive=config.keepalive,
        max_workers=config.capacity,
        ttl_s=config.default_ttl_s,
        requests=result.requests,
        cold_rate=m["cold_rate"],
        reject_rate=m["reject_rate"],
        p50_ms=m["p50_ms"],
        p99_ms=m["p99_ms"],
        idle_worker_s=m["idle_worker_s"],
        idle_gb_h=m["idle_gb_h"],
        stem_cells=config.stem_cells,
        stem_rate=result.stem_starts / result.requests if result.requests else 0.0,
    )


_shared: tuple[Trace, Profile, float, float | None, int] | None = None


def _adopt(trace: Trace, profile: Profile, queue_timeout_s: float, tick_s: float | None, seed: int) -> None:
    """Process-pool initializer: the trace arrives once per process (forked, not pickled)."""
    global _shared
    _shared = (trace, profile, queue_timeout_s, tick_s, seed)


def _run_one(config: CoreConfig) -> tuple[Point, float, int]:
    assert _shared is not None
    trace, profile, queue_timeout_s, tick_s, seed = _shared
    result = simulate(trace, config, profile, queue_timeout_s, tick_s, seed)
    return point(config, result), result.wall_s, result.requests


def run_grid(
    trace: Trace,
    grid: Grid,
    profile: Profile,
    base: CoreConfig | None = None,
    queue_timeout_s: float = 10.0,
    tick_s: float | None = None,
    seed: int = 0,
    jobs: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Point], float]:
    """Simulate every point of ``grid`` (on ``jobs`` processes); returns the points in
    grid order and the simulator's speed in requests per second of wall time (per process)."""
    configs = grid.configs(base or CoreConfig(capacity=1, default_ttl_s=30))
    shared = (trace, profile, queue_timeout_s, tick_s, seed)
    points: list[Point] = []
    wall = requests = 0.0
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(configs) > 1:
            context = multiprocessing.get_context("fork")
            executor = ProcessPoolExecutor(min(jobs, len(configs)), context, initializer=_adopt, initargs=shared)
            outcomes: Iterable[tuple[Point, float, int]] = stack.enter_context(executor).map(_run_one, configs)
        else:
            _adopt(*shared)
            outcomes = map(_run_one, configs)
        for got in outcomes:
            points.append(got[0])
            wall, requests = wall + got[1], requests + got[2]
            if progress:
                progress(1)
    return points, (requests / wall if wall else math.inf)
