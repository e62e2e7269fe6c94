"""NVML readings and in-process measurements with torch on the GPU: the CUDA context's
cost, NVML against torch's allocator, fp32 against fp16 throughput, and the ballast."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .report import GIB, MIB, compare_allocation, percentile


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Nvml:
    """One GPU through NVML (pynvml from nvidia-ml-py), named by index or UUID."""

    def __init__(self, target: str, module: ModuleType | None = None) -> None:
        self.nvml: Any = module if module is not None else importlib.import_module("pynvml")
        pynvml = self.nvml
        pynvml.nvmlInit()
        self.target = target
        if target.isdigit():
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(target))
        else:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(target)

    def memory(self) -> tuple[int, int, int]:
        """Used, total and free bytes."""
        info = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return int(info.used), int(info.total), int(info.free)

    def used_mib(self) -> float:
        return round(self.memory()[0] / MIB, 1)

    def processes(self) -> dict[int, int | None]:
        """Bytes each compute process holds on this GPU (None where NVML cannot say)."""
        out: dict[int, int | None] = {}
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            used = proc.usedGpuMemory
            out[int(proc.pid)] = None if used is None or used >= 2**63 else int(used)
        return out

    def process_mib(self, pid: int) -> float | None:
        used = self.processes().get(pid)
        return None if used is None else round(used / MIB, 1)

    def info(self) -> dict[str, Any]:
        n = self.nvml
        used, total, _ = self.memory()
        out: dict[str, Any] = {
            "nvml_target": self.target,
            "name": _text(n.nvmlDeviceGetName(self.handle)),
            "uuid": _text(n.nvmlDeviceGetUUID(self.handle)),
            "driver_version": _text(n.nvmlSystemGetDriverVersion()),
            "device_count": n.nvmlDeviceGetCount(),
            "memory_total_mib": round(total / MIB, 1),
            "memory_used_mib": round(used / MIB, 1),
        }
        version = n.nvmlSystemGetCudaDriverVersion()
        out["cuda_driver_version"] = f"{version // 1000}.{version % 1000 // 10}"
        for key, call in (
            ("nvml_version", lambda: _text(n.nvmlSystemGetNVMLVersion())),
            ("compute_capability", lambda: list(n.nvmlDeviceGetCudaComputeCapability(self.handle))),
            ("persistence_mode", lambda: n.nvmlDeviceGetPersistenceMode(self.handle)),
            ("mig_mode", lambda: n.nvmlDeviceGetMigMode(self.handle)[0]),
            ("power_limit_w", lambda: n.nvmlDeviceGetPowerManagementLimit(self.handle) / 1000),
        ):
            with contextlib.suppress(Exception):  # not every driver or GPU answers every query
                out[key] = call()
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


FAKE_NVML_DIR = Path(__file__).resolve().parent / "fake_nvml"
FAKE_NVML_ENV = "WANWU_GPU_CHECK_FAKE_NVML"


def fake_nvml(state: Path, total_mib: float = 81920, used_mib: float = 1024) -> ModuleType:
    """``--fake-gpu``: write the fake GPU's state and load the fake pynvml that reads it
    (the gateway gets the same module first on its PYTHONPATH)."""
    state.write_text(json.dumps({"total_mib": total_mib, "used_mib": used_mib}), encoding="utf-8")
    os.environ[FAKE_NVML_ENV] = str(state)
    spec = importlib.util.spec_from_file_location("wanwu_gpu_check_fake_pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def fake_ballast(state: Path, mb: int) -> Iterator[None]:
    """The fake GPU's used memory raised by ``mb`` MiB while the block runs."""

    def add(delta: int) -> None:
        data = json.loads(state.read_text(encoding="utf-8"))
        data["used_mib"] += delta
        temp = state.with_suffix(".tmp")
        temp.write_text(json.dumps(data), encoding="utf-8")
        temp.replace(state)  # readers never see half a file

    add(mb)
    try:
        yield
    finally:
        add(-mb)


@contextlib.contextmanager
def ballast(device: torch.device, mb: int) -> Iterator[None]:
    """A tensor of ``mb`` MiB on ``device``, touched so NVML counts all of it, freed
    (and torch's cache emptied) when the block ends."""
    tensor = torch.empty(mb * MIB, dtype=torch.uint8, device=device)
    tensor.fill_(1)
    _sync(device)
    try:
        yield
    finally:
        del tensor
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_and_allocations(nvml: Nvml, device: torch.device, sizes_gib: Sequence[float]) -> dict[str, Any]:
    """Make this process's CUDA context, then allocate ``sizes_gib`` one at a time, and
    compare NVML's view (device used memory, this process's memory) with torch's
    allocator. Must run before anything else in this process touches CUDA."""
    pid = os.getpid()
    before_used = nvml.memory()[0]
    own_before = nvml.processes().get(pid)
    started = time.perf_counter()
    torch.cuda.init()  # type: ignore[no-untyped-call]
    torch.zeros(1, device=device)
    _sync(device)
    context_s = time.perf_counter() - started
    after_used = nvml.memory()[0]
    own = nvml.processes().get(pid)
    reserved = torch.cuda.memory_reserved(device)
    free_cuda, total_cuda = torch.cuda.mem_get_info(device)
    out: dict[str, Any] = {
        "torch_device_name": torch.cuda.get_device_name(device),
        "context_s": round(context_s, 3),
        "own_process_before_mib": None if own_before is None else round(own_before / MIB, 1),
        "own_process_after_mib": None if own is None else round(own / MIB, 1),
        "nvml_used_delta_mib": round((after_used - before_used) / MIB, 1),
        "torch_reserved_after_first_tensor_mib": round(reserved / MIB, 1),
        # Where NVML cannot attribute memory to processes (some containers), the device's delta.
        "context_overhead_mib": round(((own if own is not None else after_used - before_used) - reserved) / MIB, 1),
        "context_overhead_from": "this process (NVML)" if own is not None else "device used delta (NVML)",
        "cuda_mem_get_info": {"free_mib": round(free_cuda / MIB, 1), "total_mib": round(total_cuda / MIB, 1)},
        "nvml_memory_after": {"used_mib": round(after_used / MIB, 1)},
        "lazy_loading": os.environ.get("CUDA_MODULE_LOADING", "(default: LAZY)"),
        "allocations": [],
    }
    for size in sizes_gib:
        out["allocations"].append(_one_allocation(nvml, device, int(size * GIB), f"{size:g} GiB"))
    out["allocations"].append(_many_small(nvml, device, count=1024, each=MIB + 4096))
    return out


