"""Command line: ``python -m wanwu_worker serve|predict|check`` (the image's entry point).

``check`` loads a bundle and its model as ``serve`` would, answers an image six times,
and prints one JSON line: what the model is (name, format, task, outputs, labels,
embedding_dim, max_batch_size), on what it ran (device, precision) and what it cost
(load_ms, warmup_ms, first_ms, infer_ms: the median of the five requests after the
first, peak_rss_mb, gpu_memory_mb and how that was measured). A bundle that fails
prints ``{"ok": false, "error": {"code", "message"}}`` and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import contract as env
from .bundle import load_bundle
from .errors import WorkerError
from .logs import configure as configure_logging
from .preprocess import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import torch

    from .predictor import Predictor

log = logging.getLogger("wanwu_worker")

MOUNTED_MODEL = "/model"


def default_model_dir() -> str:
    """WANWU_MODEL_DIR, else a bundle mounted at /model, else the image's built-in
    demo bundle (WANWU_BUILTIN_MODEL)."""
    explicit = os.environ.get(env.MODEL_DIR)
    if explicit:
        return explicit
    if Path(MOUNTED_MODEL, "model.json").is_file():
        return MOUNTED_MODEL
    return os.environ.get(env.BUILTIN_MODEL, MOUNTED_MODEL)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"wanwu-worker: {name}={raw!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanwu-worker", description="Answer images with a wanwu model bundle.")
    parser.add_argument(
        "--model", default=None, help="bundle directory (default: $WANWU_MODEL_DIR, /model, built-in demo)"
    )
    parser.add_argument(
        "--device",
        default=os.environ.get(env.DEVICE) or None,
        help="cpu, cuda or cuda:N (default: cuda if available)",
    )
    parser.add_argument("--max-pixels", type=int, default=_env_int(env.MAX_PIXELS, DEFAULT_MAX_PIXELS))
    parser.add_argument(
        "--threads",
        type=int,
        default=_env_int(env.TORCH_THREADS, 1),
        help="torch intra-op threads (default 1; 0 leaves torch's own choice)",
    )
    parser.add_argument(
        "--preprocess-threads",
        type=int,
        default=_env_int(env.PREPROCESS_THREADS, 0),
        help="threads decoding a batch's images (default 0: the CPUs this process may use, at most 4)",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser(
        "serve", help="answer /healthz, /predict and /predict_batch on a Unix socket (or TCP, --listen)"
    )
    serve.add_argument("--socket", default=os.environ.get(env.SOCKET, env.DEFAULT_SOCKET))
    serve.add_argument(
        "--listen",
        default=os.environ.get(env.LISTEN) or None,
        metavar="HOST:PORT",
        help="serve on TCP instead of the socket; every request must carry the --secret-file secret",
    )
    serve.add_argument(
        "--secret-file",
        default=os.environ.get(env.SECRET_FILE) or None,
        help="the worker's secret (a Docker secret), required with --listen",
    )
    serve.add_argument("--max-body", type=int, default=_env_int(env.MAX_BODY_BYTES, 20 * 2**20))
    serve.add_argument(
        "--stem",
        action="store_true",
        default=os.environ.get(env.STEM) == "1",
        help="start with no model (a stem cell); POST /load picks a bundle under --models-root",
    )
    serve.add_argument("--models-root", default=os.environ.get(env.MODELS_ROOT, "/models"))
    predict = sub.add_parser("predict", help="classify or embed FILEs, print one JSON line each")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("files", nargs="+", metavar="FILE")
    sub.add_parser("check", help="load the bundle's model, answer an image, print one JSON line of measurements")
    return parser


def run_predict(predictor: Predictor, files: list[str], top_k: int) -> int:
    """Print one JSON line per file, running the files through the model a batch at a
    time (the bundle's max batch size); return 1 if any file failed, else 0."""
    failed = 0
    size = predictor.max_batch_size
    for start in range(0, len(files), size):
        names = files[start : start + size]
        for name, answer in zip(names, _predict_files(predictor, names, top_k), strict=True):
            failed += "error" in answer
            threshold = predictor.bundle.confidence_threshold
            if threshold is not None and answer.get("predictions"):
                answer["confident"] = answer["predictions"][0]["score"] >= threshold
            print(json.dumps({"file": name, **answer}, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _predict_files(predictor: Predictor, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each file's answer, in order: ``{"predictions": [...]}`` (classify), ``{"embedding":
    [...], "dim": D}`` (embed) or ``{"error": {...}}``."""
    answers: list[dict[str, Any] | None] = []
    images: list[bytes] = []
    for name in names:
        try:
            images.append(Path(name).read_bytes())
        except OSError as exc:
            answers.append({"error": {"code": "unreadable", "message": f"{name}: {exc.strerror or exc}"}})
        else:
            answers.append(None)  # answered by the batch below
    try:
        results = predictor.predict_batch(images, top_k).results if images else []
    except WorkerError:  # the model failed: file by file, so each line says why, as it always has
        results = [_predict_one(predictor, data, top_k) for data in images]
    from_batch = iter(results)
    return [answer if answer is not None else next(from_batch) for answer in answers]


def _predict_one(predictor: Predictor, data: bytes, top_k: int) -> dict[str, Any]:
    try:
        return predictor.predict(data, top_k).result
    except WorkerError as exc:
        return {"error": exc.to_json()}


def run_check(model_dir: str, runtime: dict[str, Any]) -> int:
    """``check`` (module doc): print one JSON line; 0 if the bundle works, else 2."""
    try:
        # Only the JSON line goes to stdout, whatever a library prints while loading.
        with contextlib.redirect_stdout(sys.stderr):
            report = _check(model_dir, runtime)
    except WorkerError as exc:
        return _check_failed(exc.to_json())
    except Exception as exc:  # the caller reads a JSON answer, whatever went wrong
        log.exception("check of %s failed unexpectedly", model_dir)
        return _check_failed({"code": "internal", "message": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(report, ensure_ascii=False), flush=True)
    return 0


def _check_failed(error: dict[str, str]) -> int:
    print(json.dumps({"ok": False, "error": error}, ensure_ascii=False), flush=True)
    return 2


def _check(model_dir: str, runtime: dict[str, Any]) -> dict[str, Any]:
    from .predictor import Predictor, choose_device
    from .runtimes import providers

    device = choose_device(runtime["device"])
    gpu = _GpuMemory(device) if device.type == "cuda" else None  # read before anything is loaded
    bundle = load_bundle(model_dir)
    predictor = Predictor(bundle, **{**runtime, "device": str(device)})
    image = _sample_image(max(bundle.resize, *bundle.crop))
    first_ms = _timed_ms(predictor, image)
    infer_ms = statistics.median(_timed_ms(predictor, image) for _ in range(5))  # what a warm worker's request takes
    gpu_mb, method = gpu.measure() if gpu is not None else (None, None)
    return {
        "ok": True,
        "name": bundle.name,
        "format": bundle.format,
        "task": bundle.task,
        "device": str(predictor.device),
        "precision": predictor.precision,
        "providers": providers(predictor.model),
        "outputs": predictor.outputs,
        "labels": len(bundle.labels),
        "embedding_dim": predictor.outputs if bundle.task == "embed" else None,
        "max_batch_size": predictor.max_batch_size,
        "load_ms": predictor.load_ms,
        "warmup_ms": predictor.warmup_ms,
        "first_ms": first_ms,
        "infer_ms": infer_ms,
        "peak_rss_mb": math.ceil(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # Linux: KiB
        "gpu_memory_mb": gpu_mb,
        "gpu_memory_method": method,
    }


def _timed_ms(predictor: Predictor, image: bytes) -> float:
    """How long one request of ``image`` takes, in milliseconds."""
    started = time.perf_counter()
    predictor.predict(image, 1)
    return round((time.perf_counter() - started) * 1000, 3)


def _sample_image(side: int) -> bytes:
    """A JPEG a little larger than the model's input, unlike the warm-up's pictures."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((side + side // 2, side)).save(buffer, "JPEG")
    return buffer.getvalue()


class _GpuMemory:
    """GPU memory a model costs: free memory on its GPU before anything is loaded against
    after the first request, and PyTorch's peak reserved memory; the larger of the two.
    NVML reads free memory before the CUDA context exists, so its drop counts the
    context too; without NVML, cudaMemGetInfo can only read it once the context is made.
    An ONNX model's memory is not PyTorch's: only the drop in free memory sees it."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.nvml_before = _nvml_free()  # first: torch may make the context from here on
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.cuda_before = torch.cuda.mem_get_info(self.device)[0]

    def measure(self) -> tuple[int, str]:
        """(MB rounded up, how it was measured)."""
        import torch

        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_reserved(self.device)
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        nvml_after = _nvml_free()
        if self.nvml_before and nvml_after and uuid in self.nvml_before and uuid in nvml_after:
            drop, method = self.nvml_before[uuid] - nvml_after[uuid], "max(torch_peak_reserved, nvml_free_drop)"
        else:
            drop = self.cuda_before - torch.cuda.mem_get_info(self.device)[0]
            method = "max(torch_peak_reserved, cuda_free_drop_after_context)"
        return math.ceil(max(peak, drop) / 2**20), method


def _nvml_free() -> dict[str, int] | None:
    """Free bytes per GPU, by UUID as torch spells it; None where NVML cannot be read."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML (library or bindings): measure another way
        return None
    try:
        free = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            free[uuid.removeprefix("GPU-")] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        return free
    except Exception:  # noqa: BLE001 - a device NVML cannot read: measure another way
        return None
    finally:
        pynvml.nvmlShutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        os.environ.get(env.LOG_LEVEL, "INFO").upper(),
        "%(asctime)s %(levelname)s wanwu-worker %(name)s: %(message)s",
        sys.stderr,
    )
    if args.mode == "predict" and not 1 <= args.top_k <= 1000:
        print(f"wanwu-worker: --top-k is {args.top_k}; expected 1..1000", file=sys.stderr)
        return 2
    if args.preprocess_threads < 0:
        print(
            f"wanwu-worker: --preprocess-threads is {args.preprocess_threads}; expected 0 (automatic) or more",
            file=sys.stderr,
        )
        return 2
    listen: dict[str, Any] = {}
    if args.mode == "serve" and args.listen:
        from .server import parse_listen, read_secret

        if not args.secret_file:
            print("wanwu-worker: --listen needs --secret-file (WANWU_SECRET_FILE)", file=sys.stderr)
            return 2
        try:
            listen = {"listen": parse_listen(args.listen), "secret": read_secret(args.secret_file)}
        except ValueError as exc:
            print(f"wanwu-worker: {exc}", file=sys.stderr)
            return 2
    # torch is imported only now, so --help and argument errors are instant.
    from .predictor import Predictor

    # What a stem cell and a worker started for its model both run with.
    runtime = {
        "device": args.device,
        "max_pixels": args.max_pixels,
        "threads": args.threads,
        "preprocess_threads": args.preprocess_threads,
    }
    if args.mode == "serve" and args.stem:
        from .server import serve
        from .stem import Stem

        try:
            stem = Stem(args.models_root, **runtime)
        except WorkerError as exc:
            print(json.dumps({"error": exc.to_json()}, ensure_ascii=False), file=sys.stderr)
            return 2
        serve(None, args.socket, args.max_body, stem=stem, **listen)
        return 0

    if args.mode == "check":
        return run_check(args.model or default_model_dir(), runtime)
    try:
        bundle = load_bundle(args.model or default_model_dir())
        predictor = Predictor(bundle, **runtime)
    except WorkerError as exc:
        print(json.dumps({"error": exc.to_json()}, ensure_ascii=False), file=sys.stderr)
        return 2
    if args.mode == "predict":
        return run_predict(predictor, args.files, args.top_k)
    from .server import serve

    serve(predictor, args.socket, args.max_body, **listen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
