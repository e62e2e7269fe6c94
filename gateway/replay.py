"""``wanwu replay``: play a trace against a live gateway and check the simulator's word.

The trace's requests go to the gateway at their own times divided by the speed-up, each
a fresh answer (``Cache-Control: no-cache``) for a small picture made here. From the
answers come the measured cold-start rate, 503 rate and latency, and the start-up and
inference times the simulator then uses, with the gateway's live settings (``GET
/v1/pool``), to predict the same run. The two agreeing is how we know ``wanwu tune``
tells operators the truth.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from scheduler.core import CoreConfig
from scheduler.errors import ConfigError, WanwuError
from scheduler.profiles import Profile
from scheduler.settings import SPECS, Settings
from scheduler.sim import percentile, simulate
from scheduler.traces import Trace, load_trace

from .client import request_json


class ReplayError(WanwuError):
    """The replay cannot run: the gateway is too old, or knows no such model."""


@dataclass
class Outcome:
    model: str
    sent_at: float  # seconds after the replay's start
    status: int
    latency_ms: float
    cold_start: bool = False
    spawn_ms: float = 0.0
    worker_ms: float = 0.0
    queue_ms: float = 0.0
    start: str = "warm"  # warm, container or stem


def picture() -> bytes:
    """A small PNG for the replay's requests (the model's answer does not matter here)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _get(url: str) -> Any:
    status, body = request_json("GET", url, timeout=10)
    if status != 200 or not isinstance(body, dict):
        raise ReplayError(f"{url} answered {status}: {str(body)[:200]}")
    return body


