"""The GPU check's steps. Each takes the run's Context and returns a JSON-able result,
or raises (StepFailed to keep a partial result); the Report records either."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from wanwu_worker.bundle import load_bundle

from . import bundles as bundles_mod
from . import gpu
from .options import Options
from .procs import ROOT, Gateway, find_worker_socket, multipart, worker_health
from .report import (
    MIB,
    StepFailed,
    ballast_mb,
    check_lru,
    error_info,
    group_by_time,
    latency_stats,
    parse_reaps,
    plan_watermarks,
)

DEMO = bundles_mod.DEMO
FP32, FP16 = "resnet50-fp32", "resnet50-fp16"
MODELS = (DEMO, FP32, FP16)  # also the order workers are started in
USE_ORDER = (FP16, DEMO, FP32)  # the reap test's last uses, least recent first: neither start order nor size
DEMO_LABEL = "红色圆形"


@dataclass
class Context:
    opts: Options
    work: Path
    models_dir: Path
    socket_root: Path
    env: dict[str, str]  # the base environment of every child process
    progress: Callable[[str], None]
    torch_index: int = 0
    nvml_target: str = "0"
    nvml: gpu.Nvml | None = None
    fake_nvml: Path | None = None  # --fake-gpu: the fake GPU's state file
    gateway: Gateway | None = None
    watermarks: tuple[float, float] | None = None
    watermark_problem: str | None = None
    gateways: list[Gateway] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # model -> multipart body

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.opts.cpu else torch.device("cuda", self.torch_index)

    def need_nvml(self) -> gpu.Nvml:
        if self.nvml is None:
            raise RuntimeError("NVML is not available (see the env step)")
        return self.nvml


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for the gateway and the demo trainer: ours without WANWU_*
    settings (the check sets its own; WANWU_WORKER_PYTHON is kept), the project on
    PYTHONPATH, unbuffered output."""
    kept = {k: v for k, v in environ.items() if not k.startswith("WANWU_") or k == "WANWU_WORKER_PYTHON"}
    return bundles_mod.worker_env(kept, ROOT) | {"PYTHONUNBUFFERED": "1"}


# -- env ------------------------------------------------------------------------------------


def env_step(ctx: Context) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("torch", "torchvision", "timm", "pillow", "nvidia-ml-py", "flask", "waitress", "docker", "requests"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),  # no CUDA context yet: the nvml step measures it
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,  # type: ignore[no-untyped-call]
        "packages": versions,
        "git_commit": _git_commit(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "worker_python": ctx.env.get("WANWU_WORKER_PYTHON", sys.executable),
    }
    if ctx.opts.cpu and ctx.opts.fake_gpu:
        ctx.fake_nvml = ctx.work / "fake-nvml.json"
        ctx.nvml = gpu.Nvml("0", gpu.fake_nvml(ctx.fake_nvml))
        ctx.env[gpu.FAKE_NVML_ENV] = str(ctx.fake_nvml)
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(gpu.FAKE_NVML_DIR), ctx.env["PYTHONPATH"]])
        out["gpu"] = ctx.nvml.info()
        return out
    if ctx.opts.cpu:
        out["gpu"] = None
        return out
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch here; use --cpu for a run without a GPU")
    ctx.nvml = gpu.Nvml(ctx.nvml_target)
    out["gpu"] = ctx.nvml.info()
    out["torch_device_count"] = torch.cuda.device_count()
    return out


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# -- bundles -------------------------------------------------------------------------------