def _one_allocation(nvml: Nvml, device: torch.device, size: int, label: str) -> dict[str, Any]:
    used, _, free = nvml.memory()
    if size > free - 2 * GIB:
        return {"label": label, "skipped": f"only {free / GIB:.1f} GiB free"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base_alloc, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    started = time.perf_counter()
    tensor = torch.empty(size, dtype=torch.uint8, device=device)
    tensor.fill_(1)  # touched, so no lazy mapping can hide it
    _sync(device)
    alloc_ms = (time.perf_counter() - started) * 1000
    after = nvml.memory()[0]
    row: dict[str, Any] = {"label": label}
    row.update(
        compare_allocation(
            size,
            used,
            after,
            torch.cuda.memory_allocated(device) - base_alloc,
            torch.cuda.memory_reserved(device) - base_reserved,
        )
    )
    row["alloc_and_fill_ms"] = round(alloc_ms, 2)
    del tensor
    torch.cuda.empty_cache()
    _sync(device)
    row["nvml_after_free_delta_mib"] = round((nvml.memory()[0] - used) / MIB, 1)
    return row


def _many_small(nvml: Nvml, device: torch.device, count: int, each: int) -> dict[str, Any]:
    """Many tensors a little over 1 MiB: torch rounds each up and carves them from
    larger segments, so reserved exceeds allocated."""
    torch.cuda.empty_cache()
    used = nvml.memory()[0]
    base_alloc, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    tensors = [torch.empty(each, dtype=torch.uint8, device=device) for _ in range(count)]
    _sync(device)
    row: dict[str, Any] = {"label": f"{count} x {each} B"}
    row.update(
        compare_allocation(
            count * each,
            used,
            nvml.memory()[0],
            torch.cuda.memory_allocated(device) - base_alloc,
            torch.cuda.memory_reserved(device) - base_reserved,
        )
    )
    del tensors
    torch.cuda.empty_cache()
    return row


def load_script(model_file: Path, device: torch.device) -> torch.jit.ScriptModule:
    """A bundle's TorchScript model in eval mode on ``device``, as the worker loads it."""
    model: torch.jit.ScriptModule = torch.jit.load(str(model_file), map_location=device)  # type: ignore[no-untyped-call]
    model.eval()
    return model


def throughput(
    model_file: Path,
    device: torch.device,
    dtype: torch.dtype,
    input_size: int,
    batches: Sequence[int],
    min_seconds: float = 2.0,
    min_iterations: int = 5,
) -> dict[str, Any]:
    """Images per second of a bundle's TorchScript model run directly (no gateway) at
    each batch size, loaded as the worker loads it (torch.jit.load, then .to(dtype))."""
    started = time.perf_counter()
    model = load_script(model_file, device).to(dtype=dtype)
    _sync(device)
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 3), "batches": []}
    generator = torch.Generator().manual_seed(0)
    reference: torch.Tensor | None = None
    for batch in batches:
        x = torch.randn(batch, 3, input_size, input_size, generator=generator).to(device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            for _ in range(3):  # warm-up: TorchScript's profiling runs, cuDNN's choices
                y = model(x)
            _sync(device)
            times: list[float] = []
            begun = time.perf_counter()
            while len(times) < min_iterations or time.perf_counter() - begun < min_seconds:
                t = time.perf_counter()
                y = model(x)
                _sync(device)
                times.append(time.perf_counter() - t)
                if len(times) >= 10_000:
                    break
        per_batch = percentile(times, 50) or 0.0
        row: dict[str, Any] = {
            "batch": batch,
            "iterations": len(times),
            "ms_per_batch_p50": round(per_batch * 1000, 3),
            "ms_per_batch_p99": round((percentile(times, 99) or 0.0) * 1000, 3),
            "images_per_s": round(batch / per_batch, 1) if per_batch else None,
            "finite": bool(torch.isfinite(y).all()),
        }
        if device.type == "cuda":
            row["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        if reference is None:
            reference = y[:1].float().softmax(1).cpu()
            out["first_output_argmax"] = int(reference.argmax())
        out["batches"].append(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def agreement(model_file: Path, device: torch.device, input_size: int, batch: int = 8) -> dict[str, Any]:
    """How far fp16 answers are from fp32 ones for the same model and inputs."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, input_size, input_size, generator=generator).to(device)
    model = load_script(model_file, device).float()
    with torch.inference_mode():
        p32 = model(x).softmax(1)
        model = model.half()
        p16 = model(x.half()).float().softmax(1)
    return {
        "top1_agree": round(float((p32.argmax(1) == p16.argmax(1)).float().mean()), 3),
        "max_abs_softmax_diff": round(float((p32 - p16).abs().max()), 6),
        "fp16_finite": bool(torch.isfinite(p16).all()),
    }
