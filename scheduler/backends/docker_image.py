"""Build the worker image without needing a registry.

1. Base image: the one asked for; else ``python:3.11-slim`` if present; else the
   debootstrapped ``wanwu-base:bookworm`` if present; else pull ``python:3.11-slim``;
   else build ``wanwu-base:bookworm`` with ``deploy/build-base-image.sh``.
2. Wheelhouse: ``pip download`` on the host (its pip configuration and proxies apply,
   but for ``cuda`` without its find-links: see ``pip_environment``) into
   ``worker_image/wheelhouse/<flavor>``, skipped while the requirements are unchanged.
3. ``docker build`` of ``worker_image/Dockerfile`` with BASE_IMAGE and FLAVOR; the layer
   cache makes a second run take seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.utils

from ..errors import BackendUnavailable, ImageBuildError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ROOT / "worker_image"
BASE_SCRIPT = ROOT / "deploy" / "build-base-image.sh"
FLAVORS = ("cpu", "cuda")
SLIM = "python:3.11-slim"
DEBOOTSTRAPPED = "wanwu-base:bookworm"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    flavor: str
    base_image: str
    size_bytes: int
    seconds: float


def _client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except docker.errors.DockerException as exc:
        raise BackendUnavailable(f"cannot reach the Docker engine: {exc} (try deploy/ensure-docker.sh)") from exc
    return client


def _present(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def choose_base_image(client: docker.DockerClient, requested: str | None, progress: Progress) -> str:
    """Return a base image tag that is present locally, making one if need be."""
    if requested:
        if not _present(client, requested):
            progress(f"pulling {requested}")
            try:
                client.images.pull(requested)
            except docker.errors.APIError as exc:
                raise ImageBuildError(f"base image {requested} is not present and cannot be pulled: {exc}") from exc
        return requested
    for tag in (SLIM, DEBOOTSTRAPPED):
        if _present(client, tag):
            return tag
    try:
        progress(f"pulling {SLIM}")
        client.images.pull(SLIM)
        return SLIM
    except docker.errors.APIError as exc:
        progress(f"no registry ({str(exc).splitlines()[0][:120]}); building {DEBOOTSTRAPPED} with debootstrap")
    result = subprocess.run(["bash", str(BASE_SCRIPT), DEBOOTSTRAPPED], check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"{BASE_SCRIPT} failed with exit status {result.returncode}")
    return DEBOOTSTRAPPED


def pip_environment(flavor: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the flavour's ``pip download``: the host's, so its pip
    configuration and proxies apply, with one exception for ``cuda``.

    A host's find-links may hold a local CPU build of torch (``torch-2.13.0+cpu``, so
    that ``make venv`` and the cpu image take it). For ``cuda`` pip must not see it: a
    local version satisfies ``torch==2.13.0`` and ranks above the registry's plain
    2.13.0, so pip would take it and the cuda image would have no CUDA. Hence find-links
    is cleared for ``cuda``: ``PIP_FIND_LINKS`` overrides every pip configuration file,
    and pip ignores an empty value but reads a blank one as an empty list.
    ``check_wheelhouse`` makes sure that it worked."""
    env = dict(os.environ if environ is None else environ)
    if flavor == "cuda":
        env["PIP_FIND_LINKS"] = " "
    return env


def check_wheelhouse(flavor: str, wheels: Iterable[str]) -> None:
    """Raise ImageBuildError unless the wheel file names fit the flavour: ``cuda``
    needs a torch without a ``+cpu`` local version and the nvidia-* wheels of the CUDA
    runtime. (The image installs with --no-index from the whole folder, where a
    ``+cpu`` torch would win over the CUDA one.)"""
    if flavor != "cuda":
        return
    names = list(wheels)
    cpu = [name for name in names if name.startswith("torch-") and "+cpu" in name]
    if cpu:
        raise ImageBuildError(
            f"the cuda wheelhouse holds a CPU build of torch ({', '.join(cpu)}); "
            f"remove {(CONTEXT / 'wheelhouse' / flavor).relative_to(ROOT)} and build again"
        )
    if not any(name.startswith("torch-") for name in names) or not any(name.startswith("nvidia_") for name in names):
        raise ImageBuildError(
            "the cuda wheelhouse lacks torch or the nvidia-* CUDA runtime wheels: "
            "does the host's pip index serve the registry's CUDA build of torch?"
        )


def fill_wheelhouse(flavor: str, progress: Progress, extra_args: list[str] | None = None) -> Path:
    """Download the flavour's wheels (and pip's own) for CPython 3.11 on Linux x86-64
    into the wheelhouse. A hash of the requirements marks a complete download."""
    requirements = CONTEXT / f"requirements-{flavor}.txt"
    target = CONTEXT / "wheelhouse" / flavor
    stamp = target / ".requirements.sha256"
    extra = extra_args if extra_args is not None else shlex.split(os.environ.get("WANWU_PIP_DOWNLOAD_ARGS", ""))
    digest = hashlib.sha256(requirements.read_bytes() + " ".join(extra).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest:
        check_wheelhouse(flavor, (path.name for path in target.glob("*.whl")))
        return target
    target.mkdir(parents=True, exist_ok=True)
    progress(f"downloading wheels for {flavor} into {target.relative_to(ROOT)}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--dest",
        str(target),
        "-r",
        str(requirements),
        "pip",
        *extra,
    ]
    _pip(command, f"pip download for the {flavor} wheelhouse", env=pip_environment(flavor))
    check_wheelhouse(flavor, (path.name for path in target.glob("*.whl")))
    stamp.write_text(digest + "\n")
    return target


def _pip(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    """Run a pip command on the host; on failure raise with the end of its stderr."""
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-10:])
        raise ImageBuildError(f"{what} failed:\n{tail}")