def bundles_step(ctx: Context) -> dict[str, Any]:
    ctx.models_dir.mkdir(parents=True, exist_ok=True)
    ctx.progress(f"bundles: training {DEMO} (python -m wanwu_worker.demo.train) into {ctx.models_dir}")
    built = {DEMO: bundles_mod.write_demo_bundle(ctx.models_dir, ctx.env, quick=ctx.opts.cpu)}
    ctx.progress(f"bundles: writing ResNet-50 fp32 and fp16 (input {ctx.opts.resnet_input})")
    built.update(bundles_mod.write_resnet_bundles(ctx.models_dir, ctx.opts.resnet_input, ctx.opts.max_batch))
    from tests.images import demo_images

    ctx.images = {
        DEMO: multipart(demo_images()[DEMO_LABEL], "shape.png", "image/png"),
        FP32: multipart(bundles_mod.photo()),
        FP16: multipart(bundles_mod.photo()),
    }
    return {"models_dir": str(ctx.models_dir), "bundles": built, "photo_bytes": len(bundles_mod.photo())}


# -- in process ----------------------------------------------------------------------------


def nvml_step(ctx: Context) -> dict[str, Any]:
    return gpu.context_and_allocations(ctx.need_nvml(), ctx.device, ctx.opts.alloc_gib)


def throughput_step(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"device": str(ctx.device), "input_size": ctx.opts.resnet_input, "precisions": {}}
    if ctx.opts.cpu:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        out["threads"] = torch.get_num_threads()
    for name, precision in bundles_mod.RESNET.items():
        if ctx.opts.cpu and precision == "fp16":
            out["precisions"][precision] = {"skipped": "fp16 runs only on a GPU (the worker runs fp32 on the CPU)"}
            continue
        dtype = torch.float16 if precision == "fp16" else torch.float32
        ctx.progress(f"throughput: {precision} at batch {', '.join(map(str, ctx.opts.batches))}")
        out["precisions"][precision] = gpu.throughput(
            ctx.models_dir / name / "model.pt",
            ctx.device,
            dtype,
            ctx.opts.resnet_input,
            ctx.opts.batches,
            min_seconds=0.5 if ctx.opts.cpu else 2.0,
            min_iterations=3 if ctx.opts.cpu else 10,
        )
    if not ctx.opts.cpu:
        out["fp16_vs_fp32_outputs"] = gpu.agreement(
            ctx.models_dir / FP32 / "model.pt", ctx.device, ctx.opts.resnet_input
        )
    return out


# -- the gateway ----------------------------------------------------------------------------


def gateway_settings(ctx: Context, tag: str, **overrides: str) -> dict[str, str]:
    """WANWU_* settings of a gateway started by the check."""
    ctx.socket_root.mkdir(parents=True, exist_ok=True)
    settings = {
        "WANWU_BACKEND": "process",
        "WANWU_WORKER_USER": "gateway",  # the GPU side, not the privilege drop (tests/e2e covers that)
        "WANWU_MODELS_DIR": str(ctx.models_dir),
        "WANWU_SOCKET_DIR": str(ctx.socket_root / tag),
        "WANWU_POOL_ID": Gateway.new_pool_id(tag),
        "WANWU_DEFAULT_MODEL": DEMO,
        "WANWU_GPUS": "" if ctx.opts.cpu and not ctx.fake_nvml else ctx.nvml_target,
        "WANWU_MAX_WORKERS": "3",
        "WANWU_IDLE_TTL_S": "3600",  # nothing leaves by TTL during the check
        "WANWU_KEEPALIVE": "fixed",
        "WANWU_STEM_CELLS": "0",
        "WANWU_CACHE_ENABLED": "false",
        "WANWU_REAP_INTERVAL_S": "0.2",
        "WANWU_SPAWN_TIMEOUT_S": "300",
        "WANWU_REQUEST_TIMEOUT_S": "300",
        "WANWU_QUEUE_TIMEOUT_S": "300",
        "WANWU_LOG_LEVEL": "INFO",
        "WANWU_WORKER_MEMORY": "8g",  # a ResNet-50 worker on the CPU needs more than the default 2g
        "WANWU_WORKER_PYTHON": ctx.env.get("WANWU_WORKER_PYTHON", sys.executable),
    }
    if ctx.opts.cpu:
        settings["WANWU_DEVICE"] = "cpu"  # workers that inherit it stay off a GPU the host may have
    settings.update(overrides)
    return settings


