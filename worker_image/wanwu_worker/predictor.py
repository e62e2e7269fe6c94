"""Load a bundle's model once (any format, through ``runtimes``) and answer images with
it, one at a time (``predict``) or many in one forward pass (``predict_batch``): a
classify model answers its top labels and scores (and, for labels a request names, the
model's raw outputs), an embed model an L2-normalised feature vector."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .bundle import Bundle
from .errors import BundleError, InferenceError, InputError
from .preprocess import DEFAULT_MAX_PIXELS, decode, normalise, resize_and_crop, to_pixels
from .runtimes import Model, check_batch, load_model, providers

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
TOP_GROUPS = 3  # coarse groups an answer carries, best first
MAX_PREPROCESS_THREADS = 4


def _ms(start: float) -> float:
    return _round_ms(time.perf_counter() - start)


def _round_ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or, by default, the first GPU if CUDA
    works, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BundleError(f"device {requested!r} was asked for but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    # A GPU was handed to this worker (CUDA_VISIBLE_DEVICES) but torch cannot use it: a
    # CPU build of torch, or no driver. Serving on the CPU works but is not what was meant.
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning(
            "GPU %s was given to this worker but torch %s cannot use it (CUDA build: %s): serving on the CPU",
            os.environ["CUDA_VISIBLE_DEVICES"],
            torch.__version__,
            torch.version.cuda or "no",
        )
    return torch.device("cpu")


def default_preprocess_threads() -> int:
    """Threads that decode a batch's images: the CPUs this process may run on, at most
    MAX_PREPROCESS_THREADS (Pillow releases the GIL while it decodes and resizes)."""
    return max(1, min(MAX_PREPROCESS_THREADS, len(os.sched_getaffinity(0))))


def parse_top_k(raw: str | None, default: int = 5) -> int:
    """Parse the ``top_k`` query parameter: an integer from 1 to MAX_TOP_K."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"top_k is {raw!r}; expected an integer from 1 to {MAX_TOP_K}", code="bad_parameter") from None
    if not 1 <= value <= MAX_TOP_K:
        raise InputError(f"top_k is {value}; expected an integer from 1 to {MAX_TOP_K}", code="bad_parameter")
    return value


@dataclass(frozen=True)
class Prediction:
    """``predict``'s answer. ``result`` is the image's entry, shaped like one of
    ``predict_batch``'s: ``{"predictions": [...]}``, with ``"logits"`` when the request
    named labels (classify), or ``{"embedding": [...], "dim": D}`` (embed)."""

    result: dict[str, Any]
    timing_ms: dict[str, float]

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """The top labels and scores; empty for an embed model."""
        predictions: list[dict[str, Any]] = self.result.get("predictions", [])
        return predictions


@dataclass(frozen=True)
class BatchPrediction:
    """``predict_batch``'s answer: one entry per image, in order, either the image's
    result (as ``Prediction.result``) or ``{"error": {"code", "message"}}``. ``timing_ms`` has
    decode, preprocess, inference and total (ms), ``batch`` (images) and ``failed``
    (images answered with an error)."""

    results: list[dict[str, Any]]
    timing_ms: dict[str, float]


@dataclass(frozen=True)
class _Prepared:
    """One decoded, resized and cropped image, not yet normalised."""

    pixels: torch.Tensor  # uint8, (H, W, 3)
    decode_s: float
    preprocess_s: float