def gateway_settings(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pool's live settings (from /v1/pool) and the models (from /v1/models)."""
    pool = _get(f"{url}/v1/pool")
    if "settings" not in pool:
        raise ReplayError(f"{url}/v1/pool has no settings: the gateway predates wanwu replay")
    return pool, _get(f"{url}/v1/models")


def assign(trace: Trace, models: Sequence[str], known: frozenset[str] = frozenset()) -> Trace:
    """Send the trace's models the gateway serves to themselves (an access log of this
    gateway), and spread the others over ``models`` in turn, in order of first request."""
    others = [name for name in trace.models() if name not in known]
    return trace.mapped({name: models[i % len(models)] for i, name in enumerate(others)})


def send_all(
    url: str,
    trace: Trace,
    concurrency: int,
    progress: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Send every arrival of ``trace`` at its time (seconds from now), at most
    ``concurrency`` at once; a request that would start late goes at once."""
    body = picture()
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency))
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic()

    def one(at: float, model: str) -> None:
        try:
            response = session.post(
                f"{url}/v1/models/{model}/predict",
                data=body,
                headers={"Content-Type": "image/png", "Cache-Control": "no-cache"},
                timeout=300,
            )
            status = response.status_code
            try:
                answer = response.json()
            except ValueError:  # a proxy's error page, say: the status still counts
                answer = {}
        except requests.RequestException:
            status, answer = 0, {}
        # From when it was due, as the simulator counts: a client running late shows too.
        latency = (time.monotonic() - (start + at)) * 1000
        if not isinstance(answer, dict) or status != 200:
            answer = {}
        raw_timing = answer.get("timing_ms")
        timing: dict[str, Any] = raw_timing if isinstance(raw_timing, dict) else {}
        outcome = Outcome(
            model,
            at,
            status,
            latency,
            answer.get("cold_start") is True,
            _float(timing.get("spawn")) or 0.0,
            _float(timing.get("worker")) or 0.0,
            _float(timing.get("queue")) or 0.0,
            str(answer.get("start", "warm")),
        )
        with lock:
            outcomes.append(outcome)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="wanwu-replay") as executor:
        last_said = start
        for index, (at, model) in enumerate(trace.arrivals):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            executor.submit(one, at, model)
            if progress and time.monotonic() - last_said >= 10:
                last_said = time.monotonic()
                progress(f"replay: {index + 1}/{len(trace.arrivals)} sent, {time.monotonic() - start:.0f} s")
    session.close()
    return sorted(outcomes, key=lambda o: o.sent_at)


def measured(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    served = sorted(o.latency_ms for o in outcomes if o.status == 200)
    total = len(outcomes)
    cold = sum(o.cold_start for o in outcomes)
    stem = sum(o.start == "stem" for o in outcomes)
    rejected = sum(o.status == 503 for o in outcomes)
    return {
        "requests": total,
        "cold_starts": cold,
        "stem_starts": stem,
        "cold_rate": cold / total if total else 0.0,
        "reject_rate": rejected / total if total else 0.0,
        # 429: the replay, one client, had client_max_requests in flight (raise it for a replay)
        "client_bound": sum(o.status == 429 for o in outcomes),
        "errors": sum(o.status not in (200, 429, 503) for o in outcomes),
        "p50_ms": percentile(served, 0.50),
        "p99_ms": percentile(served, 0.99),
    }


def profile_of(
    outcomes: Sequence[Outcome],
    stop_ms: float,
    spawn_ms: float | None = None,
    pool_starts: dict[str, Any] | None = None,
) -> Profile | None:
    """Start-up and service times as measured: the median start of cold answers from a
    new container (else the pool's last one, else ``spawn_ms``) and from a stem cell
    (the load), the pool's own stem-cell start-up, and the median of what each answer
    took beyond queueing and start-up (HTTP, gateway and worker time). None without
    answers or any start-up time."""
    starts = pool_starts or {}

    def median(kind: str, known: float | None) -> float | None:
        measured = [o.spawn_ms for o in outcomes if o.cold_start and o.start == kind and o.spawn_ms > 0]
        return statistics.median(measured) if measured else known

    load = median("stem", _float(starts.get("load")))
    stem_start = _float(starts.get("stem"))
    # A container start as measured, else as given, else the pool's last, else a stem cell's start and load.
    known = spawn_ms if spawn_ms is not None else _float(starts.get("container"))
    if known is None and stem_start is not None and load is not None:
        known = stem_start + load
    container = median("container", known)
    service = [max(0.0, o.latency_ms - o.queue_ms - o.spawn_ms) for o in outcomes if o.status == 200]
    if container is None or not service:
        return None
    return Profile(
        spawn_ms=container,
        stop_ms=stop_ms,
        infer_ms=statistics.median(service),
        load_ms=150.0 if load is None else load,
        stem_spawn_ms=stem_start,
    )


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def live_config(pool: dict[str, Any]) -> tuple[CoreConfig, float]:
    """The core's config and the queue timeout of a live gateway, from its /v1/pool
    settings: read as settings (what it reports that is a setting; the rest at its
    default, as a gateway would have it), through the same CoreConfig the pool builds.
    Asked before a replay starts, so a gateway whose settings these bounds refuse (an
    older one) is a ReplayError at once, not after the whole run."""
    live = pool["settings"]
    try:
        settings = Settings.load(environ={}).changed(
            "the gateway's /v1/pool settings", strict=True, **{key: live[key] for key in SPECS if key in live}
        )
        config = CoreConfig.from_settings(
            settings,
            ttl_overrides={str(k): float(v) for k, v in live.get("model_ttl_s", {}).items()},
            batching={
                str(model): (int(b["max_batch_size"]), float(b["max_wait_ms"]) / 1000)
                for model, b in live.get("batching", {}).items()
            },
        )
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ReplayError(f"cannot predict with the gateway's settings: {exc}") from None
    return config, settings.queue_timeout_s


def predicted(trace: Trace, live: tuple[CoreConfig, float], profile: Profile) -> dict[str, Any]:
    """What the simulator says the same run gives, with the gateway's live settings
    (``live_config``)."""
    config, queue_timeout_s = live
    # The live pool ticks at its core's exact wake-ups (the reaper's interval only paces GPU readings).
    result = simulate(trace, config, profile, queue_timeout_s)
    m = result.metrics()
    return {
        "requests": result.requests,
        "cold_starts": result.cold_starts,
        "stem_starts": result.stem_starts,
        "cold_rate": m["cold_rate"],
        "reject_rate": m["reject_rate"],
        "p50_ms": m["p50_ms"],
        "p99_ms": m["p99_ms"],
    }


def replay_trace(
    path: str,
    url: str,
    speedup: float,
    *,
    minutes: tuple[int, int] | None = None,
    max_per_day: float | None = None,
    seed: int = 0,
    models: Sequence[str] | None = None,
    stop_ms: float = 300.0,
    spawn_ms: float | None = None,
    concurrency: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Replay ``path`` against ``url`` and return ``{"measured", "predicted", ...}``;
    ``predicted`` is None (with a ``note``) when nothing could be measured to predict with."""
    url = url.rstrip("/")
    pool, listed = gateway_settings(url)
    known = {m["name"] for m in listed.get("models", [])}
    default = next((m["name"] for m in listed.get("models", []) if m.get("default")), None)
    targets = list(models or ([default] if default else []))
    if not targets:
        raise ReplayError(f"{url} has no default model; name one with --model")
    unknown = [m for m in targets if m not in known]
    if unknown:
        raise ReplayError(f"{url} serves no model named {', '.join(unknown)} (it has: {', '.join(sorted(known))})")
    loaded = load_trace(path, max_per_day=max_per_day, minutes=minutes, seed=seed)
    trace = assign(loaded, targets, frozenset() if models else frozenset(known)).compressed(speedup)
    if not trace.arrivals:
        raise ReplayError(f"{path}: no requests in the chosen slice")
    if pool.get("workers"):
        say = progress or (lambda _: None)
        say(f"replay: the pool already has {len(pool['workers'])} workers; the prediction starts from an empty pool")
    if progress:
        progress(f"replay: {len(trace.arrivals)} requests over {trace.span_s:.0f} s to {', '.join(targets)}")
    live = live_config(pool)
    outcomes = send_all(url, trace, concurrency, progress)
    after = _get(f"{url}/v1/pool")  # the start-up times the pool measured meanwhile
    profile = profile_of(outcomes, stop_ms, spawn_ms, after.get("settings", {}).get("start_ms"))
    report: dict[str, Any] = {
        "measured": measured(outcomes),
        "predicted": None if profile is None else predicted(trace, live, profile),
        "slice": f"minutes {minutes[0]}:{minutes[1]}" if minutes else "the whole trace",
        "speedup": speedup,
        "models": targets,
        "settings": pool["settings"],
    }
    if profile is None:
        report["note"] = "no start-up time was measured (or no answer succeeded): pass --spawn-ms to predict anyway"
    else:
        report["profile"] = {
            "spawn_ms": profile.spawn_ms,
            "load_ms": profile.load_ms,
            "stem_spawn_ms": profile.stem_spawn_ms,
            "infer_ms": profile.infer_ms,
            "stop_ms": profile.stop_ms,
        }
    return report
