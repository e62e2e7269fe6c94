"""The gateway's own runtime requirements for the GPU machine, one per line:
``[project] dependencies`` of pyproject.toml less what that machine already has.

    python -m tests.gpu_check.requirements [--skip torch pillow nvidia-ml-py]

``make gpu-wheels`` writes them to gpu-wheels/requirements.txt and downloads their wheels.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

ON_THE_GPU_MACHINE = ("torch", "pillow", "nvidia-ml-py")


def _name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def gateway_requirements(pyproject: Path, skip: Iterable[str] = ON_THE_GPU_MACHINE) -> list[str]:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    skipped = {_name(s) for s in skip}
    return [req for req in data["project"]["dependencies"] if _name(req) not in skipped]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu_check.requirements", description=__doc__)
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[2] / "pyproject.toml")
    parser.add_argument("--skip", nargs="*", default=list(ON_THE_GPU_MACHINE))
    args = parser.parse_args(argv)
    for requirement in gateway_requirements(args.pyproject, args.skip):
        print(requirement)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