def start_gateway(ctx: Context, tag: str, settings: Mapping[str, str]) -> tuple[Gateway, dict[str, Any]]:
    # A Docker engine is never touched: if anything asked for one, it would fail, not start containers.
    env = {**ctx.env, **settings, "DOCKER_HOST": "unix:///nonexistent/wanwu-gpu-check-uses-no-docker.sock"}
    if ctx.opts.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    gateway = Gateway(tag, env, ctx.work / f"gateway-{tag}.log", sys.executable)
    ctx.gateways.append(gateway)
    started = time.perf_counter()
    gateway.start()
    ctx.progress(
        f"gateway {tag}: pid {gateway.process.pid if gateway.process else '-'}, port {gateway.port}, log {gateway.log}"
    )
    ready = gateway.wait_ready(ctx.opts.ready_timeout_s)
    ready_s = round(time.perf_counter() - started, 3)
    if not ready["ready"]:
        ctx.progress(f"gateway {tag}: /readyz never said ready; going on ({ready['readyz']})")
    return gateway, {"ready_s": ready_s, **ready, "port": gateway.port, "settings": dict(settings)}


def gateway_step(ctx: Context) -> dict[str, Any]:
    """Start the gateway the serve and reap steps use: N=3, no stem cells; on a GPU with
    watermarks set just above what is in use now, so the reap test's ballast is small."""
    overrides: dict[str, str] = {}
    problem = None
    if ctx.nvml is not None:
        used, total, _ = ctx.nvml.memory()
        try:
            high, low = plan_watermarks(total / MIB, used / MIB)
        except ValueError as exc:  # serve with the default watermarks; the reap step says why it cannot run
            problem = ctx.watermark_problem = str(exc)
            ctx.progress(f"gateway: default watermarks: {problem}")
        else:
            ctx.watermarks = (high, low)
            overrides = {"WANWU_GPU_HIGH_WATERMARK": repr(high), "WANWU_GPU_LOW_WATERMARK": repr(low)}
    settings = gateway_settings(ctx, "a", **overrides)
    ctx.gateway, result = start_gateway(ctx, "a", settings)
    result["watermarks"] = None if ctx.watermarks is None else {"high": ctx.watermarks[0], "low": ctx.watermarks[1]}
    result["watermark_problem"] = problem
    return result


def _need_gateway(ctx: Context) -> Gateway:
    if ctx.gateway is None:
        raise RuntimeError("the gateway did not start (see the gateway step)")
    return ctx.gateway


def _pool(gateway: Gateway) -> dict[str, Any]:
    status, pool = gateway.http.get_json("/v1/pool")
    if status != 200 or not isinstance(pool, dict):
        raise RuntimeError(f"GET /v1/pool answered {status}: {pool}")
    return pool


def _predict(gateway: Gateway, ctx: Context, model: str) -> tuple[dict[str, Any], float]:
    status, answer, ms = gateway.http.predict(model, ctx.images[model])
    if status != 200:
        raise RuntimeError(f"POST /v1/models/{model}/predict answered {status}: {answer}")
    return answer, ms


