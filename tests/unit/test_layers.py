"""DESIGN's import rules, read from the source with ``ast``: which parts may import flask,
docker and torch, and that no import points back up (the worker package knows neither
the gateway nor the scheduler, the scheduler never imports the gateway, and the
backends import only the scheduler's leaf modules). Every ``import`` and ``from ...
import`` counts, inside functions and under ``if TYPE_CHECKING:`` too; an import made
with importlib is not seen. Each rule names every file and line that breaks it, and
each is shown to fail on a source that breaks it."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The directories read, and the package each one's files are imported as.
TREES = {"gateway": "gateway", "scheduler": "scheduler", "worker_image/wanwu_worker": "wanwu_worker"}

WEB = {"flask", "werkzeug", "waitress"}
TORCH = {"torch", "torchvision", "onnxruntime", "onnx"}
# What scheduler/backends/ may import of the scheduler beside itself: modules that import
# nothing of the scheduler but each other (the last rule checks that), so no backend
# reaches the pool, the settings, the catalog or the core, and building a pool
# (scheduler/assembly.py) stays above the backends.
LEAVES = {
    "scheduler.errors",  # the error tree
    "scheduler.workers",  # STEM, a worker's states
    "scheduler.policy",  # GpuReading (the pure rules; imports scheduler.workers)
    "scheduler.gpu",  # GpuReader, the protocol of GPU readings
    "scheduler.answers",  # what a worker answers (scheduler.worker_client's)
    "scheduler.worker_client",  # the connection to a worker
}
WORKER_CONTRACT = "wanwu_worker.contract"  # the worker's environment variables; imports nothing
# Imports a rule lets through by name, (file, module) -> why.
EXCEPTIONS = {
    ("gateway/bundles.py", "onnx"): "optional: reads which files hold an ONNX model's weights, else guesses",
}


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repository, e.g. scheduler/backends/docker.py
    line: int
    target: str  # the module imported, absolute: scheduler.errors, docker.types


def module_of(path: str) -> tuple[str, str]:
    """The module a file under one of TREES is, and the package its relative imports start from."""
    for directory, package in TREES.items():
        if path.startswith(directory + "/"):
            parts = [package, *PurePosixPath(path[len(directory) + 1 :]).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
                return ".".join(parts), ".".join(parts)
            return ".".join(parts), ".".join(parts[:-1])
    raise ValueError(f"{path} is in none of {', '.join(TREES)}")


def sources() -> dict[str, str]:
    """Every .py file under TREES (walked: packages come and go), by relative path."""
    found = {}
    for directory in TREES:
        for file in sorted((ROOT / directory).rglob("*.py")):
            if "__pycache__" not in file.parts:
                found[file.relative_to(ROOT).as_posix()] = file.read_text(encoding="utf-8")
    return found


def imports_in(path: str, source: str, modules: set[str]) -> list[Import]:
    """Every import in ``source`` (the file ``path``), anywhere in it. ``from M import n``
    imports M.n where that is one of ``modules``, else M."""
    _, package = module_of(path)
    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(filter(None, [*parts, base]))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append(Import(path, node.lineno, target if target in modules else base))
    return found


def top(target: str) -> str:
    return target.split(".")[0]


def under(path: str, directory: str) -> bool:
    return path.startswith(directory + "/")


def docker_module(path: str) -> bool:
    file = PurePosixPath(path)
    return file.parent == PurePosixPath("scheduler/backends") and file.name.startswith("docker")


def leaf_file(path: str) -> bool:
    return under(path, "scheduler") and module_of(path)[0] in LEAVES


def scheduler_module_outside_the_leaves(target: str) -> bool:
    return top(target) == "scheduler" and target not in LEAVES and not target.startswith("scheduler.backends")


# name -> whether a file (its path) may not import a module (its absolute name)
RULES: dict[str, Callable[[str, str], bool]] = {
    "only gateway/ imports flask, werkzeug and waitress": lambda path, target: (
        top(target) in WEB and not under(path, "gateway")
    ),
    "only scheduler/backends/docker*.py imports docker": lambda path, target: (
        top(target) == "docker" and not docker_module(path)
    ),
    "only worker_image/ imports torch, torchvision, onnxruntime and onnx": lambda path, target: (
        top(target) in TORCH and not under(path, "worker_image")
    ),
    "worker_image/ imports neither gateway nor scheduler": lambda path, target: (
        under(path, "worker_image") and top(target) in ("gateway", "scheduler")
    ),
    "scheduler/ never imports gateway": lambda path, target: under(path, "scheduler") and top(target) == "gateway",
    "scheduler/backends/ imports only the scheduler's leaf modules": lambda path, target: (
        under(path, "scheduler/backends") and scheduler_module_outside_the_leaves(target)
    ),
    "scheduler/backends/ imports only wanwu_worker.contract of the worker package": lambda path, target: (
        under(path, "scheduler/backends") and top(target) == "wanwu_worker" and target != WORKER_CONTRACT
    ),
    "the leaf modules the backends import import only each other": lambda path, target: (
        leaf_file(path) and (scheduler_module_outside_the_leaves(target) or top(target) == "gateway")
    ),
}


def offences(rule: str, imports: list[Import]) -> list[str]:
    forbidden = RULES[rule]
    return [
        f"{i.path}:{i.line}: imports {i.target}"
        for i in imports
        if forbidden(i.path, i.target) and (i.path, top(i.target)) not in EXCEPTIONS
    ]


FILES = sources()
MODULES = {module_of(path)[0] for path in FILES}
IMPORTS = [i for path, source in FILES.items() for i in imports_in(path, source, MODULES)]


def test_every_tree_is_read() -> None:
    for directory in TREES:
        assert sum(under(path, directory) for path in FILES) >= 5, f"no Python files found under {directory}"
    assert LEAVES <= MODULES, f"leaf modules that do not exist: {sorted(LEAVES - MODULES)}"
    assert WORKER_CONTRACT in MODULES


@pytest.mark.parametrize("rule", RULES)
def test_the_source_keeps_the_rule(rule: str) -> None:
    found = offences(rule, IMPORTS)
    assert not found, f"{rule}; broken by:\n" + "\n".join(found)


def test_the_exceptions_are_still_needed() -> None:
    """An exception whose import is gone goes too."""
    used = {(i.path, top(i.target)) for i in IMPORTS}
    assert set(EXCEPTIONS) <= used, f"exceptions no longer used: {sorted(set(EXCEPTIONS) - used)}"


# (rule, file, source that breaks it, the offending line and module)
BROKEN = [
    ("only gateway/ imports flask, werkzeug and waitress", "scheduler/pool.py", "import flask\n", "1: imports flask"),
    (
        "only gateway/ imports flask, werkzeug and waitress",
        "worker_image/wanwu_worker/server.py",
        "def serve():\n    from werkzeug.serving import run_simple\n",
        "2: imports werkzeug.serving",
    ),
    (
        "only scheduler/backends/docker*.py imports docker",
        "scheduler/gpu.py",
        "import docker.errors\n",
        "1: imports docker.errors",
    ),
    (
        "only scheduler/backends/docker*.py imports docker",
        "scheduler/backends/process.py",
        "def f():\n    from docker import types\n",
        "2: imports docker",
    ),
    (
        "only worker_image/ imports torch, torchvision, onnxruntime and onnx",
        "gateway/app.py",
        "x = 1\ndef f():\n    import torch.nn\n",
        "3: imports torch.nn",
    ),
    (
        "only worker_image/ imports torch, torchvision, onnxruntime and onnx",
        "scheduler/models.py",
        "from onnxruntime import InferenceSession\n",
        "1: imports onnxruntime",
    ),
    (
        "worker_image/ imports neither gateway nor scheduler",
        "worker_image/wanwu_worker/server.py",
        "from scheduler.errors import WanwuError\n",
        "1: imports scheduler.errors",
    ),
    ("scheduler/ never imports gateway", "scheduler/pool.py", "import gateway.app\n", "1: imports gateway.app"),
    (
        "scheduler/backends/ imports only the scheduler's leaf modules",
        "scheduler/backends/docker.py",
        "from ..settings import Settings\n",
        "1: imports scheduler.settings",
    ),
    (
        "scheduler/backends/ imports only the scheduler's leaf modules",
        "scheduler/backends/base.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import pool\n",
        "3: imports scheduler.pool",
    ),
    (
        "scheduler/backends/ imports only the scheduler's leaf modules",
        "scheduler/backends/factory.py",
        "def build():\n    from scheduler.assembly import build_pool\n",
        "2: imports scheduler.assembly",
    ),
    (
        "scheduler/backends/ imports only wanwu_worker.contract of the worker package",
        "scheduler/backends/process.py",
        "from wanwu_worker import bundle\n",
        "1: imports wanwu_worker.bundle",
    ),
    (
        "the leaf modules the backends import import only each other",
        "scheduler/policy.py",
        "from .core import PoolCore\n",
        "1: imports scheduler.core",
    ),
]
# (rule, file, source the rule allows)
ALLOWED = [
    ("only gateway/ imports flask, werkzeug and waitress", "gateway/cli/serve.py", "from flask import Flask\n"),
    (
        "only scheduler/backends/docker*.py imports docker",
        "scheduler/backends/docker_swarm_nodes.py",
        "import docker\n",
    ),
    (
        "only worker_image/ imports torch, torchvision, onnxruntime and onnx",
        "worker_image/wanwu_worker/x.py",
        "import torch\n",
    ),
    (
        "scheduler/backends/ imports only the scheduler's leaf modules",
        "scheduler/backends/base.py",
        "from ..gpu import GpuReader\n",
    ),
    (
        "scheduler/backends/ imports only the scheduler's leaf modules",
        "scheduler/backends/docker.py",
        "from . import base\n",
    ),
    (
        "scheduler/backends/ imports only wanwu_worker.contract of the worker package",
        "scheduler/backends/process.py",
        "from wanwu_worker import contract\n",
    ),
    (
        "the leaf modules the backends import import only each other",
        "scheduler/gpu.py",
        "from .policy import GpuReading\n",
    ),
]


@pytest.mark.parametrize(("rule", "path", "source", "offence"), BROKEN)
def test_a_rule_fails_on_a_source_that_breaks_it(rule: str, path: str, source: str, offence: str) -> None:
    assert offences(rule, imports_in(path, source, MODULES)) == [f"{path}:{offence}"]


@pytest.mark.parametrize(("rule", "path", "source"), ALLOWED)
def test_a_rule_lets_through_what_it_allows(rule: str, path: str, source: str) -> None:
    assert offences(rule, imports_in(path, source, MODULES)) == []


def test_a_broken_rule_names_every_file_and_line() -> None:
    imports = [
        *imports_in("scheduler/pool.py", "import os\nimport flask\n", MODULES),
        *imports_in("worker_image/wanwu_worker/server.py", "def f():\n    import waitress\n", MODULES),
    ]
    assert offences("only gateway/ imports flask, werkzeug and waitress", imports) == [
        "scheduler/pool.py:2: imports flask",
        "worker_image/wanwu_worker/server.py:2: imports waitress",
    ]