class Predictor:
    """One loaded model. ``predict`` and ``predict_batch`` are safe to call from several
    threads: the model runs one forward pass at a time, decoding and preprocessing run
    outside the lock (a batch's images side by side on a small thread pool).
    ``outputs`` is the model's output width: its classes, or its embedding's size."""

    def __init__(
        self,
        bundle: Bundle,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        preprocess_threads: int | None = None,
    ) -> None:
        if threads:
            # One request is one small image: intra-op threads mostly wait to be woken,
            # and workers running side by side would fight over the cores.
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.device = choose_device(device)
        # fp16 only pays (and is only well supported) on a GPU; on the CPU run fp32.
        self.precision = "fp16" if bundle.precision == "fp16" and self.device.type == "cuda" else "fp32"
        if bundle.precision != self.precision:
            log.warning(
                "model %s asks for %s; running %s on %s", bundle.name, bundle.precision, self.precision, self.device
            )
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._mean = torch.tensor(bundle.mean, device=self.device)
        self._std = torch.tensor(bundle.std, device=self.device)
        self._lock = threading.Lock()
        self._columns_by_label = {label: i for i, label in enumerate(bundle.labels)}
        self._group_names = tuple(bundle.groups)
        self._group_matrix = self._membership() if bundle.groups else None
        self.preprocess_threads = preprocess_threads or default_preprocess_threads()
        self._pool = ThreadPoolExecutor(self.preprocess_threads, thread_name_prefix="wanwu-preprocess")
        self.requests = 0  # images answered
        started = time.perf_counter()
        self.model: Model = load_model(bundle, self.device, self._dtype)
        self.load_ms = _ms(started)
        started = time.perf_counter()
        self.outputs = self._check_output()
        check_batch(self.model, bundle, self.device, self._dtype)
        self._warm_up()
        self.warmup_ms = _ms(started)

    def _check_output(self) -> int:
        """The warm-up pass: runs the model once so the first real request does not pay
        for lazy initialisation, and checks the output matches labels.txt (classify) or
        embedding_dim (embed). Returns the output's width."""
        bundle = self.bundle
        dummy = torch.zeros((1, *bundle.input_size), dtype=self._dtype, device=self.device)
        try:
            with torch.inference_mode():
                out = self.model(dummy)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(
                f"{bundle.model_file}: warm-up forward pass on input {list(dummy.shape)} failed: {exc}"
            ) from exc
        if out.shape[0] != 1:
            raise BundleError(f"{bundle.model_file}: output is {list(out.shape)} for one image; expected [1, outputs]")
        width = int(out.shape[1])
        if bundle.task == "classify" and width != len(bundle.labels):
            raise BundleError(
                f"{bundle.path / 'labels.txt'}: has {len(bundle.labels)} labels "
                f"but {bundle.model_file.name} outputs {width} classes"
            )
        if bundle.task == "embed" and bundle.embedding_dim is not None and width != bundle.embedding_dim:
            raise BundleError(
                f"{bundle.path / 'model.json'}: field 'embedding_dim' is {bundle.embedding_dim} "
                f"but {bundle.model_file.name} outputs {width} values"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return width

    def _membership(self) -> torch.Tensor:
        """(classes, groups): 1 where a class belongs to a group, so probabilities times
        it are the groups' scores (the sum of their members')."""
        matrix = torch.zeros((len(self.bundle.labels), len(self._group_names)))
        for column, members in enumerate(self.bundle.groups.values()):
            for label in members:
                matrix[self._columns_by_label[label], column] = 1.0
        return matrix.to(self.device)

    @property
    def max_batch_size(self) -> int:
        """Images one ``/predict_batch`` may carry: the bundle's batching limit, else 1."""
        return self.bundle.batching.max_batch_size if self.bundle.batching is not None else 1

    def _warm_up(self) -> None:
        """Run whole requests (JPEG and PNG) before serving: Pillow imports decoders on
        first use, and TorchScript optimises its graph on the first runs, which made the
        first real request after a cold start ten times slower than the next.

        With batching, also run batches of 2 and, for the torch formats, of the largest
        size: the first batch pays for the batched kernels' set-up (oneDNN on the CPU,
        where one image takes another path) and the largest for growing the allocator;
        on a GPU, TorchScript's fuser also specialises on the first shapes it sees.
        Every size in between is then about as fast on its first run as later (on 2 CPU
        cores, sizes 3 and 7 were 2-3 times slower on their first run without this).

        An ONNX model on the CPU needs one pass of each: onnxruntime optimises its graph
        when the session is made, not on the first runs, and the largest batch only
        grows its arena. For the general model on one thread the two passes of 16 cost
        0.5 s of every cold start, to spare the first full batch 0.07-0.14 s (it takes
        0.33-0.41 s against 0.26-0.30 s for the next, 2 CPU cores): a cold start waits
        for the warm-up, a batch can wait. On a GPU the CUDA provider searches cuDNN's
        algorithms for each new shape, so there the largest batch is still warmed."""
        onnx = self.bundle.format == "onnx" and self.device.type == "cpu"
        passes, batch_passes = (1, 1) if onnx else (3, 2)
        side = max(self.bundle.resize, *self.bundle.crop)
        picture = Image.new("RGB", (side + side // 3, side), (90, 140, 200))
        samples = []
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            picture.save(buffer, fmt)
            samples.append(buffer.getvalue())
        for _ in range(passes):
            for data in samples:
                self.predict(data, 1)
        sizes = {min(2, self.max_batch_size)} if onnx else {min(2, self.max_batch_size), self.max_batch_size}
        for size in sorted(sizes - {1}):
            for _ in range(batch_passes):
                self.predict_batch([samples[i % len(samples)] for i in range(size)], 1)
        self.requests = 0

    def gpu_memory_mb(self) -> float | None:
        """GPU memory this process holds through PyTorch's allocator; None on the CPU,
        and for ONNX, whose memory onnxruntime allocates outside it (the pool then
        keeps the bundle's estimate rather than a figure far too low)."""
        if self.device.type != "cuda" or self.bundle.format == "onnx":
            return None
        return round(torch.cuda.memory_reserved(self.device) / 2**20, 1)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ready",
            "model": self.bundle.name,
            "task": self.bundle.task,
            "format": self.bundle.format,
            "embedding_dim": self.outputs if self.bundle.task == "embed" else None,
            "device": str(self.device),
            "precision": self.precision,
            "providers": providers(self.model),
            "gpu_memory_mb": self.gpu_memory_mb(),
            "labels": len(self.bundle.labels),
            "max_batch_size": self.max_batch_size,
            "load_ms": self.load_ms,
            "warmup_ms": self.warmup_ms,
            "requests": self.requests,
            "threads": torch.get_num_threads(),
            "preprocess_threads": self.preprocess_threads,
            "pid": os.getpid(),
        }

    def predict(self, data: bytes, top_k: int = 5, labels: tuple[str, ...] | None = None) -> Prediction:
        """Answer one encoded image: its top ``top_k`` labels and, for ``labels``, the
        model's raw outputs (classify), or its embedding (embed). Raises InputError for
        bad images and labels, InferenceError if the model itself fails."""
        total = time.perf_counter()
        columns = self._columns(labels)
        prepared = self._prepare(data)
        [result], inference_ms = self._infer(prepared.pixels.unsqueeze(0), top_k, columns)
        timing = {
            "decode": _round_ms(prepared.decode_s),
            "preprocess": _round_ms(prepared.preprocess_s),
            "inference": inference_ms,
            "total": _ms(total),
        }
        return Prediction(result, timing)

    def predict_batch(
        self, images: list[bytes], top_k: int = 5, labels: tuple[str, ...] | None = None
    ) -> BatchPrediction:
        """Answer several encoded images in one forward pass, each as ``predict`` would.
        An image that cannot be decoded gets its own error entry and does not affect the
        others; raises InputError for bad labels, InferenceError if the model itself fails."""
        total = time.perf_counter()
        columns = self._columns(labels)
        if len(images) > 1:
            prepared = list(self._pool.map(self._prepare_or_error, images))
        else:
            prepared = [self._prepare_or_error(data) for data in images]
        prepare_ms = _ms(total)
        good = [p for p in prepared if isinstance(p, _Prepared)]
        answers: list[dict[str, Any]] = []
        inference_ms = 0.0
        if good:
            answers, inference_ms = self._infer(torch.stack([p.pixels for p in good]), top_k, columns)
        answered = iter(answers)
        results = [next(answered) if isinstance(p, _Prepared) else {"error": p} for p in prepared]
        # The images were decoded side by side: split the wall-clock time between the two
        # stages in proportion to the time the images spent in each.
        decode_s = sum(p.decode_s for p in good)
        work_s = decode_s + sum(p.preprocess_s for p in good)
        decode_ms = round(prepare_ms * decode_s / work_s, 3) if work_s else prepare_ms
        timing = {
            "decode": decode_ms,
            "preprocess": round(prepare_ms - decode_ms, 3),
            "inference": inference_ms,
            "total": _ms(total),
            "batch": len(images),
            "failed": len(images) - len(good),
        }
        return BatchPrediction(results, timing)

    def _prepare(self, data: bytes) -> _Prepared:
        """Decode one image and cut it to the model's input size. Raises InputError."""
        bundle = self.bundle
        started = time.perf_counter()
        image = decode(data, self.max_pixels, draft=(bundle.resize, bundle.resize))
        decoded = time.perf_counter()
        pixels = to_pixels(resize_and_crop(image, bundle.resize, bundle.crop))
        return _Prepared(pixels, decoded - started, time.perf_counter() - decoded)

    def _prepare_or_error(self, data: bytes) -> _Prepared | dict[str, str]:
        """``_prepare``, with a bad image's error as its batch entry."""
        try:
            return self._prepare(data)
        except InputError as exc:
            return exc.to_json()
        except Exception as exc:  # one image must not fail the others
            log.exception("decoding one image of a batch failed unexpectedly")
            return {"code": "corrupt_image", "message": f"image could not be decoded: {type(exc).__name__}: {exc}"}

    def _columns(self, labels: tuple[str, ...] | None) -> list[int] | None:
        """The output columns of the labels a request names, in its order; None when it
        names none. Raises InputError (bad_parameter) for an embed model, an unknown or
        repeated label, or more labels than the model has."""
        if not labels:
            return None
        bundle = self.bundle
        if bundle.task != "classify":
            raise InputError(f"model {bundle.name} answers embeddings; it takes no labels", code="bad_parameter")
        if len(labels) > len(bundle.labels):
            raise InputError(
                f"{len(labels)} labels named; model {bundle.name} has {len(bundle.labels)}", code="bad_parameter"
            )
        columns = []
        for label in labels:
            if label not in self._columns_by_label:
                raise InputError(f"label {label!r} is not one of model {bundle.name}'s labels", code="bad_parameter")
            columns.append(self._columns_by_label[label])
        if len(set(columns)) != len(columns):
            repeated = next(label for label in labels if labels.count(label) > 1)
            raise InputError(f"label {repeated!r} is named more than once", code="bad_parameter")
        return columns

    def _infer(self, pixels: torch.Tensor, top_k: int, columns: list[int] | None) -> tuple[list[dict[str, Any]], float]:
        """Run uint8 pixels (N, H, W, 3) through the model in one forward pass; return
        each image's result (``Prediction.result``) and the pass's milliseconds."""
        embed = self.bundle.task == "embed"
        k = min(top_k, len(self.bundle.labels))
        logits: list[list[float]] | None = None
        groups: tuple[list[list[float]], list[list[int]]] | None = None
        with self._lock:
            started = time.perf_counter()
            try:
                batch = normalise(pixels.to(self.device, non_blocking=True), self._mean, self._std)
                if len(batch) == 1:
                    # Stacked HWC pixels are channels-last, which oneDNN runs over twice as
                    # fast for a batch on the CPU; one image keeps the plain layout it has
                    # always had, so predict's scores stay exactly what they were.
                    batch = batch.contiguous()
                with torch.inference_mode():
                    out = self.model(batch.to(dtype=self._dtype)).float()
                    if embed:
                        values = torch.nn.functional.normalize(out, dim=1).tolist()
                    else:
                        probabilities = torch.softmax(out, dim=1)
                        top = torch.topk(probabilities, k, dim=1)
                        values, indices = top.values.tolist(), top.indices.tolist()
                        if columns is not None:
                            logits = out[:, columns].tolist()
                        if self._group_matrix is not None:
                            scores = probabilities @ self._group_matrix
                            best = torch.topk(scores, min(TOP_GROUPS, scores.shape[1]), dim=1)
                            groups = (best.values.tolist(), best.indices.tolist())
            except Exception as exc:
                log.exception("inference failed for model %s", self.bundle.name)
                raise InferenceError(f"model {self.bundle.name} failed: {type(exc).__name__}: {exc}") from exc
            inference_ms = _ms(started)
            self.requests += len(values)
        if embed:
            return [{"embedding": row, "dim": len(row)} for row in values], inference_ms
        labels = self.bundle.labels
        answers: list[dict[str, Any]] = [
            {"predictions": [{"label": labels[i], "score": round(v, 6)} for v, i in zip(vs, ix, strict=True)]}
            for vs, ix in zip(values, indices, strict=True)
        ]
        if logits is not None:
            for answer, row in zip(answers, logits, strict=True):
                answer["logits"] = row
        if groups is not None:
            names = self._group_names
            for answer, gvs, gix in zip(answers, *groups, strict=True):
                answer["groups"] = [{"label": names[i], "score": round(v, 6)} for v, i in zip(gvs, gix, strict=True)]
        return answers, inference_ms
