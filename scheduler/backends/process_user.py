"""Who a process worker runs as, what it is given of the gateway's environment, and what
it may touch: under a root gateway uid 10001 (switched with ``setpriv``), which must be
able to run the worker interpreter and read its bundles but change neither; else the
gateway's own user. ``ProcessUser`` is a part of ``ProcessBackend`` (a mixin), on the
backend's own attributes (declared here for the type checker)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from ..errors import BackendUnavailable, ConfigError
from .base import WORKER_UID, access_problem, permits, writable_path
from .limits import DropTo

# What a worker keeps of the gateway's environment: where programs, libraries and Python
# packages are, the locale, and GPU and thread knobs. Nothing else: not the gateway's
# settings (WANWU_*, the admin token among them) nor whatever credentials it was given.
KEPT_NAMES = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})
KEPT_PREFIXES = ("LC_", "PYTHON", "CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "PYTORCH_", "TORCH_")


def kept_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a worker is given (see KEPT_NAMES and KEPT_PREFIXES)."""
    return {key: value for key, value in environ.items() if key in KEPT_NAMES or key.startswith(KEPT_PREFIXES)}


def default_worker_uid(euid: int) -> int:
    """Who a gateway running as ``euid`` runs workers as: uid 10001 (the worker image's
    user) if it is root, else itself (an unprivileged process cannot switch users)."""
    return WORKER_UID if euid == 0 else euid


def parse_worker_user(text: str) -> int | None:
    """``WANWU_WORKER_USER``: a uid, ``gateway`` (the gateway's own uid: root's, under
    root), or empty for ``default_worker_uid``'s choice (None)."""
    text = text.strip()
    if not text:
        return None
    if text == "gateway":
        return os.geteuid()
    if text.isdigit():
        return int(text)
    raise ConfigError(f"WANWU_WORKER_USER={text!r}: expected a uid, gateway, or nothing (uid 10001 under root)")


def worker_package_root() -> Path:
    """The directory that holds the ``wanwu_worker`` package (put on the worker's
    PYTHONPATH, so an interpreter without wanwu installed can run it)."""
    spec = importlib.util.find_spec("wanwu_worker")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the wanwu_worker package is not importable by the gateway")
    return Path(next(iter(spec.submodule_search_locations))).parent


def setpriv() -> str:
    """The ``setpriv`` (util-linux) a root gateway starts workers through."""
    return shutil.which("setpriv") or "setpriv"


class ProcessUser:
    """``ProcessBackend``'s worker user: who it is, and what it may reach."""

    python: str
    root: Path
    models_dir: Path | None
    worker_uid: int
    drop: DropTo | None

    def describe_user(self) -> str:
        if self.drop is None:
            return f"workers run as the gateway's own user (uid {self.worker_uid}): not separated from it"
        return f"workers run as uid {self.drop.uid}, gid {self.drop.gid} (the gateway is root)"

    def _user_problem(self) -> str | None:
        """Why workers cannot run as ``worker_uid`` here, or None."""
        if self.drop is None:
            return None
        uid, gid = self.drop.uid, self.drop.gid
        if os.geteuid() != 0:
            return f"workers can run as uid {uid} only under a root gateway; this one runs as uid {os.geteuid()}"
        if shutil.which(self.drop.setpriv) is None:
            return f"starting workers as uid {uid} needs setpriv (util-linux), which is not installed"
        python = Path(os.path.abspath(shutil.which(self.python) or self.python))
        needed = [python, worker_package_root()]
        config = python.parent.parent / "pyvenv.cfg"  # a venv: its base interpreter's files too
        with contextlib.suppress(OSError, ValueError):
            home = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line)
            needed.append(Path(home["home"].strip()) if "home" in home else python.parent)
        for path in needed:
            problem = access_problem(path, uid, gid)
            if problem:
                return (
                    f"uid {uid} (the workers' user under a root gateway) cannot run the worker interpreter "
                    f"{self.python} (WANWU_WORKER_PYTHON): {problem}; install one where uid {uid} can read it"
                )
        # The root gateway imports the same worker package: if a worker could change it, or
        # the interpreter's directory, it could run code as root.
        package = worker_package_root() / "wanwu_worker"
        try:
            writable = writable_path(package, uid, gid) or next(
                (p for p in (python, python.parent) if permits(os.stat(p), uid, gid, os.W_OK)), None
            )
        except (OSError, ValueError) as exc:
            return f"cannot check that uid {uid} cannot change {package} and {python}: {exc}"
        if writable is not None:
            return f"uid {uid} (the workers' user) could change {writable}, which a root gateway runs: chmod go-w"
        # Made and checked for this user by ping(); `wanwu doctor` only looks.
        problem = access_problem(self.root.parent, uid, gid, os.X_OK) if self.root.parent.exists() else None
        if problem:
            return (
                f"uid {uid} (the workers' user) cannot reach the socket directory {self.root.parent}: {problem}; "
                "set WANWU_SOCKET_DIR under directories others may search (e.g. /run/wanwu)"
            )
        return None

    def _bundle_problem(self, model_dir: Path, stem: bool) -> str | None:
        """Why a worker (as ``worker_uid``) may not be given ``model_dir``: it cannot read
        it, or it could change it or the models directory; None when it may."""
        if self.drop is None:
            return None
        uid, gid = self.drop.uid, self.drop.gid
        problem = access_problem(model_dir, uid, gid)
        if problem:
            what = "the models directory" if stem else "its bundle"
            return f"uid {uid} (the workers' user) cannot read {what}: {problem}"
        models_dir = model_dir if stem else model_dir.parent
        try:
            # The models directory as named too: a bundle's name may be a link into another.
            listed = [models_dir] if self.models_dir is None else [self.models_dir, models_dir]
            open_dir = next((d for d in listed if permits(os.stat(d), uid, gid, os.W_OK)), None)
            writable = open_dir if open_dir is not None else writable_path(model_dir, uid, gid)
        except (OSError, ValueError) as exc:
            return f"cannot check {models_dir}: {exc}"
        if writable is not None:
            return (
                f"uid {uid} (the workers' user) could change {writable}: bundles and the models directory must be "
                f"read-only to workers (owned by root, chmod go-w)"
            )
        return None

    def _base_environment(self, home: str | None = None) -> dict[str, str]:
        """What every run of the worker interpreter gets: ``kept_environment`` of the
        gateway's, the worker package first on PYTHONPATH, no GPU unless one is given
        (like a container without a device request), and ``home`` as HOME if given."""
        env = kept_environment(os.environ)
        if home is not None:
            env["HOME"] = home
        if self.drop is not None:
            # No per-user site-packages under the shared uid's HOME (/tmp for a probe):
            # anyone could plant a usercustomize.py there and run code in every worker.
            env["PYTHONNOUSERSITE"] = "1"
        path = [str(worker_package_root()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        env["CUDA_VISIBLE_DEVICES"] = ""
        # CUDA's default order is fastest first; NVML's, Docker's and WANWU_GPUS' is the bus.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def stem_problem(self, models_dir: Path) -> str | None:
        if self.drop is None:
            return None  # workers run as the gateway's user: they read what it reads
        problem = access_problem(models_dir, self.drop.uid, self.drop.gid)
        return f"stem cells (uid {self.drop.uid}) cannot read the models directory: {problem}" if problem else None
