"""wanwu benchmarks: real containers, the general model, a table on stdout and a JSON file.

    python -m tests.bench [--quick] [--out bench-results]      (make bench)

Sections 1-5 serve the default model (`general`, EfficientNet-Lite0 on onnxruntime) and
real photos (tests/photos): the figures an operator chooses N, TTL and the rest from.

1. Warm path: one photo at a time to a warm worker through the gateway, the worker's
   socket called directly, and the same model called in this process with the worker's
   threads, side by side.
2. Cold start: requests that each find no warm worker, broken into container create +
   start, worker ready, first answer and what the scheduler adds; stem-cell starts (load,
   warm-up, first answer); against `docker run --rm IMAGE true` and a one-shot `docker
   run` of the image predicting one photo. Memory of a waiting stem cell and of one that
   loaded the model.
3. Throughput at N = 1 and 2 with 4N concurrent clients, against in-process inference;
   images/s through `predict:batch` for batches of 1, 8 and 32; worker threads 1 and 2.
4. Footprint: gateway RSS idle and under load, idle CPU, image sizes, worker memory.
5. Backfill: `wanwu backfill` over a directory of photos at N = 1 and 2, against
   sequential `wanwu predict` on the same pool and in-process batched inference on the
   same cores; interactive latency alone and while a backfill runs; 8 concurrent
   single-image clients with dynamic batching on and off.
6. The HTTP front: the warm path's added latency (client less worker) behind waitress
   and behind the gunicorn front it replaced, the two gateways asked in turn.
7. Backends: cold starts, stem starts and the warm path on Docker and on local processes.
8. Formats: the demo network as TorchScript, a torch.export program and ONNX (each made
   with `wanwu bundle create`): the worker's own check (load, first request, peak
   memory), cold start and warm latency through a pool; the embed endpoint against
   predict through the gateway; the worker image's size.
9. Variants: the general model at 160 and 128 px and as INT8 against fp32 at 224, in
   process: speed, memory, top-1 agreement over crops and scales of the test photos
   (tests/bench/variants.py).

Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker

from scheduler.assembly import build_backend
from scheduler.backends.docker_image import export_builtin_model
from scheduler.clock import MonotonicClock
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
from scheduler.worker_client import WorkerClient
from tests.bench import variants
from tests.dockerutil import IMAGE, engine
from tests.gatewayproc import Gateway, running_gateway
from tests.images import demo_images
from tests.photos import as_format, photo, photo_tree

MODEL = "general"  # sections 1-5
DEMO = "demo-shapes"  # backends and swarm: what they compare is the transport, not the model
WORKER_THREADS = Settings().worker_threads
BOUNDARY = "wanwu-bench-boundary"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 3)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": pct(values, 50),
        "p99": pct(values, 99),
        "mean": round(statistics.fmean(values), 3),
        "n": len(values),
    }


def multipart(image: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


class Client:
    """A keep-alive HTTP client with a prebuilt body: as little client time as Python allows."""

    def __init__(self, port: int, image: bytes, model: str = MODEL) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.body = multipart(image)
        self.headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        self.route = f"/v1/models/{model}/predict"

    def predict(self, route: str | None = None) -> tuple[float, dict[str, Any], int]:
        started = time.perf_counter()
        self.conn.request("POST", route or self.route, body=self.body, headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        return elapsed, json.loads(raw), response.status


def bench_image() -> bytes:
    """A photo as an app uploads one: the cat (451x300), JPEG at quality 90."""
    return as_format(photo("chelsea.png"), "JPEG", 90)


def demo_image() -> bytes:
    return demo_images(seed=5150, fmt="JPEG")["蓝色方形"]


def in_process_predictor(models_dir: Path, model: str = MODEL, threads: int = WORKER_THREADS) -> Any:
    """The model in this process, with a worker's intra-op threads (``threads``)."""
    from wanwu_worker.bundle import load_bundle
    from wanwu_worker.predictor import Predictor

    return Predictor(load_bundle(models_dir / model), device="cpu", threads=threads)


# -- 1. warm path --------------------------------------------------------------------


def warm_path(gw: Gateway, requests: int, model: str = MODEL, image: bytes | None = None) -> dict[str, Any]:
    image = image or bench_image()
    client = Client(gw.port, image, model)
    for _ in range(30):
        client.predict()
    e2e, worker, gateway_total = [], [], []
    for _ in range(requests):
        elapsed, body, status = client.predict()
        assert status == 200 and not body["cold_start"], body
        e2e.append(elapsed)
        worker.append(body["timing_ms"]["worker"])
        gateway_total.append(body["timing_ms"]["total"])
    overhead = [a - b for a, b in zip(e2e, worker, strict=True)]

    pool = json.loads(_get(gw.port, "/v1/pool"))
    (worker_id,) = [w["id"] for w in pool["workers"]]
    socket = gw.socket_dir / gw.pool_id / worker_id / "worker.sock"
    direct = WorkerClient(str(socket), worker_id, timeout=30)
    for _ in range(30):
        direct.predict(image)
    socket_rt, socket_worker = [], []
    for _ in range(requests):
        answer = direct.predict(image)
        socket_rt.append(answer.round_trip_ms)
        socket_worker.append(answer.timing_ms["total"])
    direct.close()

    predictor = in_process_predictor(gw.models_dir, model)
    for _ in range(30):
        predictor.predict(image)
    in_process = []
    for _ in range(requests):
        started = time.perf_counter()
        predictor.predict(image)
        in_process.append((time.perf_counter() - started) * 1000)
    socket_overhead = [a - b for a, b in zip(socket_rt, socket_worker, strict=True)]
    gateway_added = [a - b for a, b in zip(e2e, worker, strict=True)]
    return {
        "requests": requests,
        "e2e_http_ms": summary(e2e),
        "gateway_measured_total_ms": summary(gateway_total),
        "worker_own_ms": summary(worker),
        "e2e_minus_worker_ms": summary(overhead),
        "direct_socket_round_trip_ms": summary(socket_rt),
        "direct_socket_minus_worker_ms": summary(socket_overhead),
        "in_process_ms": summary(in_process),
        "in_process_threads": WORKER_THREADS,
        "ratio_e2e_to_in_process": {
            "p50": round(pct(e2e, 50) / pct(in_process, 50), 3),
            "p99": round(pct(e2e, 99) / pct(in_process, 99), 3),
        },
        "gateway_and_scheduler_added_ms": {
            "p50": round(pct(gateway_added, 50) - pct(socket_overhead, 50), 3),
            "p99": round(pct(gateway_added, 99) - pct(socket_overhead, 99), 3),
            "how": "p(e2e - worker) - p(direct socket round trip - worker): what the gateway, the scheduler "
            "and the client's HTTP hop add over calling the worker's socket directly",
        },
    }


def front_section(workdir: Path, client: docker.DockerClient, requests: int) -> dict[str, Any]:
    """The HTTP front's cost on the warm path: the same app and pool behind waitress
    (``wanwu serve``) and behind the gunicorn gthread front it replaced, both up at once
    and asked in turn, so both see the same machine. Added latency is the client's time
    less the worker's own."""
    quiet = {"cache_enabled": "false", "idle_ttl_s": "600", "log_level": "WARNING", "stem_cells": "0"}
    quiet["default_model"] = DEMO  # what it measures is the front, not the model
    image = demo_image()
    with (
        running_gateway(workdir / "front-waitress", client, max_workers="1", **quiet) as waitress,
        running_gateway(workdir / "front-gunicorn", client, server="gunicorn", max_workers="1", **quiet) as gunicorn,
    ):
        clients = {"waitress": Client(waitress.port, image, DEMO), "gunicorn": Client(gunicorn.port, image, DEMO)}
        added: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(30):
            for c in clients.values():
                c.predict()
        for _ in range(requests):
            for name, c in clients.items():
                elapsed, body, status = c.predict()
                assert status == 200 and not body["cold_start"], body
                added[name].append(elapsed - body["timing_ms"]["worker"])
    result: dict[str, Any] = {"requests": requests, **{f"{n}_added_ms": summary(v) for n, v in added.items()}}
    result["waitress_minus_gunicorn_ms"] = {
        q: round(pct(added["waitress"], p) - pct(added["gunicorn"], p), 3) for q, p in (("p50", 50), ("p99", 99))
    }
    return result


