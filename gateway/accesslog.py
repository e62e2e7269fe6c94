"""A machine-readable access log: one JSON object per request, appended to a file.

``wanwu tune`` and ``wanwu replay`` read it back as a trace (``scheduler.traces``):

    {"ts": 1732262400.123, "request_id": "…", "method": "POST",
     "path": "/v1/models/demo-shapes/predict", "status": 200, "model": "demo-shapes",
     "cold_start": false, "cached": false,
     "timing_ms": {"queue": 0.1, "spawn": 0.0, "worker": 2.1, "total": 4.0}}

``ts`` is when the request arrived (Unix seconds). Set ``WANWU_ACCESS_LOG`` to a path.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError


class JsonAccessLog:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", buffering=1)  # a line at a time
        except OSError as exc:
            raise ConfigError(f"WANWU_ACCESS_LOG={str(path)!r}: cannot open it for appending: {exc}") from exc
        self.path = path
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()
