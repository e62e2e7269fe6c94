"""A worker server on a Unix socket for the worker's HTTP tests (test_server.py,
test_batch.py); each module brings its own ``predictor`` fixture."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from wanwu_worker.predictor import Predictor
from wanwu_worker.server import TcpWorkerServer, WorkerServer

from scheduler.worker_client import WorkerClient

S = TypeVar("S", WorkerServer, TcpWorkerServer)


@contextmanager
def serving(srv: S) -> Iterator[S]:
    """Serve ``srv`` on a thread; shut it down and remove its socket afterwards."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def server(predictor: Predictor, tmp_path: Path) -> Iterator[WorkerServer]:
    with serving(WorkerServer(str(tmp_path / "worker.sock"), predictor, max_body=200_000)) as srv:
        yield srv


@pytest.fixture
def client(server: WorkerServer) -> Iterator[WorkerClient]:
    c = WorkerClient(server.final_path, worker_id="test", timeout=30)
    yield c
    c.close()
