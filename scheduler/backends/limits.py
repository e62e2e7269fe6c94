"""Resource limits for workers that are plain processes (the process backend).

Containers get memory, pids and CPU limits from the engine. A process gets them from a
cgroup where this host lets us make one (root and a writable cgroup hierarchy, v1 or
v2), else from ``ulimit -v`` (RLIMIT_AS), which bounds address space rather than memory
and is therefore applied to CPU workers only: CUDA reserves far more address space than
it uses, and a GPU worker under RLIMIT_AS fails to initialise. Which one applies is
``describe()``; the backend logs it at start and reports it in readiness.

The worker moves itself into its cgroup before it ``exec``s Python (a one-line ``sh``
wrapper), so nothing it allocates escapes the limit and no ``preexec_fn`` runs in the
threaded gateway.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a Docker-style size: ``512m``, ``2g``, ``1073741824``."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as 512m or 2g")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


@dataclass(frozen=True)
class ProcessLimits:
    memory_bytes: int | None = None
    pids: int | None = None
    cpus: float | None = None


class Cgroups:
    """Per-worker cgroups under ``<hierarchy>/<our cgroup>/wanwu.<pool id>/<worker id>``:
    memory, pids and cpu where this host allows them. ``mode`` is ``v2``, ``v1`` or
    None (no writable hierarchy: RLIMIT_AS only)."""

    def __init__(self, pool_id: str, root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> None:
        self.pool_id = pool_id
        self.root = root
        self.mode: str | None = None
        self.bases: dict[str, Path] = {}  # controller -> the pool's directory in that hierarchy
        try:
            self._detect(self_cgroup)
        except OSError as exc:
            log.info("no cgroup limits for process workers: %s", exc)
            self.mode, self.bases = None, {}

    def _detect(self, self_cgroup: Path) -> None:
        ours: dict[str, str] = {}
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                ours[controller] = path
        if (self.root / "cgroup.controllers").is_file():  # the unified (v2) hierarchy alone
            self._detect_v2(ours.get("", "/"))
        elif (self.root / "memory").is_dir():
            self._detect_v1(ours)

    def _detect_v2(self, own: str) -> None:
        # A v2 cgroup with processes cannot hand controllers to children ("no internal
        # processes"), so the pool's cgroup is a sibling of ours: under our parent.
        parent = self.root / own.strip("/")
        parent = parent.parent if own.strip("/") else parent
        available = set((parent / "cgroup.subtree_control").read_text().split())
        wanted = [c for c in ("memory", "pids", "cpu") if c in available]
        if not wanted:
            raise OSError(f"{parent} delegates none of memory, pids, cpu to its children")
        self.mode = "v2"
        self.bases = dict.fromkeys(wanted, parent / f"wanwu.{self.pool_id}")
        self._ensure_bases()

    def _detect_v1(self, ours: dict[str, str]) -> None:
        for controller in ("memory", "pids", "cpu"):
            hierarchy = self.root / controller
            if not hierarchy.is_dir() or controller not in ours:
                continue
            self.bases[controller] = hierarchy / ours[controller].strip("/") / f"wanwu.{self.pool_id}"
        if "memory" not in self.bases:
            raise OSError("there is no v1 memory controller")
        self.mode = "v1"
        self._ensure_bases()

    def _ensure_bases(self) -> None:
        """Make the pool's cgroup directories (again: a pool of the same id that shut
        down elsewhere removes them when it finds them empty)."""
        for base in set(self.bases.values()):
            if not base.is_dir():
                base.mkdir(exist_ok=True)
                if self.mode == "v2":
                    (base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in self.bases))

    def create(self, worker_id: str, limits: ProcessLimits) -> list[Path]:
        """Make the worker's cgroups with ``limits``; returns their directories (the
        wrapper writes the worker's pid into each ``cgroup.procs``)."""
        if self.mode is None:
            return []
        self._ensure_bases()
        made: list[Path] = []
        for controller, base in self.bases.items():
            path = base / worker_id
            if path not in made:
                path.mkdir(exist_ok=True)
                made.append(path)
            for name, value in self._values(controller, limits):
                (path / name).write_text(value)
        return made

    def _values(self, controller: str, limits: ProcessLimits) -> list[tuple[str, str]]:
        v2 = self.mode == "v2"
        if controller == "memory" and limits.memory_bytes:
            if v2:
                return [("memory.max", str(limits.memory_bytes)), ("memory.swap.max", "0")]
            return [("memory.limit_in_bytes", str(limits.memory_bytes))]
        if controller == "pids" and limits.pids:
            return [("pids.max", str(limits.pids))]
        if controller == "cpu" and limits.cpus:
            period = 100_000
            quota = str(int(limits.cpus * period))
            if v2:
                return [("cpu.max", f"{quota} {period}")]
            return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", quota)]
        return []

    def oom_killed(self, paths: list[Path]) -> bool:
        """Whether the kernel's OOM killer acted inside the worker's memory cgroup."""
        for path in paths:
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                try:
                    fields = dict(line.split() for line in (path / name).read_text().splitlines() if " " in line)
                except (OSError, ValueError):
                    continue
                if int(fields.get(key, "0")) > 0:
                    return True
        return False

    @staticmethod
    def remove(paths: list[Path], wait_s: float = 2.0) -> None:
        """Remove the worker's cgroups once its processes are gone (the kernel refuses
        while a dying process is still being torn down, so retry briefly)."""
        deadline = time.monotonic() + wait_s
        for path in paths:
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        if wait_s:
                            log.warning("cannot remove cgroup %s yet; it is removed at the next start", path)
                        break
                    time.sleep(0.02)

    def remove_leftovers(self) -> None:
        """Remove empty worker cgroups an earlier run of this pool left."""
        for base in set(self.bases.values()):
            for child in base.iterdir() if base.is_dir() else []:
                if child.is_dir():
                    self.remove([child], wait_s=0)

    def close(self) -> None:
        """Remove the pool's own cgroup directories (after its workers')."""
        self.remove_leftovers()
        self.remove(sorted(set(self.bases.values())), wait_s=0)

    def describe(self, limits: ProcessLimits) -> str:
        if self.mode is None:
            return "RLIMIT_AS (address space) for CPU workers only; no cgroup: memory of GPU workers is unbounded"
        what = []
        if limits.memory_bytes and "memory" in self.bases:
            what.append(f"memory {limits.memory_bytes // 2**20} MiB")
        if limits.pids and "pids" in self.bases:
            what.append(f"pids {limits.pids}")
        if limits.cpus and "cpu" in self.bases:
            what.append(f"cpus {limits.cpus:g}")
        return f"cgroup {self.mode}: " + (", ".join(what) or "no limits set")


def wrapper(cgroups: list[Path], address_space_bytes: int | None) -> list[str]:
    """``sh -c`` that joins the cgroups, sets RLIMIT_AS and execs the command after it."""
    lines = [f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in cgroups]
    if address_space_bytes:
        lines.append(f"ulimit -v {address_space_bytes // 1024}")
    lines.append('exec "$@"')
    return ["/bin/sh", "-c", " && ".join(lines), "wanwu-worker"]


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat),
    or None if there is no such process. With the boot id it names a process uniquely:
    a pid reused later has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def is_same_process(pid: int, start_time: int, boot: str) -> bool:
    """Whether ``pid`` is still the process that was started at ``start_time`` in boot
    ``boot`` (and still leads its own process group, as every worker does)."""
    if boot != boot_id() or process_start_time(pid) != start_time:
        return False
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
