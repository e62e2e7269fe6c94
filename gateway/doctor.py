"""``wanwu doctor``: check what the configured backend needs (the engine and the image,
or the worker interpreter and the limits), the models, NVML and the socket directory,
and say how to fix each problem."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scheduler.assembly import build_backend
from scheduler.backends.base import WORKER_UID, BuiltinBackend, prepare_private_dir
from scheduler.errors import BackendUnavailable, WanwuError
from scheduler.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(config: str | None = None) -> list[Check]:
    try:
        settings = Settings.load(config_file=config)
    except WanwuError as exc:
        return [Check("settings", False, str(exc), "correct the setting named above")]
    checks = [
        Check("settings", True, f"N={settings.max_workers}, TTL={settings.idle_ttl_s:g} s, pool {settings.pool_id}")
    ]
    try:
        backend = build_backend(settings)
    except WanwuError as exc:
        return [*checks, Check("backend", False, str(exc), "set WANWU_BACKEND to docker, process or swarm")]
    try:
        backend_checks = _backend(settings, backend)
        checks += backend_checks
        checks.append(_models(settings, provider_ok=all(c.ok for c in backend_checks)))
        checks.append(_gpus(settings, backend))
        if settings.backend != "swarm":  # swarm workers are reached over the network
            checks.append(_socket_dir(settings))
        if settings.stem_cells:
            checks.append(_stem_cells(backend, settings.models_dir))
    finally:
        backend.close()
    return checks


def _stem_cells(backend: BuiltinBackend, models_dir: Path) -> Check:
    """Stem cells reach bundles through the models directory, as the worker user."""
    problem = backend.stem_problem(models_dir)
    if problem:
        return Check("stem cells", False, f"{problem}: misses start whole workers", f"chmod o+x {models_dir}")
    return Check("stem cells", True, f"{models_dir} is readable by stem cells")


NAMES = {
    "docker": "docker engine",
    "image": "worker image",
    "worker_python": "worker python",
    "limits": "worker limits",
    "swarm": "swarm manager",
    "network": "worker network",
}
FIXES = {
    "docker": "run deploy/ensure-docker.sh (or start Docker), and check you may use /var/run/docker.sock",
    "image": "run `make image` or `wanwu image build`",
    "worker_python": "set WANWU_WORKER_PYTHON to an interpreter with torch and pillow (pip install torch pillow)",
    "limits": "",
    "swarm": "point DOCKER_HOST at a swarm manager's engine (deploy/swarm/README.md)",
    "network": "deploy deploy/swarm/stack.yml, or: docker network create --driver overlay --internal wanwu-workers",
}


def _backend(settings: Settings, backend: BuiltinBackend) -> list[Check]:
    """What the configured backend needs, as its readiness reports it."""
    found = backend.readiness()
    if settings.backend == "docker":
        found.setdefault("image", (False, f"{settings.worker_image}: cannot check without an engine"))
    head = Check("backend", True, settings.backend)
    return [head, *(Check(NAMES.get(key, key), ok, detail, FIXES.get(key, "")) for key, (ok, detail) in found.items())]


def _models(settings: Settings, provider_ok: bool) -> Check:
    from scheduler.models import ModelCatalog

    catalog = ModelCatalog(settings.models_dir)
    names = [m.name for m in catalog.all()]
    if settings.default_model in names:
        bad = f"; invalid: {', '.join(catalog.problems)}" if catalog.problems else ""
        return Check("models", True, f"{settings.models_dir}: {', '.join(names)}{bad}")
    problem = catalog.problems.get(settings.default_model)
    how = "copies it from the image" if settings.backend != "process" else "trains it (about a minute)"
    if problem is None and provider_ok:
        detail = f"{settings.default_model} is not in {settings.models_dir} yet; `wanwu serve` {how}"
        return Check("models", True, detail)
    return Check(
        "models",
        False,
        problem or f"no bundle {settings.default_model!r} in {settings.models_dir}",
        "put the bundle there, or fix the checks above so `wanwu serve` can provide the demo model",
    )


def _gpus(settings: Settings, backend: BuiltinBackend) -> Check:
    from scheduler.assembly import gpu_reader
    from scheduler.gpu import GpuMonitor

    if not settings.gpus:
        return Check("gpus", True, "none configured (WANWU_GPUS empty): workers run on the CPU")
    try:
        _, reader = gpu_reader(backend, settings)
        readings = reader.readings()
    except WanwuError as exc:
        return Check("gpus", False, str(exc), "fix the backend check above")
    if not readings:
        gpus = ",".join(settings.gpus)
        if isinstance(reader, GpuMonitor):
            fix = "install the NVIDIA driver and nvidia-container-toolkit, or clear WANWU_GPUS"
            return Check("gpus", False, f"WANWU_GPUS={gpus} but NVML gives no readings", fix)
        fix = "docker node update --label-add wanwu.gpu-memory-mb=MB NODE (deploy/swarm/README.md)"
        return Check("gpus", False, f"WANWU_GPUS={gpus}: no GPU on a ready node labelled wanwu.gpu-memory-mb", fix)
    return Check("gpus", True, ", ".join(f"GPU {r.device}: {r.used_mb:.0f}/{r.total_mb:.0f} MB" for r in readings))


def _socket_dir(settings: Settings) -> Check:
    """The socket directory is the gateway's own and private (``prepare_private_dir``)."""
    path = settings.socket_dir
    try:
        prepare_private_dir(path)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except BackendUnavailable as exc:
        return Check("socket dir", False, str(exc), "set WANWU_SOCKET_DIR to a directory only the gateway's user owns")
    except OSError as exc:
        return Check("socket dir", False, f"{path}: {exc.strerror}", "set WANWU_SOCKET_DIR to a writable, short path")
    user = settings.worker_user if settings.backend == "process" else ""
    if os.geteuid() != 0 or user == "gateway":
        mode = "mode 0700, the gateway's; workers run as the gateway's user"
    else:
        mode = f"mode 0700, the gateway's; workers run as uid {user or WORKER_UID}, each in its own 0700 directory"
    return Check("socket dir", True, f"{path} ({mode})")