def backends_section(workdir: Path, client: docker.DockerClient, warm_n: int, cold_n: int) -> dict[str, Any]:
    """The same cold starts and warm path on the Docker backend and the process backend,
    one after the other in one run."""
    quiet = {"cache_enabled": "false", "idle_ttl_s": "600", "log_level": "WARNING", "queue_timeout_s": "60"}
    out: dict[str, Any] = {"cold_requests": cold_n, "warm_requests": warm_n}
    for kind in ("docker", "process"):
        # Process workers as the gateway's user: this machine's interpreter lives under /root.
        user = {"worker_user": "gateway"} if kind == "process" else {}
        print(f"backend {kind}: cold starts ...", file=sys.stderr)
        with bench_pool(
            workdir / f"bk-{kind}", f"bk{kind}", DEMO, backend=kind, max_workers=1, stem_cells=0, **user
        ) as pool:
            rows = cold_rows(pool, cold_n, DEMO, demo_image())
        with bench_pool(
            workdir / f"bs-{kind}", f"bs{kind}", DEMO, backend=kind, max_workers=1, stem_cells=1, **user
        ) as pool:
            stems = [total for total, _ in stem_starts(pool, cold_n, DEMO, demo_image())]
        print(f"backend {kind}: warm path ...", file=sys.stderr)
        export_builtin_model(IMAGE, DEMO, workdir / f"bw-{kind}" / "models")
        with running_gateway(
            workdir / f"bw-{kind}", client, backend=kind, max_workers="1", default_model=DEMO, **quiet, **user
        ) as gw:
            warm = warm_path(gw, warm_n, DEMO, demo_image())
        out[kind] = {
            "cold_start_ms": {key: summary([r[key] for r in rows]) for key in rows[0]},
            "stem_start_ms": summary(stems),
            "warm_e2e_http_ms": warm["e2e_http_ms"],
            "warm_direct_socket_round_trip_ms": warm["direct_socket_round_trip_ms"],
            "warm_worker_own_ms": warm["worker_own_ms"],
        }
    for key, path in (
        ("cold", ("cold_start_ms", "total")),
        ("stem", ("stem_start_ms",)),
        ("warm_e2e", ("warm_e2e_http_ms",)),
    ):
        docker_p50, process_p50 = (_dig(out[kind], path)["p50"] for kind in ("docker", "process"))
        out[f"ratio_process_to_docker_{key}_p50"] = round(process_p50 / docker_p50, 3)
    return out


def gateway_cold_and_warm(port: int, models: Path, cold_n: int, warm_n: int, tag: str) -> dict[str, Any]:
    """Through a gateway of one worker slot: ``cold_n`` cold starts (each request names
    another copy of the demo bundle, so the idle worker is evicted and a new one
    started), then ``warm_n`` warm requests."""
    for index in range(cold_n):
        copy = models / f"{tag}{index}"
        shutil.copytree(models / DEMO, copy)
        meta = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps({**meta, "name": copy.name}))
    time.sleep(5.5)  # the catalog rescans for unknown names at most every 5 s
    client = Client(port, demo_image(), DEMO)
    cold: dict[str, list[float]] = {"e2e": [], "gateway_total": [], "create_start": [], "ready": []}
    for index in range(cold_n):
        elapsed, body, status = client.predict(f"/v1/models/{tag}{index}/predict")
        assert status == 200 and body["cold_start"], body
        t = body["timing_ms"]
        for key, value in (
            ("e2e", elapsed),
            ("gateway_total", t["total"]),
            ("create_start", t["spawn_create"]),
            ("ready", t["spawn_ready"]),
        ):
            cold[key].append(value)
    for _ in range(30):
        client.predict()
    warm: dict[str, list[float]] = {"e2e": [], "gateway_total": [], "worker": []}
    for _ in range(warm_n):
        elapsed, body, status = client.predict()
        assert status == 200 and not body["cold_start"], body
        warm["e2e"].append(elapsed)
        warm["gateway_total"].append(body["timing_ms"]["total"])
        warm["worker"].append(body["timing_ms"]["worker"])
    return {
        "cold_start_ms": {key: summary(values) for key, values in cold.items()},
        "warm_ms": {key: summary(values) for key, values in warm.items()},
    }


def swarm_section(workdir: Path, client: docker.DockerClient, warm_n: int, cold_n: int) -> dict[str, Any]:
    """Cold starts and the warm path through the swarm backend (the stack on a
    three-node test swarm: gateway on the manager, workers on another node, over the
    overlay network with the worker secret) and through the local Docker backend, one
    after the other in one run. The swarm's client goes through the test's relay into
    the cluster's namespace; ``gateway_total`` (measured by the gateway) leaves both
    clients' hops out."""
    from tests import swarmnet
    from tests.swarmstack import running_swarm

    problem = swarmnet.unsupported()
    if problem:
        print(f"swarm: SKIPPED, this machine cannot run a test swarm: {problem}", file=sys.stderr)
        return {"skipped": problem}
    settings = {
        "max_workers": "1",
        "stem_cells": "0",
        "idle_ttl_s": "600",
        "cache_enabled": "false",
        "default_model": DEMO,  # copied out of the image at the gateway's start
    }
    out: dict[str, Any] = {"cold_requests": cold_n, "warm_requests": warm_n}
    print("swarm: building a three-node swarm ...", file=sys.stderr)
    timings: dict[str, float] = {}
    with running_swarm(timings) as swarm:
        swarm.deploy(gpus="", swarm_constraints="node.role==worker", log_level="WARNING", **settings)
        port = int(swarm.url.rsplit(":", 1)[1])
        print("swarm: cold starts and warm path ...", file=sys.stderr)
        out["swarm"] = gateway_cold_and_warm(port, swarm.models, cold_n, warm_n, "swc")
        out["swarm"]["worker_node"] = sorted({w["node"] for w in swarm.workers().values()})
    out["fixture_s"] = timings
    print("swarm: the same on the local Docker backend ...", file=sys.stderr)
    local = {**settings, "log_level": "WARNING", "queue_timeout_s": "60"}
    with running_gateway(workdir / "sw-local", client, **local) as gw:
        out["docker"] = gateway_cold_and_warm(gw.port, gw.models_dir, cold_n, warm_n, "swc")
    for key, path in (
        ("cold_gateway_total", ("cold_start_ms", "gateway_total")),
        ("warm_gateway_total", ("warm_ms", "gateway_total")),
        ("warm_e2e", ("warm_ms", "e2e")),
    ):
        docker_p50, swarm_p50 = (_dig(out[kind], path)["p50"] for kind in ("docker", "swarm"))
        out[f"ratio_swarm_to_docker_{key}_p50"] = round(swarm_p50 / docker_p50, 3)
    return out


FORMAT_BUNDLES = {"torchscript": "demo-ts", "export": "demo-export", "onnx": "demo-onnx"}


