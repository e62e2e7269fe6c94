"""The worker interpreter outside a worker: the readiness probe (does it run the worker
package with torch, as the workers' user?) and the bundle tools (making the built-in
bundles, building and checking a bundle). ``ProcessTools`` is a part of
``ProcessBackend`` (a mixin), on the backend's own attributes (declared here for the
type checker)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from ..errors import ImageBuildError, WorkerStartError
from .base import BUILDER, check_report
from .limits import Cgroups, ProcessLimits, wrapper
from .process_user import ProcessUser

# The parts of the process backend log under the name it had before it was split.
log = logging.getLogger("scheduler.backends.process")

# The built-in bundles, each pair made by one command of the worker interpreter (a
# classify bundle and its embed bundle, in that order) and how long that takes here.
BUILTIN_MODELS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("general", "general-embed"): (BUILDER, "about 40 s"),
    ("demo-shapes", "demo-shapes-embed"): (
        ("-m", "wanwu_worker.demo.train", "--seed", "0", "--eval-seed", "1"),
        "about a minute",
    ),
}


class ProcessTools(ProcessUser):
    """``ProcessBackend``'s readiness probe and bundle tools."""

    limits: ProcessLimits
    environment: dict[str, str]
    cgroups: Cgroups
    _probe: tuple[bool, str] | None
    _probe_lock: threading.Lock

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """Whether the worker interpreter runs the worker package with torch as the
        workers' user (checked once: it imports torch), who that is, and which limits
        apply."""
        with self._probe_lock:  # one probe at a time; a failure is tried again next time
            probe = self._probe or self._run_probe()
            if probe[0]:
                self._probe = probe
        problem = self._user_problem()
        user = (False, problem) if problem else (True, self.describe_user())
        return {"worker_python": probe, "worker_user": user, "limits": (True, self.cgroups.describe(self.limits))}

    def _run_probe(self) -> tuple[bool, str]:
        problem = self._user_problem()
        if problem:
            return False, problem
        script = (
            "import json, torch, wanwu_worker; "
            "print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.device_count()]))"
        )
        env = self._base_environment("/tmp" if self.drop else None)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        try:
            result = subprocess.run(
                [*wrapper([], None, self.drop), self.python, "-c", script],
                env=env,
                cwd="/" if self.drop else None,  # the gateway's may be closed to the worker's uid
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"cannot run {self.python}: {exc}"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return False, f"{self.python} cannot run the worker: {last}"
        version, cuda, gpus = json.loads(result.stdout.strip().splitlines()[-1])
        build = f"CUDA {cuda}, {gpus} GPU(s) visible" if cuda else "CPU build"
        return True, f"{self.python}: torch {version} ({build})"

    def provide_model(self, name: str, models_dir: Path) -> Path:
        """Make a built-in bundle and its companion in ``models_dir`` with the worker
        interpreter: ``general`` and ``general-embed`` exported from the weights package,
        or ``demo-shapes`` and ``demo-shapes-embed`` trained (once per models directory).
        Each appears whole or not at all."""
        pair = next((models for models in BUILTIN_MODELS if name in models), None)
        if pair is None:
            raise ImageBuildError(f"model {name!r} is not built in; put its bundle in {models_dir}")
        command, duration = BUILTIN_MODELS[pair]
        models_dir.mkdir(parents=True, exist_ok=True)
        partial = {model: models_dir / f".{model}.partial" for model in pair}
        for path in partial.values():
            shutil.rmtree(path, ignore_errors=True)
        log.info("making %s in %s with %s (%s)", " and ".join(pair), models_dir, self.python, duration)
        classify, embed = (str(partial[model]) for model in pair)
        try:
            # run() kills the builder on any exception, SystemExit from a SIGTERM included
            result = subprocess.run(
                [self.python, *command, "--out", classify, "--embed-out", embed],
                env=self._base_environment(),
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            failure: str | None = str(exc)
        except BaseException:  # interrupted (the gateway told to stop): leave nothing half-made
            for path in partial.values():
                shutil.rmtree(path, ignore_errors=True)
            raise
        else:
            failure = None if result.returncode == 0 else "\n".join(result.stderr.strip().splitlines()[-5:])
        if failure is not None:
            for path in partial.values():
                shutil.rmtree(path, ignore_errors=True)
            raise ImageBuildError(f"making {' and '.join(pair)} with {self.python} failed:\n{failure}")
        for model, path in partial.items():
            target = models_dir / model
            if target.exists():  # one of the two was there already: keep it
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.replace(target)
        return models_dir / name

    def build_bundle(self, arguments: list[str], out_dir: Path, timeout: float) -> None:
        """Run the bundle builder with the worker interpreter."""
        try:
            result = subprocess.run(
                [self.python, *BUILDER, *arguments],
                env=self._base_environment(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageBuildError(f"building a bundle with {self.python} failed: {exc}") from exc
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:]) or f"exit status {result.returncode}"
            raise ImageBuildError(f"building a bundle with {self.python} failed:\n{tail}")

    def check_bundle(self, bundle_dir: Path, device: str | None, timeout: float) -> dict[str, Any]:
        """Run the worker's ``check`` with the worker interpreter, as the workers' user
        (the bundle is not trusted yet), with a CPU worker's address-space limit (no
        cgroup: it is one short-lived process)."""
        problem = self._bundle_problem(bundle_dir.resolve(), stem=False)
        if problem:
            raise WorkerStartError(f"cannot check {bundle_dir}: {problem}", "bundle-check")
        env = {**self._base_environment("/tmp" if self.drop else None), **self.environment}
        env["CUDA_VISIBLE_DEVICES"] = device or ""
        limit = None if device else self.limits.memory_bytes
        command = [
            *wrapper([], limit, self.drop),
            self.python,
            "-m",
            "wanwu_worker",
            "--model",
            str(bundle_dir.resolve()),
            "check",
        ]
        try:
            result = subprocess.run(
                command,
                env=env,
                cwd="/" if self.drop else None,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WorkerStartError(f"checking {bundle_dir} with {self.python} failed: {exc}", "bundle-check") from exc
        return check_report(result.stdout, self.python, result.stderr)
