"""What a process worker leaves beside its directory in the pool's directory, out of the
worker's reach: its log ``<worker id>.log`` and its record ``<worker id>.json`` (pid, the
process's start time, the boot id, its cgroups), by which a later run of the same pool
id finds it and kills it. ``ProcessFiles`` is a part of ``ProcessBackend`` (a mixin), on
the backend's own attributes (declared here for the type checker)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import boot_id, is_same_process, process_start_time

RECORD = ".json"  # <worker id>.json beside the worker's directory
LEGACY_RECORD = "worker.json"  # inside it, as earlier versions kept it
LOG = ".log"  # <worker id>.log beside the worker's directory


@dataclass
class Child:
    """A worker this backend started: its process, its directory and its cgroups."""

    worker_id: str
    model: str
    process: subprocess.Popen[bytes]
    directory: Path
    cgroups: list[Path]
    stopping: bool = False
    reported: bool = False


@dataclass(frozen=True)
class Record:
    """What ``worker.json`` says about a worker, for finding it again after a restart."""

    worker_id: str
    model: str
    pid: int
    start_time: int
    boot_id: str
    cgroups: list[Path] = field(default_factory=list)

    def alive(self) -> bool:
        return is_same_process(self.pid, self.start_time, self.boot_id)


class ProcessFiles:
    """``ProcessBackend``'s files of each worker: its record and its log."""

    pool_id: str
    root: Path
    python: str

    def _write_record(self, child: Child) -> None:
        start_time = process_start_time(child.process.pid)
        record = {
            "worker_id": child.worker_id,
            "model": child.model,
            "pool_id": self.pool_id,
            "pid": child.process.pid,
            "start_time": start_time if start_time is not None else -1,
            "boot_id": boot_id(),
            "cgroups": [str(path) for path in child.cgroups],
            "python": self.python,
        }
        partial = self.root / f"{child.worker_id}{RECORD}.new"
        with self._open_private(partial, os.O_TRUNC) as handle:
            handle.write((json.dumps(record) + "\n").encode())
        partial.replace(self._record(child.worker_id))

    def _record(self, worker_id: str) -> Path:
        return self.root / f"{worker_id}{RECORD}"

    def _log(self, worker_id: str) -> Path:
        return self.root / f"{worker_id}{LOG}"

    @staticmethod
    def _open_private(path: Path, flags: int) -> Any:
        """``path`` opened to write (made mode 0600 if missing), never through a link."""
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flags, 0o600), "ab")

    def _clear(self, worker_id: str) -> None:
        """Remove the worker's directory, record and log."""
        shutil.rmtree(self.root / worker_id, ignore_errors=True)  # fd-based: a link in it is not followed
        for path in (self._record(worker_id), self.root / f"{worker_id}{RECORD}.new", self._log(worker_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @staticmethod
    def _logs(path: Path, lines: int = 20) -> str:
        try:
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 64 * 1024))
                tail = handle.read().decode("utf-8", "replace").rstrip().splitlines()[-lines:]
        except OSError as exc:
            return f"(logs unavailable: {exc.strerror or exc})"
        return "\n".join(tail) or "(no output)"

    def _read_record(self, worker_id: str) -> Record | None:
        """The worker's record; one an earlier version kept inside the worker's directory
        counts only if that directory is this user's (a worker's own directory may hold
        anything the worker wrote there)."""
        path = self._record(worker_id)
        if not path.exists():
            legacy = self.root / worker_id
            with contextlib.suppress(OSError):
                info = legacy.lstat()
                if legacy.is_dir() and not legacy.is_symlink() and info.st_uid == os.geteuid():
                    path = legacy / LEGACY_RECORD
        try:
            data = json.loads(path.read_text())
            return Record(
                str(data["worker_id"]),
                str(data["model"]),
                int(data["pid"]),
                int(data["start_time"]),
                str(data["boot_id"]),
                [Path(p) for p in data.get("cgroups", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _found(self) -> list[str]:
        """The worker ids the pool's directory holds anything of."""
        names = [entry.name for entry in self.root.iterdir()] if self.root.is_dir() else []
        for suffix in (f"{RECORD}.new", RECORD, LOG):
            names = [name.removesuffix(suffix) for name in names]
        return sorted(set(names))