def formats_section(workdir: Path, client: docker.DockerClient, warm_n: int, cold_n: int) -> dict[str, Any]:
    """The demo network in each format, made and checked by ``wanwu bundle create`` in
    the worker image; then cold starts and warm requests through one pool, format after
    format; then embed against predict through a gateway; and the image's size."""
    from wanwu_worker.demo.export import export_onnx, export_program, rebuild

    from gateway.bundles import Spec, create

    models = workdir / "formats"
    files = workdir / "format-files"
    demo = export_builtin_model(IMAGE, DEMO, files)
    net, input_size = rebuild(demo)
    made = {
        "torchscript": demo / "model.pt",
        "export": files / "demo.pt2",
        "onnx": files / "demo.onnx",
    }
    export_program(net, input_size, made["export"])
    export_onnx(net, input_size, made["onnx"])
    sockets = Path(tempfile.mkdtemp(prefix="wbf-", dir="/tmp"))
    config = Settings(
        models_dir=models, socket_dir=sockets, pool_id="benchfmt", worker_image=IMAGE, max_workers=1, stem_cells=0
    )
    backend = build_backend(config)
    out: dict[str, Any] = {"cold_requests": cold_n, "warm_requests": warm_n}
    try:
        for fmt, name in FORMAT_BUNDLES.items():
            print(f"format {fmt}: bundle create ...", file=sys.stderr)
            preprocessing = {"input_size": 64, "resize": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
            spec = Spec(name, made[fmt], demo / "labels.txt", **preprocessing)  # type: ignore[arg-type]
            started = time.perf_counter()
            report = create(spec, models / name, backend, None, progress=lambda _: None)
            out[fmt] = {
                "file_kb": round(made[fmt].stat().st_size / 1024, 1),
                "bundle_create_s": round(time.perf_counter() - started, 2),
                "check": {key: report[key] for key in ("load_ms", "warmup_ms", "first_ms", "peak_rss_mb")},
            }
    finally:
        backend.close()
    pool = WarmPool(build_backend(config), ModelCatalog(models), config, clock=MonotonicClock())
    pool.start(background=False)
    try:
        image = demo_image()
        for fmt, name in FORMAT_BUNDLES.items():
            print(f"format {fmt}: cold starts and warm requests ...", file=sys.stderr)
            rows = cold_rows(pool, cold_n, name, image)
            pool.predict(name, image)  # a warm worker for the warm requests
            for _ in range(30):
                pool.predict(name, image)
            warm, worker = [], []
            for _ in range(warm_n):
                started = time.perf_counter()
                answer = pool.predict(name, image)
                warm.append((time.perf_counter() - started) * 1000)
                worker.append(answer.timing_ms["worker"])
            out[fmt]["cold_start_ms"] = summary([r["total"] for r in rows])
            out[fmt]["cold_ready_ms"] = summary([r["ready"] for r in rows])
            out[fmt]["first_request_ms"] = summary([r["first_inference"] for r in rows])
            out[fmt]["warm_pool_ms"] = summary(warm)
            out[fmt]["warm_worker_own_ms"] = summary(worker)
            pool.reap(now=pool.clock.now() + 10**6)
            while pool.snapshot().workers:
                time.sleep(0.01)
    finally:
        pool.shutdown(grace_s=1)
        shutil.rmtree(sockets, ignore_errors=True)
    base = out["torchscript"]
    for fmt in ("export", "onnx"):
        for key in ("cold_start_ms", "warm_pool_ms"):
            out[f"ratio_{fmt}_to_torchscript_{key}_p50"] = round(out[fmt][key]["p50"] / base[key]["p50"], 3)
    print("embed against predict through the gateway ...", file=sys.stderr)
    quiet = {"cache_enabled": "false", "idle_ttl_s": "600", "log_level": "WARNING", "queue_timeout_s": "60"}
    with running_gateway(workdir / "embed", client, max_workers="2", default_model=DEMO, **quiet) as gw:
        http = Client(gw.port, demo_image(), DEMO)
        timings: dict[str, list[float]] = {"predict": [], "embed": []}
        routes = {"predict": f"/v1/models/{DEMO}/predict", "embed": "/v1/models/demo-shapes-embed/embed"}
        for _ in range(30):
            for route in routes.values():
                http.predict(route)
        for _ in range(warm_n):
            for kind, route in routes.items():  # interleaved: both see the same machine
                elapsed, body, status = http.predict(route)
                assert status == 200 and not body["cold_start"], body
                timings[kind].append(elapsed)
    out["embed_http_ms"] = summary(timings["embed"])
    out["predict_http_ms"] = summary(timings["predict"])
    out["ratio_embed_to_predict_http_p50"] = round(out["embed_http_ms"]["p50"] / out["predict_http_ms"]["p50"], 3)
    out["image_gb"] = round(client.images.get(IMAGE).attrs["Size"] / 1e9, 3)
    return out


GENERAL_FORMATS = ("onnx", "torchscript", "export")


def _container_memory_mb(client: docker.DockerClient, pool: WarmPool, model: str) -> float:
    """Memory of the pool's one worker of ``model`` (a stem cell that loaded it keeps
    its container, so it is found by worker id, not by model label)."""
    (worker,) = [w.id for w in pool.snapshot().workers if w.model == model]
    (row,) = client.api.containers(filters={"label": f"wanwu.worker={worker}"})
    return _memory_mb(client.api.stats(row["Id"], stream=False))


def _memory_mb(stats: dict[str, Any]) -> float:
    """A container's memory as `docker stats` counts it: usage less inactive page cache
    (the file pages the kernel would drop first), in MB."""
    memory = stats.get("memory_stats", {})
    extra = memory.get("stats", {})
    inactive = extra.get("inactive_file", extra.get("total_inactive_file", 0))
    return round((memory.get("usage", 0) - inactive) / 2**20, 1)


def general_formats_section(workdir: Path, client: docker.DockerClient, warm_n: int, cold_n: int) -> dict[str, Any]:
    """The general model (EfficientNet-Lite0) in each format, each made by ``wanwu bundle
    create --pretrained`` in the worker image: stem-cell cold starts (load, warm-up,
    first answer), warm requests of a real photo through one pool, and the loaded
    worker's memory, format after format on the same pool. How the default format was
    chosen: lowest stem-cell cold start, then warm p50, then memory."""
    from gateway.bundles import create_pretrained
    from tests.photos import photo

    models = workdir / "general-formats"
    models.mkdir(parents=True)
    models.chmod(0o755)
    sockets = Path(tempfile.mkdtemp(prefix="wbg-", dir="/tmp"))
    config = Settings(
        models_dir=models, socket_dir=sockets, pool_id="benchgen", worker_image=IMAGE, max_workers=2, stem_cells=1
    )
    out: dict[str, Any] = {"stem_starts": cold_n, "warm_requests": warm_n, "photo": "chelsea.png"}
    backend = build_backend(config)
    try:
        for fmt in GENERAL_FORMATS:
            print(f"general model as {fmt}: bundle create --pretrained ...", file=sys.stderr)
            started = time.perf_counter()
            report = create_pretrained(f"general-{fmt}", models / f"general-{fmt}", backend, None, fmt=fmt)
            out[fmt] = {
                "bundle_create_s": round(time.perf_counter() - started, 1),
                "model_file_mb": round(
                    sum(p.stat().st_size for p in (models / f"general-{fmt}").glob("model.*")) / 2**20, 1
                ),
                "check": {key: report[key] for key in ("load_ms", "warmup_ms", "first_ms", "peak_rss_mb")},
            }
    finally:
        backend.close()
    image = photo("chelsea.png")
    pool = WarmPool(build_backend(config), ModelCatalog(models), config, clock=MonotonicClock())
    pool.start(background=False)
    try:
        for fmt in GENERAL_FORMATS:
            name = f"general-{fmt}"
            print(f"general model as {fmt}: stem-cell starts and warm requests ...", file=sys.stderr)
            rows = [
                {"total": total, "load": t["spawn_load"], "warmup": t["spawn_warmup"], "first": t["round_trip"]}
                for total, t in stem_starts(pool, cold_n, name, image)
            ]
            until(lambda: stem_ready(pool), "ready stem cell")
            for _ in range(20):
                pool.predict(name, image)
            warm = []
            for _ in range(warm_n):
                started = time.perf_counter()
                pool.predict(name, image)
                warm.append((time.perf_counter() - started) * 1000)
            out[fmt]["stem_start_ms"] = {key: summary([r[key] for r in rows]) for key in rows[0]}
            out[fmt]["warm_pool_ms"] = summary(warm)
            out[fmt]["worker_memory_mb"] = _container_memory_mb(client, pool, name)
            pool.reap(now=pool.clock.now() + 10**6)
            until(lambda n=name: all(w.model != n for w in pool.snapshot().workers), "stopped worker")  # type: ignore[misc]
    finally:
        pool.shutdown(grace_s=1)
        shutil.rmtree(sockets, ignore_errors=True)
    for fmt in GENERAL_FORMATS[1:]:
        for key, path in (("stem_start", ("stem_start_ms", "total")), ("warm", ("warm_pool_ms",))):
            out[f"ratio_{fmt}_to_onnx_{key}_p50"] = round(
                _dig(out[fmt], path)["p50"] / _dig(out["onnx"], path)["p50"], 2
            )
    return out


def _dig(values: dict[str, Any], path: tuple[str, ...]) -> dict[str, float]:
    for key in path:
        values = values[key]
    return values


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


# -- 2. cold start ---------------------------------------------------------------------


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return (time.perf_counter() - started) * 1000


@contextmanager
def bench_pool(models: Path, pool_id: str, model: str = MODEL, **settings: Any) -> Iterator[WarmPool]:
    """A pool (Docker-backed unless ``backend`` says otherwise) over the built-in bundle
    ``model`` (copied to ``models``), shut down and its socket directory removed afterwards."""
    export_builtin_model(IMAGE, model, models)
    models.chmod(0o755)  # stem cells reach bundles through it
    sockets = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    config = Settings(models_dir=models, socket_dir=sockets, pool_id=pool_id, worker_image=IMAGE, **settings)
    pool = WarmPool(build_backend(config), ModelCatalog(models), config, clock=MonotonicClock())
    pool.start(background=False)
    try:
        yield pool
    finally:
        pool.shutdown(grace_s=1)
        shutil.rmtree(sockets, ignore_errors=True)


def cold_rows(pool: WarmPool, count: int, model: str = MODEL, image: bytes | None = None) -> list[dict[str, float]]:
    """``count`` requests that each start a whole worker (the previous one is reaped)."""
    image = image or bench_image()
    rows = []
    for _ in range(count):
        started = time.perf_counter()
        answer = pool.predict(model, image)
        total = (time.perf_counter() - started) * 1000
        assert answer.cold_start
        t = answer.timing_ms
        backend_and_worker = t["spawn_create"] + t["spawn_ready"] + t["round_trip"]
        rows.append(
            {
                "total": total,
                "create_start": t["spawn_create"],
                "ready": t["spawn_ready"],
                "first_inference": t["round_trip"],
                "worker_own": t["worker"],
                "scheduler_added": total - backend_and_worker,
            }
        )
        pool.reap(now=pool.clock.now() + 10**6)  # the worker goes idle "forever": stop it
        while pool.snapshot().workers:
            time.sleep(0.01)
    return rows


def cold_start(workdir: Path, count: int, baseline_runs: int) -> dict[str, Any]:
    """Cold starts of whole workers, against two one-shot ``docker run``s of the image:
    one that runs ``true`` (the container alone) and one that predicts one photo with the
    built-in model, as someone without wanwu would (start, import, load, answer, exit)."""
    with bench_pool(workdir / "cold-models", "benchcold", max_workers=1, stem_cells=0) as pool:
        rows = cold_rows(pool, count)
    run_true = [
        _timed(["docker", "run", "--rm", "--network", "none", "--entrypoint", "true", IMAGE])
        for _ in range(baseline_runs)
    ]
    picture = workdir / "one-shot.jpg"
    picture.write_bytes(bench_image())
    picture.chmod(0o644)
    one_shot = ["docker", "run", "--rm", "--network", "none", "-v", f"{picture}:/photo.jpg:ro", IMAGE]
    answer = json.loads(subprocess.run([*one_shot, "predict", "/photo.jpg"], check=True, capture_output=True).stdout)
    assert answer["groups"][0]["label"] == "猫", answer  # the model, not an error, answered
    run_predict = [_timed([*one_shot, "predict", "/photo.jpg"]) for _ in range(baseline_runs)]
    column = {key: summary([r[key] for r in rows]) for key in rows[0]}
    p50_total = column["total"]["p50"]
    return {
        "requests": count,
        "breakdown_ms": column,
        "docker_run_true_ms": summary(run_true),
        "docker_run_predict_one_photo_ms": summary(run_predict),
        "ratio_cold_to_docker_run_true": round(p50_total / summary(run_true)["p50"], 2),
        "ratio_cold_to_docker_run_predict": round(p50_total / summary(run_predict)["p50"], 2),
    }


def stem_ready(pool: WarmPool) -> bool:
    return any(w.model == "(stem)" and w.state == "idle" for w in pool.snapshot().workers)


def until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: no {what} within {timeout:g} s; see `wanwu doctor`")
        time.sleep(0.01)


def stem_starts(
    pool: WarmPool, count: int, model: str = MODEL, image: bytes | None = None
) -> Iterator[tuple[float, dict[str, float]]]:
    """``count`` requests each served by a ready stem cell: (total ms, the answer's
    timings); after each, the loaded worker is stopped and a fresh stem cell awaited."""
    image = image or bench_image()
    for _ in range(count):
        until(lambda: stem_ready(pool), "ready stem cell")
        started = time.perf_counter()
        answer = pool.predict(model, image)
        total = (time.perf_counter() - started) * 1000
        assert answer.start == "stem", answer.start
        yield total, answer.timing_ms
        pool.reap(now=pool.clock.now() + 10**6)  # the loaded worker goes idle "forever": stop it
        until(lambda: all(w.model != model for w in pool.snapshot().workers), "stopped worker")


def stem_start(workdir: Path, count: int, client: docker.DockerClient) -> dict[str, Any]:
    """Cold starts served by a stem cell: each request finds one ready, has it load the
    model, and is answered; then its worker is stopped and the replacement awaited.
    Also what a waiting stem cell costs (memory, CPU)."""
    rows = []
    loaded_mb = 0.0
    with bench_pool(workdir / "stem-models", "benchstem", max_workers=2, stem_cells=1) as pool:
        for total, t in stem_starts(pool, count):
            if not rows:  # the stem cell that loaded the model, before it is stopped
                loaded_mb = _container_memory_mb(client, pool, MODEL)
            rows.append(
                {
                    "total": total,
                    "assign": total - t["spawn"] - t["round_trip"],  # the scheduler's own part
                    "load_request": t["spawn"],  # POST /load as the pool timed it
                    "load": t["spawn_load"],
                    "warmup": t["spawn_warmup"],
                    "first_inference": t["round_trip"],
                    "over_load_and_warmup": total - t["spawn_load"] - t["spawn_warmup"],
                }
            )
        until(lambda: stem_ready(pool), "ready stem cell")
        (stem,) = [r for r in client.api.containers(filters={"label": "wanwu.pool=benchstem"})]
        first = client.api.stats(stem["Id"], stream=False)
        time.sleep(5)
        second = client.api.stats(stem["Id"], stream=False)
        cpu_s = (second["cpu_stats"]["cpu_usage"]["total_usage"] - first["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9
        idle = {
            "memory_mb": _memory_mb(second),
            "cpu_percent": round(cpu_s / 5 * 100, 2),
        }
    column = {key: summary([r[key] for r in rows]) for key in rows[0]}
    return {"requests": count, "breakdown_ms": column, "idle_stem_cell": idle, "loaded_stem_cell_memory_mb": loaded_mb}


# -- 3. throughput -------------------------------------------------------------------------


def throughput(gw: Gateway, workers: int, seconds: float, clients_n: int | None = None) -> dict[str, Any]:
    image = bench_image()
    clients = [Client(gw.port, image) for _ in range(clients_n or 4 * workers)]
    barrier = threading.Barrier(len(clients))

    def settled() -> bool:
        """N workers of the model, none starting (a stem cell counts for neither)."""
        states = [(w["model"], w["state"]) for w in json.loads(_get(gw.port, "/v1/pool"))["workers"]]
        return sum(model == MODEL for model, _ in states) >= workers and all(
            state in ("idle", "busy") for _, state in states
        )

    while not settled():  # N warm workers before timing
        warmers = [threading.Thread(target=c.predict) for c in clients]
        for thread in warmers:
            thread.start()
        for thread in warmers:
            thread.join()
        time.sleep(0.2)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = [0.0]

    def run(client: Client) -> None:
        barrier.wait()
        if deadline[0] == 0.0:
            deadline[0] = time.perf_counter() + seconds
        local, failed = [], 0
        while time.perf_counter() < deadline[0]:
            elapsed, _, status = client.predict()
            if status == 200:
                local.append(elapsed)
            else:
                failed += 1
        with lock:
            latencies.extend(local)
            errors[0] += failed

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    rss_peak = 0
    while any(t.is_alive() for t in threads):
        rss_peak = max(rss_peak, gateway_rss(gw))
        time.sleep(0.1)
    elapsed = time.perf_counter() - started
    return {
        "workers": workers,
        "clients": len(clients),
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "errors": errors[0],
        "rps": round(len(latencies) / elapsed, 1),
        "latency_ms": summary(latencies),
        "gateway_rss_peak_mb": round(rss_peak / 2**20, 1),
    }


def in_process_throughput(models_dir: Path, seconds: float) -> dict[str, Any]:
    predictor = in_process_predictor(models_dir)
    image = bench_image()
    for _ in range(30):
        predictor.predict(image)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predictor.predict(image)
        count += 1
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 2), "requests": count, "rps": round(count / elapsed, 1)}


def multipart_many(images: list[bytes]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="p{i}.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def batch_rates(gw: Gateway, sizes: tuple[int, ...], seconds: float) -> list[dict[str, Any]]:
    """Images/s through ``predict:batch``, one request at a time as a batch job's client
    sends them, for batches of each size; the photos as JPEG, fresh answers (no cache)."""
    from tests.photos import NAMES

    photos = [as_format(photo(name), "JPEG", 90) for name in NAMES]
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Cache-Control": "no-cache"}
    out = []
    for size in sizes:
        body = multipart_many([photos[i % len(photos)] for i in range(size)])

        def send(body: bytes = body, size: int = size) -> float:
            started = time.perf_counter()
            conn.request("POST", f"/v1/models/{MODEL}/predict:batch", body=body, headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200 and len(answer["results"]) == size, answer
            return (time.perf_counter() - started) * 1000

        for _ in range(2):
            send()
        latencies, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            latencies.append(send())
        elapsed = time.perf_counter() - started
        out.append(
            {
                "batch": size,
                "requests": len(latencies),
                "images_per_s": round(len(latencies) * size / elapsed, 1),
                "request_ms": summary(latencies),
            }
        )
    conn.close()
    return out


def threads_section(workdir: Path, client: docker.DockerClient, requests: int, seconds: float) -> list[dict[str, Any]]:
    """The worker-threads default: N=2 with 1 and with 2 intra-op threads per worker,
    one after the other: one photo at a time (latency) and 8 concurrent clients
    (throughput, dynamic batching on as shipped)."""
    quiet = {"cache_enabled": "false", "idle_ttl_s": "600", "log_level": "WARNING", "queue_timeout_s": "60"}
    out = []
    for threads in (1, 2):
        print(f"worker threads {threads} ...", file=sys.stderr)
        with running_gateway(
            workdir / f"threads{threads}", client, max_workers="2", worker_threads=str(threads), **quiet
        ) as gw:
            one = Client(gw.port, bench_image())
            for _ in range(20):
                one.predict()
            latencies = []
            for _ in range(requests):
                elapsed, body, status = one.predict()
                assert status == 200 and not body["cold_start"], body
                latencies.append(elapsed)
            loaded = throughput(gw, 2, seconds, clients_n=8)
            out.append(
                {
                    "threads": threads,
                    "sequential_ms": summary(latencies),
                    "eight_clients_rps": loaded["rps"],
                    "eight_clients_ms": loaded["latency_ms"],
                }
            )
    return out


# -- 5. backfill and batching -------------------------------------------------------------


def run_backfill(gw: Gateway, source: Path, out: Path, *options: str) -> dict[str, Any]:
    """One ``wanwu backfill`` run (a subprocess, as a user runs it): wall time and its summary."""
    summary_file = out.with_suffix(".summary.json")
    command = [sys.executable, "-m", "gateway.cli", "backfill", str(source), "--out", str(out), "--url", gw.url]
    busy, gateway, client = _machine_busy_s(), _cpu_ticks(gw), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([*command, "--quiet", "--summary-json", str(summary_file), *options], check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = os.sysconf("SC_CLK_TCK")
    cpu = {
        "machine": round(_machine_busy_s() - busy, 2),
        "gateway": round((_cpu_ticks(gw) - gateway) / tick, 2),
        "backfill_client": round(after.ru_utime + after.ru_stime - client.ru_utime - client.ru_stime, 2),
    }
    cpu["workers_and_engine"] = round(cpu["machine"] - cpu["gateway"] - cpu["backfill_client"], 2)
    report = json.loads(summary_file.read_text())
    done = sum(1 for _ in out.open(encoding="utf-8"))
    return {
        "images": done,
        "wall_s": round(wall, 2),
        "images_per_s": round(done / wall, 1),
        "cpu_s": cpu,  # where the cores went: what bounds the rate
        "cpu_capacity_s": round(wall * (os.cpu_count() or 1), 2),
        "summary": report,
    }


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def sequential_predict(gw: Gateway, files: list[Path]) -> dict[str, Any]:
    """`wanwu predict FILE...`: one request per file, one after another."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "gateway.cli", "predict", "--url", gw.url, "--json", *map(str, files)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - started
    return {"images": len(files), "wall_s": round(wall, 2), "images_per_s": round(len(files) / wall, 1)}


def in_process_batched(models_dir: Path, files: list[Path], batch: int, threads: int) -> dict[str, Any]:
    """The model in this process on the same cores, batches of ``batch``, ``threads``
    intra-op threads (decoding runs on the predictor's own pool, as in a worker)."""
    predictor = in_process_predictor(models_dir, threads=threads)
    blobs = [f.read_bytes() for f in files]
    predictor.predict_batch(blobs[:batch], 1)
    started = time.perf_counter()
    for i in range(0, len(blobs), batch):
        predictor.predict_batch(blobs[i : i + batch], 5)
    wall = time.perf_counter() - started
    return {
        "images": len(blobs),
        "batch": batch,
        "threads": threads,
        "wall_s": round(wall, 2),
        "images_per_s": round(len(blobs) / wall, 1),
    }


def interactive_stream(gw: Gateway, images: list[bytes], rate_hz: float, until: Callable[[], bool]) -> list[float]:
    """Single-image requests at ``rate_hz`` (fresh answers, not the cache) until ``until()``;
    their latencies as the client saw them."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Cache-Control": "no-cache"}
    latencies: list[float] = []
    i = 0
    while not until():
        started = time.perf_counter()
        conn.request("POST", f"/v1/models/{MODEL}/predict", body=multipart(images[i % len(images)]), headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        i += 1
        time.sleep(max(0.0, 1 / rate_hz - (time.perf_counter() - started)))
    return latencies


def interactive_during_backfill(gw: Gateway, source: Path, out: Path, images: list[bytes], n: int) -> dict[str, Any]:
    for image in images[:20]:  # both workers warm
        interactive_stream(gw, [image], 1000, lambda: True)
    sent = [0]

    def enough() -> bool:
        sent[0] += 1
        return sent[0] > n

    alone = interactive_stream(gw, images, 20, enough)
    during: list[float] = []
    runs = 0
    while len(during) < n:  # as many backfills, one after another, as it takes to get n samples
        runs += 1
        target = out.with_name(f"{out.stem}-{runs}.jsonl")
        command = [sys.executable, "-m", "gateway.cli", "backfill", str(source), "--out", str(target), "--url", gw.url]
        job = subprocess.Popen([*command, "--quiet"], stdout=subprocess.DEVNULL)
        while job.poll() is None and (not target.exists() or target.stat().st_size == 0):  # once it is under way
            time.sleep(0.01)
        during += interactive_stream(gw, images, 20, lambda job=job: job.poll() is not None)
        job.wait()
    return {
        "backfills": runs,
        "alone_ms": summary(alone),
        "during_backfill_ms": summary(during),
        "ratio_p99": round(pct(during, 99) / pct(alone, 99), 2),
        "ratio_p50": round(pct(during, 50) / pct(alone, 50), 2),
    }


def models_without_batching(workdir: Path) -> Path:
    """A models directory whose demo bundle has batching switched off."""
    models = workdir / "models"
    path = export_builtin_model(IMAGE, MODEL, models)
    meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
    meta.pop("batching", None)
    (path / "model.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    return models


def backfill_section(workdir: Path, client: docker.DockerClient, quick: bool, seconds: float) -> dict[str, Any]:
    """``wanwu backfill`` of a directory of photos (tests.photos.photo_tree: crops and
    scales of the test photos, JPEG and PNG) at N = 1 and 2, each against sequential
    ``wanwu predict`` on the same gateway; the in-process limit is the model batched in
    this process on the same cores, with 1 and with 2 intra-op threads (the better one)."""
    count = 200 if quick else 1000
    source = workdir / "backfill-photos"
    files = sorted(photo_tree(source, count, seed=2026))
    quiet = {"idle_ttl_s": "600", "log_level": "WARNING", "queue_timeout_s": "60"}
    results: dict[str, Any] = {"images": count, "runs": []}
    for n in (1, 2):
        print(f"backfill N={n} ...", file=sys.stderr)
        with running_gateway(workdir / f"b{n}", client, max_workers=str(n), **quiet) as gw:
            interactive_stream(gw, [bench_image()], 1000, lambda: True)  # a warm worker
            run = run_backfill(gw, source, workdir / f"b{n}.jsonl")
            run["workers"] = n
            run["worker_memory_mb"] = [
                _memory_mb(client.api.stats(r["Id"], stream=False)) for r in gw.containers(client)
            ]
            # The most a worker's cgroup held while it backfilled (page cache included); cgroup v2
            # keeps no such figure, and it is then None.
            peaks = [
                client.api.stats(r["Id"], stream=False)["memory_stats"].get("max_usage") for r in gw.containers(client)
            ]
            run["worker_peak_memory_mb"] = [None if p is None else round(p / 2**20, 1) for p in peaks]
            run["sequential_predict"] = sequential_predict(gw, files[: min(150, count)])
            if n == 1:
                limits = [in_process_batched(gw.models_dir, files, 32, threads) for threads in (1, 2)]
                results["in_process_batched_runs"] = limits
                results["in_process_batched"] = max(limits, key=lambda r: r["images_per_s"])
            else:
                print("interactive latency during a backfill ...", file=sys.stderr)
                images = [f.read_bytes() for f in files[:200]]
                results["interactive"] = interactive_during_backfill(
                    gw, source, workdir / "during.jsonl", images, 60 if quick else 200
                )
        results["runs"].append(run)
    for run in results["runs"]:
        run["ratio_to_sequential_predict"] = round(run["images_per_s"] / run["sequential_predict"]["images_per_s"], 2)
        run["ratio_to_in_process_batched"] = round(
            run["images_per_s"] / results["in_process_batched"]["images_per_s"], 2
        )
    results["dynamic_batching"] = []
    for batching in (True, False):
        print(f"8 single-image clients, batching {'on' if batching else 'off'} ...", file=sys.stderr)
        name = "dyn-on" if batching else "dyn-off"
        if not batching:
            models_without_batching(workdir / name)
        with running_gateway(workdir / name, client, max_workers="2", cache_enabled="false", **quiet) as gw:
            t = throughput(gw, 2, seconds, clients_n=8)
            pool = json.loads(_get(gw.port, "/v1/pool"))
            t.update(
                batching=batching, batches=pool["counters"]["batches"], batched=pool["counters"]["batched_requests"]
            )
            results["dynamic_batching"].append(t)
    on, off = results["dynamic_batching"]
    results["dynamic_batching_ratio"] = round(on["rps"] / off["rps"], 2)
    return results


# -- 4. footprint ----------------------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for text in child.read_text().split():
            pids += _process_tree(int(text))
    return pids


def gateway_rss(gw: Gateway) -> int:
    total = 0
    for pid in _process_tree(gw.process.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def _cpu_ticks(gw: Gateway) -> int:
    ticks = 0
    for pid in _process_tree(gw.process.pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return ticks


def footprint(gw: Gateway, client: docker.DockerClient, idle_seconds: float) -> dict[str, Any]:
    rss_idle = gateway_rss(gw)
    before, started = _cpu_ticks(gw), time.perf_counter()
    time.sleep(idle_seconds)
    cpu = (_cpu_ticks(gw) - before) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - started)
    workers = [_memory_mb(client.api.stats(row["Id"], stream=False)) for row in gw.containers(client)]
    sizes = {}
    for image in (IMAGE, IMAGE.rsplit(":", 1)[0] + ":cuda"):
        try:
            sizes[image] = round(client.images.get(image).attrs["Size"] / 1e9, 3)
        except docker.errors.ImageNotFound:  # the cuda image is built only by `make image-cuda`
            sizes[image] = None
    return {
        "gateway_rss_idle_mb": round(rss_idle / 2**20, 1),
        "gateway_idle_cpu_percent": round(cpu * 100, 2),
        "image_size_gb": sizes,
        "worker_container_memory_mb": workers,
    }


# -- report ------------------------------------------------------------------------------------


TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure2019-sample50"


def simulator_speed(quick: bool) -> dict[str, Any]:
    """Requests per second of wall time the trace simulator replays (one process): a day
    of the 50-function sample (the low-QPS 38 with --quick), N=8, TTL 60 s."""
    from scheduler.core import CoreConfig
    from scheduler.sim import Profile, simulate
    from scheduler.traces import load_trace

    trace = load_trace(TRACE, max_per_day=1440 if quick else None)
    speed: dict[str, Any] = {"requests": len(trace.arrivals), "models": len(trace.models())}
    for policy in ("fixed", "adaptive"):
        result = simulate(trace, CoreConfig(capacity=8, default_ttl_s=60, keepalive=policy), Profile(infer_ms=5))
        speed[policy] = {"wall_s": round(result.wall_s, 2), "requests_per_s": round(result.requests / result.wall_s)}
    return speed


def table(results: dict[str, Any]) -> str:
    lines = []

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<52} {value}")

    def pair(s: dict[str, float]) -> str:
        return f"p50 {s['p50']:>8.2f}  p99 {s['p99']:>8.2f}"

    if "front" in results:
        f = results["front"]
        lines.append(f"HTTP front: warm path client less worker ({f['requests']} requests each, in turns, ms)")
        row("waitress (wanwu serve)", pair(f["waitress_added_ms"]))
        row("gunicorn gthread (before)", pair(f["gunicorn_added_ms"]))
        d = f["waitress_minus_gunicorn_ms"]
        row("waitress - gunicorn (bar: p50 <= +1)", f"p50 {d['p50']:>+8.2f}  p99 {d['p99']:>+8.2f}")
    if "warm_path" in results:  # the sections before backfill run together
        w = results["warm_path"]
        lines.append(f"warm path ({w['requests']} sequential requests, ms)")
        for key in (
            "e2e_http_ms",
            "worker_own_ms",
            "e2e_minus_worker_ms",
            "direct_socket_round_trip_ms",
            "direct_socket_minus_worker_ms",
            "in_process_ms",
        ):
            row(key, pair(w[key]))
        row("gateway + scheduler added (target p50 <= 1, p99 <= 5)", pair(w["gateway_and_scheduler_added_ms"]))
        r = w["ratio_e2e_to_in_process"]
        row(
            f"ratio e2e / in-process, {w['in_process_threads']} thread(s) (bar <= 1.15)",
            f"p50 {r['p50']}x  p99 {r['p99']}x",
        )
        c = results["cold_start"]
        lines.append(f"cold start ({c['requests']} requests, ms)")
        for key, value in c["breakdown_ms"].items():
            row(key, pair(value))
        row("docker run --rm IMAGE true", pair(c["docker_run_true_ms"]))
        row("docker run: predict one photo (one-shot)", pair(c["docker_run_predict_one_photo_ms"]))
        row("ratio cold / docker run true", f"{c['ratio_cold_to_docker_run_true']}x")
        row("ratio cold / one-shot docker run", f"{c['ratio_cold_to_docker_run_predict']}x")
        st = results["stem_start"]
        lines.append(f"stem-cell cold start ({st['requests']} requests, ms)")
        for key, value in st["breakdown_ms"].items():
            row(key, pair(value))
        row("ratio stem / container cold start", f"{st['ratio_to_container_cold_start']}x")
        row("ratio stem / one-shot docker run (bar <= 0.15)", f"{st['ratio_to_docker_run_predict']}x")
        row("  beyond load + warm-up (bar <= 50 ms)", pair(st["breakdown_ms"]["over_load_and_warmup"]))
        idle = st["idle_stem_cell"]
        row("idle stem cell: memory (MB), CPU (%)", f"{idle['memory_mb']}, {idle['cpu_percent']}")
        row("stem cell that loaded the model: memory (MB)", str(st["loaded_stem_cell_memory_mb"]))
        lines.append("throughput (4N clients)")
        base = results["in_process"]["rps"]
        for t in results["throughput"]:
            row(
                f"N={t['workers']}: {t['clients']} clients",
                f"{t['rps']:>7.1f} req/s  p99 {t['latency_ms']['p99']:.1f} ms  "
                f"errors {t['errors']}  ratio to in-process {t['rps'] / base:.2f}",
            )
        row(f"in-process inference (one process, {WORKER_THREADS} thread(s))", f"{base:>7.1f} req/s")
        lines.append("predict:batch, N=2, one request at a time")
        for b in results["batch_rates"]:
            row(
                f"batch of {b['batch']}",
                f"{b['images_per_s']:>7.1f} images/s  request p50 {b['request_ms']['p50']:.1f} ms",
            )
        lines.append("worker threads, N=2 (one photo at a time | 8 clients)")
        for t in results["worker_threads"]:
            row(
                f"{t['threads']} thread(s)",
                f"{pair(t['sequential_ms'])} | {t['eight_clients_rps']:.1f} req/s "
                f"p99 {t['eight_clients_ms']['p99']:.1f}",
            )
        f = results["footprint"]
        lines.append("footprint")
        row(
            "gateway RSS idle / peak under load (MB)",
            f"{f['gateway_rss_idle_mb']} / {max(t['gateway_rss_peak_mb'] for t in results['throughput'])}",
        )
        row("gateway idle CPU (%)", str(f["gateway_idle_cpu_percent"]))
        row("image sizes (GB; bar cpu <= 1.2)", ", ".join(f"{k} {v}" for k, v in f["image_size_gb"].items()))
        row("worker container memory (MB)", ", ".join(map(str, f["worker_container_memory_mb"])))
    b = results.get("backfill")
    if b:
        lines.append(f"backfill ({b['images']} photos, images/s)")
        for run in b["runs"]:
            row(
                f"wanwu backfill, N={run['workers']} (bar at N=2: >= 0.8x in-process)",
                f"{run['images_per_s']:>7.1f}  x{run['ratio_to_sequential_predict']} sequential  "
                f"x{run['ratio_to_in_process_batched']} in-process batched",
            )
            row(f"  sequential wanwu predict, N={run['workers']}", f"{run['sequential_predict']['images_per_s']:>7.1f}")
            row(
                "  worker memory after / peak (MB)",
                f"{', '.join(map(str, run['worker_memory_mb']))} / "
                f"{', '.join('n/a' if p is None else str(p) for p in run['worker_peak_memory_mb'])}",
            )
            cpu = run["cpu_s"]
            row(
                "  CPU s: machine / gateway / client / workers+engine",
                f"{cpu['machine']} of {run['cpu_capacity_s']} / {cpu['gateway']} / {cpu['backfill_client']} / "
                f"{cpu['workers_and_engine']}",
            )
        for limit in b["in_process_batched_runs"]:
            row(f"in-process batched (batch 32, {limit['threads']} thread(s))", f"{limit['images_per_s']:>7.1f}")
        i = b["interactive"]
        row("interactive alone (ms)", pair(i["alone_ms"]))
        row(
            "interactive during a backfill (ms) (target p99 <= 2x)",
            f"{pair(i['during_backfill_ms'])}  x{i['ratio_p99']}",
        )
        for t in b["dynamic_batching"]:
            row(
                f"8 clients, N=2, batching {'on' if t['batching'] else 'off'}",
                f"{t['rps']:>7.1f} req/s  p99 {t['latency_ms']['p99']:.1f} ms  batches {t['batches']}",
            )
        row("ratio batching on / off", f"{b['dynamic_batching_ratio']}x")
    bk = results.get("backends")
    if bk:
        lines.append(f"backends: docker | process ({bk['cold_requests']} cold starts, {bk['warm_requests']} warm, ms)")
        for name, path in (
            ("cold start, whole worker", ("cold_start_ms", "total")),
            ("  of which create/start", ("cold_start_ms", "create_start")),
            ("  of which ready (import torch, load, warm up)", ("cold_start_ms", "ready")),
            ("cold start from a stem cell", ("stem_start_ms",)),
            ("warm, HTTP end to end", ("warm_e2e_http_ms",)),
            ("warm, worker socket round trip", ("warm_direct_socket_round_trip_ms",)),
        ):
            d, p = _dig(bk["docker"], path), _dig(bk["process"], path)
            row(name, f"{pair(d)} | {pair(p)}")
        row(
            "ratio process / docker p50: cold, stem, warm",
            f"{bk['ratio_process_to_docker_cold_p50']}x, {bk['ratio_process_to_docker_stem_p50']}x, "
            f"{bk['ratio_process_to_docker_warm_e2e_p50']}x",
        )
    sw = results.get("swarm")
    if sw and "skipped" in sw:
        lines.append(f"swarm: skipped ({sw['skipped']})")
    elif sw:
        lines.append(f"swarm | local docker ({sw['cold_requests']} cold starts, {sw['warm_requests']} warm, ms)")
        for name, path in (
            ("cold start, gateway-measured", ("cold_start_ms", "gateway_total")),
            ("  of which create/start", ("cold_start_ms", "create_start")),
            ("  of which ready", ("cold_start_ms", "ready")),
            ("warm, gateway-measured", ("warm_ms", "gateway_total")),
            ("warm, HTTP end to end (swarm: through the relay)", ("warm_ms", "e2e")),
            ("warm, worker's own", ("warm_ms", "worker")),
        ):
            row(name, f"{pair(_dig(sw['swarm'], path))} | {pair(_dig(sw['docker'], path))}")
        row(
            "ratio swarm / docker p50: cold, warm (gateway), warm e2e",
            f"{sw['ratio_swarm_to_docker_cold_gateway_total_p50']}x, "
            f"{sw['ratio_swarm_to_docker_warm_gateway_total_p50']}x, {sw['ratio_swarm_to_docker_warm_e2e_p50']}x",
        )
        row("swarm fixture, s", ", ".join(f"{k} {v}" for k, v in sw["fixture_s"].items()))
    fm = results.get("formats")
    if fm:
        lines.append(
            f"formats (the demo network; {fm['cold_requests']} cold starts, {fm['warm_requests']} warm requests each)"
        )
        row("", "torchscript | export | onnx")
        for name, key in (
            ("worker check: load", "load_ms"),
            ("worker check: first request", "first_ms"),
            ("worker check: peak RSS MB", "peak_rss_mb"),
        ):
            row(name, " | ".join(str(fm[f]["check"][key]) for f in FORMAT_BUNDLES))
        for name, key in (
            ("cold start p50", "cold_start_ms"),
            ("  first request after start p50", "first_request_ms"),
            ("warm, pool to worker p50", "warm_pool_ms"),
        ):
            row(name, " | ".join(str(fm[f][key]["p50"]) for f in FORMAT_BUNDLES))
        row(
            "ratio to torchscript p50: cold, warm",
            f"export {fm['ratio_export_to_torchscript_cold_start_ms_p50']}x, "
            f"{fm['ratio_export_to_torchscript_warm_pool_ms_p50']}x; "
            f"onnx {fm['ratio_onnx_to_torchscript_cold_start_ms_p50']}x, "
            f"{fm['ratio_onnx_to_torchscript_warm_pool_ms_p50']}x",
        )
        row("embed / predict over HTTP p50", f"{pair(fm['embed_http_ms'])} / {pair(fm['predict_http_ms'])}")
        row("worker image", f"{fm['image_gb']} GB")
    gf = results.get("general_formats")
    if gf:
        lines.append(
            f"the general model by format ({gf['stem_starts']} stem-cell starts, {gf['warm_requests']} warm requests "
            f"of {gf['photo']} each, ms)"
        )
        row("", " | ".join(GENERAL_FORMATS))
        row("model file MB", " | ".join(str(gf[f]["model_file_mb"]) for f in GENERAL_FORMATS))
        for name, path in (
            ("stem-cell cold start p50", ("stem_start_ms", "total")),
            ("  load p50", ("stem_start_ms", "load")),
            ("  warm-up p50", ("stem_start_ms", "warmup")),
            ("  first answer p50", ("stem_start_ms", "first")),
            ("warm, pool to worker p50", ("warm_pool_ms",)),
        ):
            row(name, " | ".join(str(_dig(gf[f], path)["p50"]) for f in GENERAL_FORMATS))
        row("loaded worker memory MB", " | ".join(str(gf[f]["worker_memory_mb"]) for f in GENERAL_FORMATS))
        row(
            "ratio to onnx p50: stem start, warm",
            "; ".join(
                f"{f} {gf[f'ratio_{f}_to_onnx_stem_start_p50']}x, {gf[f'ratio_{f}_to_onnx_warm_p50']}x"
                for f in GENERAL_FORMATS[1:]
            ),
        )
    if "variants" in results:
        lines.append(variants.table(results["variants"]))
    sim = results.get("simulator")
    if sim:
        lines.append(f"simulator ({sim['requests']} requests to {sim['models']} models, one process)")
        for policy in ("fixed", "adaptive"):
            row(f"{policy}, N=8, TTL 60 s", f"{sim[policy]['requests_per_s']:>7} req/s  ({sim[policy]['wall_s']} s)")
    scale = results.get("sim_scale")
    if scale:
        lines.append("simulator at scale (the sample's functions copied, unbounded N, TTL 60 s, one process)")
        for r in scale["rows"]:
            row(f"{r['models']} models, {r['requests']} requests", f"{r['requests_per_s']:>7} req/s  ({r['wall_s']} s)")
        row("largest / smallest (bar: >= 0.8)", f"{scale['largest_over_smallest']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument(
        "--only",
        default="simulator,sim_scale,core,front,backfill,backends,formats,general,variants,swarm",
        help="sections, comma-separated: simulator, sim_scale (the simulator over 50, 500 and 5,000 models), "
        "core (the general model: warm path, cold and stem starts, "
        "throughput, predict:batch, worker threads, footprint), front "
        "(the warm path's added latency behind waitress and behind gunicorn, in turns), backfill (photos, the "
        "general model), "
        "backends (cold starts and warm path, Docker against local processes), formats (TorchScript, torch.export "
        "and ONNX; embed against predict), general (the general model in each format: stem-cell "
        "cold start, warm path, memory), variants (INT8, 160 and 128 px against fp32 at 224: speed, memory, "
        "top-1 agreement), swarm (the swarm backend on a three-node test swarm against local Docker)",
    )
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    client = engine()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "docker": client.version().get("Version"),
        },
        "command": "make bench" + (" BENCH_ARGS=--quick" if args.quick else ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        _run_sections(args, sections, client, results)
    finally:  # what was measured is kept even when a later section fails
        for name in (f"bench-{stamp}.json", "latest.json"):
            (args.out / name).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wanwu bench on {results['machine']['cpus']} CPUs ({results['command']})")
    print(table(results))
    print(f"JSON: {args.out / f'bench-{stamp}.json'}")
    return 0


def _run_sections(
    args: argparse.Namespace, sections: set[str], client: docker.DockerClient, results: dict[str, Any]
) -> None:
    """Run the sections asked for, one after another, into ``results``."""
    warm_n, cold_n, baseline_n, seconds = (50, 3, 2, 2.0) if args.quick else (500, 20, 5, 10.0)
    if TRACE.is_dir() and "simulator" in sections:
        print("simulator ...", file=sys.stderr)
        results["simulator"] = simulator_speed(args.quick)
    if TRACE.is_dir() and "sim_scale" in sections:
        from tests.bench.scale import bench_trace, scale_speed

        print("simulator at 50, 500 and 5,000 models ...", file=sys.stderr)
        trace, thin = bench_trace(args.quick)
        results["sim_scale"] = scale_speed(trace, thin=thin)
    with tempfile.TemporaryDirectory(prefix="wanwu-bench-") as tmp:
        workdir = Path(tmp)
        if "core" in sections:
            quiet = {"cache_enabled": "false", "idle_ttl_s": "600", "log_level": "WARNING", "queue_timeout_s": "60"}
            with running_gateway(workdir / "w", client, max_workers="1", **quiet) as gw:
                print("warm path ...", file=sys.stderr)
                results["warm_path"] = warm_path(gw, warm_n)
                results["in_process"] = in_process_throughput(gw.models_dir, seconds)
                results["footprint"] = footprint(gw, client, idle_seconds=3 if args.quick else 10)
            print("cold start ...", file=sys.stderr)
            results["cold_start"] = cold_start(workdir, cold_n, baseline_n)
            print("stem-cell start ...", file=sys.stderr)
            stem = results["stem_start"] = stem_start(workdir, cold_n, client)
            cold = results["cold_start"]
            stem["ratio_to_container_cold_start"] = round(
                stem["breakdown_ms"]["total"]["p50"] / cold["breakdown_ms"]["total"]["p50"], 3
            )
            stem["ratio_to_docker_run_predict"] = round(
                stem["breakdown_ms"]["total"]["p50"] / cold["docker_run_predict_one_photo_ms"]["p50"], 3
            )
            results["throughput"] = []
            for n in (1, 2):
                print(f"throughput N={n} ...", file=sys.stderr)
                with running_gateway(workdir / f"t{n}", client, max_workers=str(n), **quiet) as gw:
                    results["throughput"].append(throughput(gw, n, seconds))
                    if n == 2:
                        print("predict:batch ...", file=sys.stderr)
                        results["batch_rates"] = batch_rates(gw, (1, 8, 32), seconds)
            results["worker_threads"] = threads_section(workdir, client, warm_n // 5, seconds)
        if "front" in sections:
            print("HTTP front ...", file=sys.stderr)
            results["front"] = front_section(workdir, client, warm_n)
        if "backfill" in sections:
            results["backfill"] = backfill_section(workdir, client, args.quick, seconds)
        if "backends" in sections:
            results["backends"] = backends_section(workdir, client, warm_n, cold_n)
        if "formats" in sections:
            results["formats"] = formats_section(workdir, client, warm_n, min(cold_n, 10))
        if "general" in sections:
            results["general_formats"] = general_formats_section(workdir, client, warm_n, min(cold_n, 10))
        if "variants" in sections:
            print("variants of the general model ...", file=sys.stderr)
            results["variants"] = variants.variants_section(workdir / "variants", args.quick)
        if "swarm" in sections:
            results["swarm"] = swarm_section(workdir, client, warm_n, min(cold_n, 10))


if __name__ == "__main__":
    sys.exit(main())