def _live_worker(pool: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    workers = [w for w in pool.get("workers", []) if w.get("model") == model and w.get("state") in ("idle", "busy")]
    return max(workers, key=lambda w: w.get("age_s") or 0, default=None) if workers else None


def _health(gateway: Gateway, worker_id: str) -> dict[str, Any]:
    path = find_worker_socket(gateway.socket_dir, worker_id)
    if path is None:
        return {"error": f"no socket of worker {worker_id} under {gateway.socket_dir}"}
    try:
        return worker_health(path) | {"socket": str(path)}
    except OSError as exc:
        return {"error": f"{path}: {type(exc).__name__}: {exc}"}


def serve_step(ctx: Context) -> dict[str, Any]:
    """Each bundle through the gateway: the cold start, then warm requests one at a time."""
    gateway = _need_gateway(ctx)
    out: dict[str, Any] = {"requests": ctx.opts.requests, "models": {}}
    for model in MODELS:
        try:
            out["models"][model] = _serve_one(ctx, gateway, model)
        except StepFailed as exc:  # some warm requests failed: keep what was measured
            out["models"][model] = exc.result | {"error": error_info(exc)}
            ctx.progress(f"serve: {model} FAILED: {exc}")
        except Exception as exc:  # noqa: BLE001 - the other models still run
            out["models"][model] = {"error": error_info(exc)}
            ctx.progress(f"serve: {model} FAILED: {type(exc).__name__}: {exc}")
    gateway.track()
    try:
        pool = _pool(gateway)
        out["pool"] = {k: pool.get(k) for k in ("workers", "gpus", "counters", "reaps", "capacity")}
    except Exception as exc:  # noqa: BLE001
        out["pool"] = {"error": error_info(exc)}
    if ctx.nvml is not None:
        out["nvml_processes_mib"] = {
            str(pid): None if used is None else round(used / MIB, 1) for pid, used in ctx.nvml.processes().items()
        }
        out["nvml_used_mib"] = ctx.nvml.used_mib()
    failed = [m for m, r in out["models"].items() if "error" in r]
    if failed:
        raise StepFailed(f"serving failed for {', '.join(failed)}", out)
    return out


def _serve_one(ctx: Context, gateway: Gateway, model: str) -> dict[str, Any]:
    answer, cold_ms = _predict(gateway, ctx, model)
    cold = {
        "client_ms": cold_ms,
        "cold_start": answer.get("cold_start"),
        "start": answer.get("start"),
        "timing_ms": answer.get("timing_ms"),
        "top1": (answer.get("predictions") or [None])[0],
    }
    ctx.progress(f"serve: {model} cold start {cold_ms:.0f} ms ({answer.get('start')}): {answer.get('timing_ms')}")
    worker = _live_worker(_pool(gateway), model) or {}
    gateway.track()
    health: dict[str, Any] = _health(gateway, worker["id"]) if worker else {"error": "the pool shows no worker"}
    client: list[float] = []
    total: list[float] = []
    worker_ms: list[float] = []  # what the worker measured: decode, preprocess, inference
    queue: list[float] = []
    errors: list[str] = []
    not_warm = 0
    for _ in range(ctx.opts.requests):
        status, reply, ms = gateway.http.predict(model, ctx.images[model])
        if status != 200:
            errors.append(f"{status}: {str(reply)[:300]}")
            continue
        timing = reply.get("timing_ms") or {}
        client.append(ms)
        total.append(float(timing.get("total", 0.0)))
        worker_ms.append(float(timing.get("worker", 0.0)))
        queue.append(float(timing.get("queue", 0.0)))
        not_warm += bool(reply.get("cold_start")) or reply.get("start") not in (None, "warm")
    warm: dict[str, Any] = {
        "client_ms": latency_stats(client),
        "gateway_total_ms": latency_stats(total),
        "worker_ms": latency_stats(worker_ms),
        "queue_ms": latency_stats(queue),
        "errors": len(errors),
        "first_errors": errors[:3],
        "not_warm": not_warm,
    }
    ctx.progress(
        f"serve: {model} warm over {len(client)} requests: p50 {warm['client_ms']['p50']} ms, "
        f"p99 {warm['client_ms']['p99']} ms (the worker's own p50 {warm['worker_ms']['p50']} ms)"
    )
    after = _health(gateway, worker["id"]) if worker else health
    pid: int | None = after["pid"] if isinstance(after.get("pid"), int) else None
    memory = {
        "estimate_mb": load_bundle(ctx.models_dir / model).gpu_memory_mb,
        "pool_gpu_mb": worker.get("gpu_mb"),
        "health_gpu_memory_mb": after.get("gpu_memory_mb"),
        "nvml_process_mib": ctx.nvml.process_mib(pid) if ctx.nvml is not None and pid else None,
    }
    result: dict[str, Any] = {
        "cold": cold,
        "warm": warm,
        "worker": worker,
        "health": health,
        "device": health.get("device", worker.get("device")),
        "memory": memory,
    }
    if model == DEMO:
        top = cold["top1"] or {}
        result["demo_label_ok"] = top.get("label") == DEMO_LABEL
    if errors:
        raise StepFailed(f"{len(errors)} of {ctx.opts.requests} warm requests failed: {errors[0]}", result)
    if model == DEMO and not result["demo_label_ok"] and not ctx.opts.cpu:  # --cpu trains a quick, weak demo
        raise StepFailed(f"the demo model called a {DEMO_LABEL} picture {cold['top1']}", result)
    return result


# -- GPU-memory pressure ------------------------------------------------------------------------


def reap_step(ctx: Context) -> dict[str, Any]:
    """Three idle workers with a known last-use order; a ballast in this process pushes
    the GPU over the high watermark; the pool must reap them least recently used first."""
    gateway, nvml = _need_gateway(ctx), ctx.need_nvml()
    if ctx.watermarks is None:
        raise RuntimeError(f"no watermarks for the test: {ctx.watermark_problem or 'see the gateway step'}")
    high, low = ctx.watermarks
    for model in MODELS:  # start (or reuse) one worker of each, in start order
        _predict(gateway, ctx, model)
    for model in USE_ORDER:
        time.sleep(0.3)
        _predict(gateway, ctx, model)
    time.sleep(0.3)
    gateway.track()
    pool = _pool(gateway)
    workers = {m: _live_worker(pool, m) for m in USE_ORDER}
    missing = [m for m, w in workers.items() if w is None or w.get("state") != "idle"]
    if missing or len(pool.get("workers", [])) != len(MODELS):
        raise RuntimeError(f"expected one idle worker per model and nothing else; the pool has {pool.get('workers')}")
    expected = [workers[m]["id"] for m in USE_ORDER]  # type: ignore[index]
    model_of = {workers[m]["id"]: m for m in USE_ORDER}  # type: ignore[index]
    by_idle = sorted(expected, key=lambda w: -next(x["idle_s"] for x in pool["workers"] if x["id"] == w))
    used, total, free = nvml.memory()
    size = ballast_mb(total / MIB, used / MIB, high, margin_mb=512, free_mb=free / MIB)
    out: dict[str, Any] = {
        "watermarks": {
            "high": high,
            "low": low,
            "high_mib": round(high * total / MIB),
            "low_mib": round(low * total / MIB),
        },
        "expected_order": [{"worker": w, "model": model_of[w]} for w in expected],
        "pool_idle_order_agrees": by_idle == expected,
        "idle_workers": pool["workers"],
        "reaps_before": pool.get("reaps"),
        "used_before_mib": round(used / MIB, 1),
        "ballast_mb": size,
    }
    log_start = len(gateway.log_text())
    ctx.progress(
        f"reap: ballast {size} MiB over {out['used_before_mib']} MiB used "
        f"(high watermark {out['watermarks']['high_mib']} MiB)"
    )
    seen_reaped: dict[str, float] = {}
    gone: dict[str, float] = {}
    pool_saw: float | None = None
    held = gpu.fake_ballast(ctx.fake_nvml, size) if ctx.fake_nvml else gpu.ballast(ctx.device, size)
    with held:
        t0 = time.perf_counter()
        out["used_with_ballast_mib"] = nvml.used_mib()
        deadline = t0 + ctx.opts.reap_timeout_s
        while time.perf_counter() < deadline and len(gone) < len(expected):
            now_ms = round((time.perf_counter() - t0) * 1000, 1)
            snapshot = _pool(gateway)
            states = {w["id"]: w.get("state") for w in snapshot.get("workers", [])}
            for w in expected:
                if states.get(w) in (None, "stopping"):
                    seen_reaped.setdefault(w, now_ms)
                if w not in states:
                    gone.setdefault(w, now_ms)
            if pool_saw is None and any(
                g.get("used_mb", 0) > high * g.get("total_mb", 0) for g in snapshot.get("gpus", [])
            ):
                pool_saw = now_ms
            time.sleep(0.05)
        out["reaps_after"] = _pool(gateway).get("reaps")
    out["used_after_free_mib"] = nvml.used_mib()
    log_order = [r["worker"] for r in parse_reaps(gateway.log_text()[log_start:], "gpu_pressure")]
    groups = group_by_time(sorted(seen_reaped.items(), key=lambda item: item[1]))
    out.update(
        {
            "pool_saw_pressure_ms": pool_saw,
            "first_reap_ms": min(seen_reaped.values(), default=None),
            "all_gone_ms": max(gone.values()) if len(gone) == len(expected) else None,
            "reaped_ms": seen_reaped,
            "gone_ms": gone,
            "log_order": [{"worker": w, "model": model_of.get(w)} for w in log_order],
            "poll_groups": groups,
            "reaped_models": [model_of.get(w, w) for w in (log_order or [w for g in groups for w in g])],
            "lru_log": check_lru(expected, [[w] for w in log_order]),
            "lru_poll": check_lru(expected, groups),
            "metrics": [
                line for line in gateway.http.request("GET", "/metrics")[1].decode().splitlines() if "reap" in line
            ],
        }
    )
    # The log says the order the pool decided; polls can only group reaps made in one tick.
    out["lru"] = out["lru_log"] if log_order else out["lru_poll"]
    ctx.progress(
        f"reap: reaped {out['reaped_models']}, first after {out['first_reap_ms']} ms; LRU ok: {out['lru']['ok']}"
    )
    if not out["lru"]["ok"]:
        raise StepFailed("; ".join(out["lru"]["problems"]), out)
    return out


def shutdown_step(ctx: Context) -> dict[str, Any]:
    gateway = _need_gateway(ctx)
    ctx.gateway = None
    result = gateway.stop()
    if result["leftover"] or result["killed_gateway"]:
        raise StepFailed(f"the gateway left processes behind or had to be killed: {result}", result)
    return result


# -- stem cells ---------------------------------------------------------------------------------


def stem_step(ctx: Context) -> dict[str, Any]:
    """Cold starts through stem cells: a second gateway with one stem cell and room for
    every model; each model's first request waits until a stem cell is ready."""
    settings = gateway_settings(ctx, "s", WANWU_STEM_CELLS="1", WANWU_MAX_WORKERS=str(len(MODELS) + 1))
    gateway, started = start_gateway(ctx, "s", settings)
    out: dict[str, Any] = {"gateway": started, "models": {}}
    try:
        for model in MODELS:
            try:
                waited = _wait_for_stem(gateway, 180)
                answer, ms = _predict(gateway, ctx, model)
                out["models"][model] = {
                    "stem_wait_s": waited,
                    "client_ms": ms,
                    "start": answer.get("start"),
                    "cold_start": answer.get("cold_start"),
                    "timing_ms": answer.get("timing_ms"),
                }
                ctx.progress(f"stem: {model} {answer.get('start')} start {ms:.0f} ms: {answer.get('timing_ms')}")
            except Exception as exc:  # noqa: BLE001 - the other models still run
                out["models"][model] = {"error": error_info(exc)}
            gateway.track()
    finally:
        out["shutdown"] = gateway.stop()
    failed = [m for m, r in out["models"].items() if "error" in r]
    if failed or out["shutdown"]["leftover"]:
        raise StepFailed(f"stem-cell starts failed for {failed or '-'}; leftover {out['shutdown']['leftover']}", out)
    return out


def _wait_for_stem(gateway: Gateway, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if any(w.get("model") == "(stem)" and w.get("state") == "idle" for w in _pool(gateway).get("workers", [])):
            return round(time.perf_counter() - started, 3)
        time.sleep(0.1)
    raise TimeoutError(f"no idle stem cell in {timeout:g} s")
