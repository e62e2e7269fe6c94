"""``wanwu doctor``: check the engine, the image, the models, NVML and the socket
directory, and say how to fix each problem."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import WanwuError
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
    docker_checks = _docker(settings)
    checks += docker_checks
    checks.append(_models(settings, image_ok=all(c.ok for c in docker_checks)))
    checks.append(_gpus(settings))
    checks.append(_socket_dir(settings.socket_dir))
    if settings.stem_cells:
        checks.append(_stem_cells(settings.models_dir))
    return checks


def _stem_cells(models_dir: Path) -> Check:
    """Stem cells reach bundles through the models directory, as the worker user."""
    from scheduler.backends.docker import stem_mount_problem

    problem = stem_mount_problem(models_dir)
    if problem:
        return Check("stem cells", False, f"{problem}: misses start whole containers", f"chmod o+x {models_dir}")
    return Check("stem cells", True, f"{models_dir} is searchable by stem cells")


def _docker(settings: Settings) -> list[Check]:
    from scheduler.backends.docker import DockerBackend

    found = DockerBackend(settings.worker_image, settings.pool_id, settings.socket_dir).readiness()
    found.setdefault("image", (False, f"{settings.worker_image}: cannot check without an engine"))
    names = {"docker": "docker engine", "image": "worker image"}
    fixes = {
        "docker": "run deploy/ensure-docker.sh (or start Docker), and check you may use /var/run/docker.sock",
        "image": "run `make image` or `wanwu image build`",
    }
    return [Check(names[name], ok, detail, fixes[name]) for name, (ok, detail) in found.items()]


def _models(settings: Settings, image_ok: bool) -> Check:
    from scheduler.models import ModelCatalog

    catalog = ModelCatalog(settings.models_dir)
    names = [m.name for m in catalog.all()]
    if settings.default_model in names:
        bad = f"; invalid: {', '.join(catalog.problems)}" if catalog.problems else ""
        return Check("models", True, f"{settings.models_dir}: {', '.join(names)}{bad}")
    problem = catalog.problems.get(settings.default_model)
    if problem is None and image_ok:
        detail = f"{settings.default_model} is not in {settings.models_dir} yet; `wanwu serve` copies it from the image"
        return Check("models", True, detail)
    return Check(
        "models",
        False,
        problem or f"no bundle {settings.default_model!r} in {settings.models_dir}",
        "put the bundle there, or build the worker image so `wanwu serve` can copy the demo model out of it",
    )


def _gpus(settings: Settings) -> Check:
    from scheduler.gpu import GpuMonitor

    if not settings.gpus:
        return Check("gpus", True, "none configured (WANWU_GPUS empty): workers run on the CPU")
    readings = GpuMonitor(settings.gpus).readings()
    if not readings:
        return Check(
            "gpus",
            False,
            f"WANWU_GPUS={','.join(settings.gpus)} but NVML gives no readings",
            "install the NVIDIA driver and nvidia-container-toolkit, or clear WANWU_GPUS",
        )
    return Check("gpus", True, ", ".join(f"GPU {r.device}: {r.used_mb:.0f}/{r.total_mb:.0f} MB" for r in readings))


def _socket_dir(path: Path) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        return Check("socket dir", False, f"{path}: {exc.strerror}", "set WANWU_SOCKET_DIR to a writable, short path")
    mode = (
        "root: worker directories are handed to uid 10001"
        if os.geteuid() == 0
        else "not root: worker directories are mode 0777"
    )
    return Check("socket dir", True, f"{path} ({mode})")
