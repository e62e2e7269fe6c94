"""Command line: ``python -m wanwu_worker serve|predict`` (the image's entry point)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import load_bundle
from .errors import WorkerError
from .preprocess import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from .predictor import Predictor

log = logging.getLogger("wanwu_worker")

MOUNTED_MODEL = "/model"


def default_model_dir() -> str:
    """WANWU_MODEL_DIR, else a bundle mounted at /model, else the image's built-in
    demo bundle (WANWU_BUILTIN_MODEL)."""
    explicit = os.environ.get("WANWU_MODEL_DIR")
    if explicit:
        return explicit
    if Path(MOUNTED_MODEL, "model.json").is_file():
        return MOUNTED_MODEL
    return os.environ.get("WANWU_BUILTIN_MODEL", MOUNTED_MODEL)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"wanwu-worker: {name}={raw!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanwu-worker", description="Classify images with a wanwu model bundle.")
    parser.add_argument(
        "--model", default=None, help="bundle directory (default: $WANWU_MODEL_DIR, /model, built-in demo)"
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("WANWU_DEVICE") or None,
        help="cpu, cuda or cuda:N (default: cuda if available)",
    )
    parser.add_argument("--max-pixels", type=int, default=_env_int("WANWU_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    parser.add_argument(
        "--threads",
        type=int,
        default=_env_int("WANWU_TORCH_THREADS", 1),
        help="torch intra-op threads (default 1; 0 leaves torch's own choice)",
    )
    parser.add_argument(
        "--preprocess-threads",
        type=int,
        default=_env_int("WANWU_PREPROCESS_THREADS", 0),
        help="threads decoding a batch's images (default 0: the CPUs this process may use, at most 4)",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    serve = sub.add_parser("serve", help="answer /healthz, /predict and /predict_batch on a Unix socket")
    serve.add_argument("--socket", default=os.environ.get("WANWU_SOCKET", "/run/wanwu/worker.sock"))
    serve.add_argument("--max-body", type=int, default=_env_int("WANWU_MAX_BODY_BYTES", 20 * 2**20))
    serve.add_argument(
        "--stem",
        action="store_true",
        default=os.environ.get("WANWU_STEM") == "1",
        help="start with no model (a stem cell); POST /load picks a bundle under --models-root",
    )
    serve.add_argument("--models-root", default=os.environ.get("WANWU_MODELS_ROOT", "/models"))
    predict = sub.add_parser("predict", help="classify FILEs, print one JSON line each")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("files", nargs="+", metavar="FILE")
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
            print(json.dumps({"file": name, **answer}, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def _predict_files(predictor: Predictor, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each file's answer, in order: ``{"predictions": [...]}`` or ``{"error": {...}}``."""
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
        return {"predictions": predictor.predict(data, top_k).predictions}
    except WorkerError as exc:
        return {"error": exc.to_json()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("WANWU_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s wanwu-worker %(name)s: %(message)s",
        stream=sys.stderr,
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
        serve(None, args.socket, args.max_body, stem=stem)
        return 0

    try:
        bundle = load_bundle(args.model or default_model_dir())
        predictor = Predictor(bundle, **runtime)
    except WorkerError as exc:
        print(json.dumps({"error": exc.to_json()}, ensure_ascii=False), file=sys.stderr)
        return 2
    if args.mode == "predict":
        return run_predict(predictor, args.files, args.top_k)
    from .server import serve

    serve(predictor, args.socket, args.max_body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
