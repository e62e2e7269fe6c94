"""Model runtimes, one per bundle format: each loads the bundle's model file onto a torch
device and gives back a ``Model``, a callable from a float batch (N, 3, H, W) on that
device to a tensor (N, K) on it.

- ``torchscript`` (model.pt): ``torch.jit.load``.
- ``export`` (model.pt2): a ``torch.export`` program, its graph moved to the device.
- ``onnx`` (model.onnx): an onnxruntime session (CUDA, then CPU, on a GPU), fed numpy.
  onnxruntime is imported only for an ONNX bundle, so the others never pay for it, and
  by a stem cell while it waits (``prime_onnxruntime``), before it knows its model.

A model whose output is (N, K, 1, 1) and the like is flattened to (N, K); any other
shape is a BundleError naming it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bundle import Bundle, check_model_file
from .errors import BundleError

log = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]

_ort_dlls_preloaded = False


def load_model(bundle: Bundle, device: torch.device, dtype: torch.dtype) -> Model:
    """Load ``bundle``'s model file for ``device`` with weights in ``dtype`` (the ONNX
    runtime keeps the types the file declares). Raises BundleError naming the file."""
    loaders: dict[str, Callable[[Path, torch.device, torch.dtype], Model]] = {
        "torchscript": _torchscript,
        "export": _export,
        "onnx": _onnx,
    }
    # The runtimes open the file by its path: check again, just before, that neither it
    # nor a file beside it (ONNX external weights) became a link out of the bundle.
    check_model_file(bundle)
    return loaders[bundle.format](bundle.model_file, device, dtype)


def as_matrix(out: object, model_file: Path) -> torch.Tensor:
    """A model's output as (N, K): trailing dimensions of size 1 are dropped."""
    if not isinstance(out, torch.Tensor):
        raise BundleError(f"{model_file}: output is a {type(out).__name__}; expected a tensor [batch, outputs]")
    if out.dim() > 2 and all(size == 1 for size in out.shape[2:]):
        out = out.flatten(1)
    if out.dim() != 2:
        raise BundleError(f"{model_file}: output is {list(out.shape)}; expected [batch, outputs]")
    return out


def check_batch(model: Model, bundle: Bundle, device: torch.device, dtype: torch.dtype) -> None:
    """With batching, a batch of 2 must run and give 2 rows: a model exported for a fixed
    batch of 1 fails here, at load, rather than on the first batch served."""
    size = bundle.batching.max_batch_size if bundle.batching is not None else 1
    if size < 2:
        return
    fixed = getattr(model, "fixed_batch", None)
    hint = f"export it with a dynamic batch dimension, or remove 'batching' (max_batch_size {size}) from model.json"
    if isinstance(fixed, int):
        raise BundleError(f"{bundle.model_file}: the model takes a fixed batch of {fixed}; {hint}")
    dummy = torch.zeros((2, *bundle.input_size), dtype=dtype, device=device)
    try:
        with torch.inference_mode():
            rows = model(dummy).shape[0]
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"{bundle.model_file}: a batch of 2 failed ({type(exc).__name__}: {exc}); {hint}") from exc
    if rows != 2:
        raise BundleError(f"{bundle.model_file}: a batch of 2 gave {rows} rows; {hint}")


class TorchModel:
    """A torch module (TorchScript or a torch.export graph) as a ``Model``."""

    def __init__(self, module: Callable[[torch.Tensor], Any], model_file: Path) -> None:
        self.module = module
        self.model_file = model_file

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return as_matrix(self.module(batch), self.model_file)


def _torchscript(path: Path, device: torch.device, dtype: torch.dtype) -> Model:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable TorchScript archive: {exc}") from exc
    module.eval()
    return TorchModel(module.to(dtype=dtype), path)


def _export(path: Path, device: torch.device, dtype: torch.dtype) -> Model:
    from torch.export.passes import move_to_device_pass

    try:
        program = torch.export.load(str(path))
        if device.type != "cpu":  # devices named inside the graph move too, not only weights
            program = move_to_device_pass(program, device)
        module = program.module()
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable torch.export program: {exc}") from exc
    # An exported graph is already in inference form; its module refuses .eval().
    return TorchModel(module.to(device=device, dtype=dtype), path)