def _context_tar(flavor: str) -> Any:
    """The build context: worker_image/ without other flavours' wheelhouses."""
    ignore = CONTEXT / ".dockerignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    patterns += [f"wheelhouse/{other}" for other in FLAVORS if other != flavor]
    return docker.utils.tar(str(CONTEXT), exclude=patterns, gzip=False)


def _docker_build(
    client: docker.DockerClient,
    context: Any,
    tag: str,
    buildargs: dict[str, str],
    no_cache: bool,
    say: Progress,
    dockerfile: str = "Dockerfile",
) -> None:
    """Run ``docker build`` on a context tar, reporting steps; raise ImageBuildError
    with the last lines of output if it fails."""
    say(f"building {tag} from {buildargs.get('BASE_IMAGE')}")
    try:
        stream = client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            nocache=no_cache,
            decode=True,
            buildargs=buildargs,
            dockerfile=dockerfile,
        )
        last: list[str] = []
        for chunk in stream:
            if "error" in chunk:
                raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}\n" + "".join(last[-15:]))
            line = chunk.get("stream", "")
            if line:
                last.append(line)
                if line.startswith("Step ") or "accuracy" in line:
                    say(line.rstrip())
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"docker build of {tag} failed: {exc}") from exc
    finally:
        context.close()


def build_worker_image(
    flavor: str = "cpu",
    tag: str | None = None,
    base_image: str | None = None,
    no_cache: bool = False,
    progress: Progress | None = None,
) -> BuiltImage:
    """Build ``wanwu-worker:<flavor>`` (or ``tag``); see the module docstring."""
    if flavor not in FLAVORS:
        raise ImageBuildError(f"flavour {flavor!r} is unknown; expected one of {', '.join(FLAVORS)}")
    say = progress or (lambda line: log.info("%s", line))
    tag = tag or f"wanwu-worker:{flavor}"
    started = time.monotonic()
    client = _client()
    base = choose_base_image(client, base_image, say)
    fill_wheelhouse(flavor, say)
    _docker_build(client, _context_tar(flavor), tag, {"BASE_IMAGE": base, "FLAVOR": flavor}, no_cache, say)
    image = client.images.get(tag)
    return BuiltImage(tag, flavor, base, int(image.attrs["Size"]), round(time.monotonic() - started, 1))


def build_gateway_image(
    tag: str = "wanwu-gateway:latest",
    base_image: str | None = None,
    no_cache: bool = False,
    progress: Progress | None = None,
) -> BuiltImage:
    """Build the gateway image (deploy/gateway.Dockerfile): the project's wheel and its
    dependencies, gathered on the host with ``pip wheel``, installed with --no-index."""
    say = progress or (lambda line: log.info("%s", line))
    started = time.monotonic()
    client = _client()
    base = choose_base_image(client, base_image, say)
    wheels = ROOT / "deploy" / "wheelhouse"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("wanwu-*.whl"):
        old.unlink()  # always the checkout as it is now
    say(f"building wheels for the gateway into {wheels.relative_to(ROOT)}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--disable-pip-version-check",
        "--prefer-binary",
        "--wheel-dir",
        str(wheels),
        str(ROOT),
        "pip",
    ]
    _pip(command, "pip wheel for the gateway")
    context = docker.utils.tar(str(ROOT / "deploy"), exclude=["*.service", "*.example", "*.sh"], gzip=False)
    _docker_build(client, context, tag, {"BASE_IMAGE": base}, no_cache, say, dockerfile="gateway.Dockerfile")
    image = client.images.get(tag)
    return BuiltImage(tag, "gateway", base, int(image.attrs["Size"]), round(time.monotonic() - started, 1))


BUILTIN_MODELS = "/opt/wanwu/models"


def _extract(archive: tarfile.TarFile, dest: Path) -> None:
    """Extract only plain files and directories inside ``dest``. Python 3.11.4+ has
    the "data" filter for this; Debian bookworm's 3.11.2 does not."""
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in archive.getmembers():
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
            raise ImageBuildError(f"refusing to extract {member.name!r} from the image archive")
    archive.extractall(dest)


def export_builtin_model(image: str, name: str, models_dir: Path) -> Path:
    """Copy the bundle ``name`` built into ``image`` (the demo model) to
    ``models_dir/name``, so the pool can mount it. Returns the bundle path."""
    import io
    import shutil
    import tempfile

    client = _client()
    # Named, and removed by name: a signal that lands while the engine is creating it
    # (before this process holds its id) must not leave it behind.
    container_name = f"wanwu-export-{uuid.uuid4().hex[:12]}"
    try:
        container = client.containers.create(
            image,
            command=["true"],
            name=container_name,
            network_mode="none",
            labels={"wanwu.managed": "true", "wanwu.pool": "export"},
        )
        stream, _ = container.get_archive(f"{BUILTIN_MODELS}/{name}")
        archive = b"".join(stream)
    except docker.errors.ImageNotFound as exc:
        raise ImageBuildError(f"worker image {image} is not present: run `wanwu image build`") from exc
    except docker.errors.NotFound as exc:
        raise ImageBuildError(f"image {image} has no built-in model {name!r} under {BUILTIN_MODELS}") from exc
    finally:
        try:
            client.api.remove_container(container_name, force=True)
        except docker.errors.NotFound:
            pass
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir) as staging:
        _extract(tarfile.open(fileobj=io.BytesIO(archive)), Path(staging))
        target = models_dir / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(staging) / name, target)  # appears whole or not at all
    os.chmod(target, 0o755)
    return target
