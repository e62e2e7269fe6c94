"""The gateway as a child process (``python -m gateway.cli serve``), HTTP to it, and HTTP
to a worker's Unix socket.

The gateway runs in its own session, so a Ctrl-C at the terminal reaches only the check,
which then stops the gateway with SIGTERM (it drains and stops its workers). Its
descendants are remembered by pid and start time while it runs; any still alive after
it exits are killed by pid. If the check itself is killed, the kernel sends the gateway
SIGTERM (PR_SET_PDEATHSIG). No docker import anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scheduler.backends.limits import process_start_time

ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = "wanwu-gpu-check-7d1f"
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def multipart(image: bytes, filename: str = "image.jpg", content_type: str = "image/jpeg") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


class Http:
    """One keep-alive connection to the gateway; reconnects once if it was dropped."""

    def __init__(self, port: int, timeout: float = 600) -> None:
        self.port, self.timeout = port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
            except Exception:
                self.close()
                raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body = self.request("GET", path)
        return status, _json_or_text(body)

    def predict(self, model: str, part: bytes) -> tuple[int, dict[str, Any], float]:
        """POST a multipart body (see ``multipart``) to /v1/models/MODEL/predict; the
        status, the answer and the milliseconds the client waited. The result cache is
        bypassed, so a worker answers every time."""
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Cache-Control": "no-cache"}
        started = time.perf_counter()
        status, body = self.request("POST", f"/v1/models/{model}/predict?top_k=1", part, headers)
        elapsed = (time.perf_counter() - started) * 1000
        answer = _json_or_text(body)
        return status, answer if isinstance(answer, dict) else {"body": answer}, round(elapsed, 3)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:2000]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def find_worker_socket(root: Path, worker_id: str) -> Path | None:
    """The Unix socket of ``worker_id`` under the gateway's socket directory (the Docker
    backend uses ``<root>/<pool>/<worker>/worker.sock``; any path naming the worker will do)."""
    with contextlib.suppress(OSError):
        for path in sorted(root.rglob("*.sock")):
            if worker_id in path.parts or worker_id in path.name:
                return path
    return None


def worker_health(path: Path, timeout: float = 5) -> dict[str, Any]:
    conn = _UnixConnection(str(path), timeout)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = json.loads(response.read())
        return body if isinstance(body, dict) else {"body": body}
    finally:
        conn.close()


# -- processes -----------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the check dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Gateway:
    """A gateway child process on a free port, logging to ``log``."""

    def __init__(self, name: str, env: Mapping[str, str], log: Path, python: str, threads: int = 16) -> None:
        self.name, self.env, self.log, self.python, self.threads = name, dict(env), log, python, threads
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.http = Http(self.port)
        self.seen: dict[int, int | None] = {}  # pid -> start time, of every descendant seen
        self.pool_id = self.env.get("WANWU_POOL_ID", "")
        self.socket_dir = Path(self.env.get("WANWU_SOCKET_DIR", "/nonexistent"))

    @staticmethod
    def new_pool_id(tag: str) -> str:
        return f"gc{tag}{uuid.uuid4().hex[:6]}"

    def start(self) -> None:
        args = [self.python, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--threads", str(self.threads)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        """Wait for /readyz 200 and return its body. If /readyz never says ready but
        /healthz answers, go on after ``timeout`` (the body says which check failed)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}: {self.log_tail(3000)}")
            try:
                status, last = Http(self.port, timeout=5).get_json("/readyz")
            except OSError:
                status = 0
            if status == 200:
                return {"ready": True, "readyz": last}
            time.sleep(0.2)
        try:
            status, _ = Http(self.port, timeout=5).get_json("/healthz")
        except OSError as exc:
            raise RuntimeError(f"the gateway did not answer in {timeout:g} s: {self.log_tail(3000)}") from exc
        if status != 200:
            raise RuntimeError(f"/healthz answered {status} after {timeout:g} s: {self.log_tail(3000)}")
        return {"ready": False, "readyz": last}

    def track(self) -> None:
        """Remember the gateway's current descendants (its workers)."""
        if self.process is not None and self.process.poll() is None:
            for pid in descendants(self.process.pid):
                self.seen.setdefault(pid, process_start_time(pid))

    def alive_descendants(self) -> list[int]:
        return [pid for pid, started in self.seen.items() if started is not None and process_start_time(pid) == started]

    def stop(self, grace: float = 60) -> dict[str, Any]:
        """SIGTERM, wait ``grace`` s, then SIGKILL; then kill any remembered descendant
        still alive. Returns the exit code, the time it took and what had to be killed."""
        self.http.close()
        if self.process is None:
            return {"exit_code": None, "stop_s": 0.0, "killed_gateway": False, "leftover": []}
        self.track()
        started = time.perf_counter()
        killed = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                killed = True
                self.process.kill()
                self.process.wait(10)
        stop_s = round(time.perf_counter() - started, 3)
        # Workers get a moment to go after their gateway; then they are stray.
        deadline = time.monotonic() + 5
        while self.alive_descendants() and time.monotonic() < deadline:
            time.sleep(0.1)
        leftover = self.alive_descendants()
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return {"exit_code": self.process.returncode, "stop_s": stop_s, "killed_gateway": killed, "leftover": leftover}

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]
