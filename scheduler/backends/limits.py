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

import contextlib
import logging
import os
import re
import shlex
import signal
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
    None (no writable hierarchy: RLIMIT_AS only). Detecting changes nothing; the
    directories are made by the first ``create``.

    On v2 a cgroup with processes cannot hand controllers to children ("no internal
    processes"), so before the first worker the gateway's own processes move into a
    leaf ``wanwu.gateway`` of their cgroup, which then delegates memory, pids and cpu:
    workers stay inside the gateway's cgroup (its systemd unit, its container), as
    systemd's ``Delegate=yes`` intends."""

    def __init__(self, pool_id: str, root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> None:
        self.pool_id = pool_id
        self.root = root
        self.mode: str | None = None
        self.bases: dict[str, Path] = {}  # controller -> the pool's directory in that hierarchy
        self._own: Path | None = None  # v2: the gateway's cgroup
        self._used = False  # this process ran workers of the pool (or cleaned up after them)
        try:
            self._detect(self_cgroup)
        except (OSError, ValueError) as exc:
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
        own_dir = self.root / own.strip("/")
        available = set((own_dir / "cgroup.controllers").read_text().split())
        wanted = [c for c in ("memory", "pids", "cpu") if c in available]
        if not wanted:
            raise OSError(f"{own_dir} has none of memory, pids, cpu")
        if not os.access(own_dir, os.W_OK):
            raise OSError(f"{own_dir} is not writable (run as root, or delegate it: systemd Delegate=yes)")
        self.mode, self._own = "v2", own_dir
        self.bases = dict.fromkeys(wanted, own_dir / f"wanwu.{self.pool_id}")

    def _detect_v1(self, ours: dict[str, str]) -> None:
        for controller in ("memory", "pids", "cpu"):
            own_dir = self.root / controller / ours.get(controller, "").strip("/")
            if controller in ours and own_dir.is_dir() and os.access(own_dir, os.W_OK):
                self.bases[controller] = own_dir / f"wanwu.{self.pool_id}"
        if "memory" not in self.bases:
            raise OSError("no writable v1 memory controller")
        self.mode = "v1"

    def _ensure_bases(self) -> None:
        """Make the pool's cgroup directories (again, if a pool of the same id that
        shut down elsewhere removed them)."""
        for base in set(self.bases.values()):
            if base.is_dir():
                continue
            if self._own is not None:
                self._delegate(self._own)
            base.mkdir(exist_ok=True)
            if self.mode == "v2":
                (base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in self.bases))

    def _delegate(self, own: Path) -> None:
        """v2: enable the controllers for children of the gateway's cgroup, moving its
        processes into a leaf first (the kernel refuses while they sit in it)."""
        enabled = set((own / "cgroup.subtree_control").read_text().split())
        if set(self.bases) <= enabled:
            return
        leaf = own / "wanwu.gateway"
        leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            try:
                (leaf / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass  # it exited meanwhile
        (own / "cgroup.subtree_control").write_text(" ".join("+" + c for c in self.bases))

    def create(self, worker_id: str, limits: ProcessLimits) -> list[Path]:
        """Make the worker's cgroups with ``limits``; returns their directories (the
        wrapper writes the worker's pid into each ``cgroup.procs``). On failure nothing
        is left behind."""
        if self.mode is None:
            return []
        made: list[Path] = []
        self._used = True
        try:
            self._ensure_bases()
            for controller, base in self.bases.items():
                path = base / worker_id
                if path not in made:
                    path.mkdir(exist_ok=True)
                    made.append(path)
                for name, value in self._values(controller, limits):
                    (path / name).write_text(value)
        except OSError:
            self.remove(made, wait_s=0)
            raise
        return made

    def _values(self, controller: str, limits: ProcessLimits) -> list[tuple[str, str]]:
        """The files to write for ``controller``; the swap files only where the kernel
        accounts swap (they are missing otherwise)."""
        v2 = self.mode == "v2"
        base = next(iter(self.bases.values()))
        if controller == "memory" and limits.memory_bytes:
            memory = str(limits.memory_bytes)
            if v2:
                swap = [("memory.swap.max", "0")] if (base / "memory.swap.max").exists() else []
                return [("memory.max", memory), *swap]
            memsw = (self.bases["memory"] / "memory.memsw.limit_in_bytes").exists()
            return [("memory.limit_in_bytes", memory)] + ([("memory.memsw.limit_in_bytes", memory)] if memsw else [])
        if controller == "pids" and limits.pids:
            return [("pids.max", str(limits.pids))]
        if controller == "cpu" and limits.cpus:
            period = 100_000
            quota = str(int(limits.cpus * period))
            if v2:
                return [("cpu.max", f"{quota} {period}")]
            return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", quota)]
        return []

    @staticmethod
    def kill_members(paths: list[Path]) -> None:
        """SIGKILL whatever is still in the worker's cgroups (what its process group
        signal cannot reach once the leader is reaped: a child that left the group)."""
        for path in paths:
            kill = path / "cgroup.kill"  # v2, Linux 5.14+
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
                    continue
            try:
                pids = (path / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

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
        """Kill what is left in, and remove, worker cgroups an earlier run of this pool
        left (its workers are already gone: the pool removes orphans first)."""
        self._used = True
        for base in set(self.bases.values()):
            children = [child for child in base.iterdir() if child.is_dir()] if base.is_dir() else []
            self.kill_members(children)
            self.remove(children, wait_s=0.5)

    def close(self) -> None:
        """Remove the pool's own cgroup directories once empty, if this process ran the
        pool (``wanwu doctor``, which only looks, leaves a live pool's alone)."""
        if self._used:
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
        text = f"cgroup {self.mode}: " + (", ".join(what) or "no limits set")
        if "memory" not in self.bases:
            text += "; memory by RLIMIT_AS for CPU workers only"
        return text


def wrapper(cgroups: list[Path], address_space_bytes: int | None, user: DropTo | None = None) -> list[str]:
    """``sh -c`` that joins the cgroups, sets RLIMIT_AS and execs the command after it;
    with ``user``, through ``setpriv`` as that uid and gid, with no other groups and no
    way back to privileges (no_new_privs). The cgroups are joined while still root: a
    process cannot move itself into a cgroup once it is unprivileged."""
    lines = [f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in cgroups]
    if address_space_bytes:
        lines.append(f"ulimit -v {address_space_bytes // 1024}")
    if user is None:
        lines.append('exec "$@"')
    else:
        drop = f"--reuid={user.uid} --regid={user.gid} --clear-groups --no-new-privs"
        lines.append(f'exec {shlex.quote(user.setpriv)} {drop} -- "$@"')
    return ["/bin/sh", "-c", " && ".join(lines), "wanwu-worker"]


@dataclass(frozen=True)
class DropTo:
    """The unprivileged user a root gateway runs process workers as, and the ``setpriv``
    (util-linux) that switches to it."""

    uid: int
    gid: int
    setpriv: str = "setpriv"


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat),
    or None if there is no such live process (a zombie has exited). With the boot id it
    names a process uniquely: a pid reused later has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


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