class OnnxModel:
    """An onnxruntime session as a ``Model``: the batch goes in as numpy (float32, or
    float16 where the model's input is), the first output comes back as a tensor on the
    torch device."""

    def __init__(self, session: Any, model_file: Path, device: torch.device) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise BundleError(f"{model_file}: the model has {len(inputs)} inputs ({names}); expected one image batch")
        self.session = session
        self.model_file = model_file
        self.device = device
        self.input_name: str = inputs[0].name
        self.input_dtype = torch.float16 if inputs[0].type == "tensor(float16)" else torch.float32
        shape = inputs[0].shape
        # A number, not a name, is a batch size fixed at export.
        self.fixed_batch: int | None = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        feed = batch.detach().to("cpu", self.input_dtype).contiguous().numpy()
        out = self.session.run(None, {self.input_name: feed})[0]
        return as_matrix(torch.from_numpy(out).to(self.device), self.model_file)


def _onnx(path: Path, device: torch.device, dtype: torch.dtype) -> Model:
    del dtype  # the file fixes its types
    if device.type == "cuda":
        _preload_cuda_libraries()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as --threads set it for torch
    options.inter_op_num_threads = 1
    # Requests are rare and small: idle threads should sleep, not spin for the next one.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise BundleError(f"{path}: not a loadable ONNX model: {exc}") from exc
    if device.type == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # Serving a GPU's share of traffic from the CPU, silently, is worse than not starting.
        raise BundleError(
            f"{path}: onnxruntime {ort.__version__} cannot use the GPU here (providers: "
            f"{', '.join(ort.get_available_providers())}); the cuda image has onnxruntime-gpu, "
            "or set WANWU_DEVICE=cpu"
        )
    return OnnxModel(session, path, device)


# The smallest ONNX model: one Relu on a float tensor of shape [1] (IR version 8, opset 13),
# as onnx.helper serialises it (tests/unit/test_runtimes.py rebuilds it). A stem cell makes
# a session of it while it waits, so the library is loaded and onnxruntime's environment
# and CPU kernel registry exist before the first real model's load.
PRIMER_ONNX = (
    b'\x08\x08:3\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x01pZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n'
    b"\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


def prime_onnxruntime(device: torch.device) -> bool:
    """Import onnxruntime and run a one-node session on the CPU: what every ONNX load
    would otherwise pay first (about 0.1 s on 2 CPU cores, most of it loading the
    library). On a GPU the CUDA provider is still set up by the first real load (not
    measured: no GPU was at hand). False where onnxruntime is missing or fails here: a
    stem cell must still serve torch bundles, and an ONNX load then reports the error."""
    try:
        import onnxruntime as ort

        if device.type == "cuda":
            _preload_cuda_libraries()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(PRIMER_ONNX, sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": torch.zeros(1).numpy()})
    except ImportError:
        return False
    except Exception as exc:  # noqa: BLE001 - a broken install must not take the stem cell down
        log.warning("onnxruntime could not be primed (%s: %s); ONNX loads will pay for it", type(exc).__name__, exc)
        return False
    return True


def providers(model: Model) -> list[str] | None:
    """The onnxruntime execution providers an ONNX model runs on, best first; None for torch."""
    session = getattr(model, "session", None)
    return list(session.get_providers()) if session is not None else None


def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA and cuDNN libraries torch's wheels bring. Called
    after torch is imported (this module imports it); prints go to stderr, where they
    cannot mix with a mode's JSON on stdout."""
    global _ort_dlls_preloaded
    if _ort_dlls_preloaded:
        return
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                preload()
        except Exception as exc:  # noqa: BLE001 - the session reports what is then missing
            log.warning("onnxruntime.preload_dlls failed: %s", exc)
    _ort_dlls_preloaded = True
