"""Carrying out the core's start and stop commands: spawning a worker container, loading
a model into a stem cell, stopping a worker, and telling the core how each went.

``Starts`` is a part of ``WarmPool`` (a mixin). The pool runs these jobs after its lock is
released, on an executor (``_later``), so several starts can run at once and no Docker
call ever holds up another request; a job holds the lock only while it feeds the core
its outcome (and keeps or drops the worker's connection).
"""

from __future__ import annotations

import logging
import math
import reprlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from .backends.base import Backend, Connection, SpawnRequest, Started
from .clock import Clock
from .core import PoolCore
from .errors import WanwuError, WorkerError, WorkerStartError
from .events import Event, LoadWorker, Ready, SpawnWorker, StartFailed, Stopped, StopWorker
from .models import ModelCatalog
from .policy import STEM
from .settings import Settings

__all__ = ["Action", "Starts"]

Action = Callable[[], None]

# The pool's log lines keep the logger name they had before the pool was split.
log = logging.getLogger("scheduler.pool")


class _Inline(Executor):
    """Runs submitted work at once in the caller's thread (deterministic tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        fn(*args, **kwargs)
        return None


INLINE = _Inline()


class Starts:
    """``WarmPool``'s start and stop jobs, on the pool's own attributes (declared here
    for the type checker)."""

    backend: Backend
    catalog: ModelCatalog
    settings: Settings
    clock: Clock
    core: PoolCore
    _lock: threading.Lock
    _executor: Executor
    _connections: dict[str, Connection]

    if TYPE_CHECKING:  # WarmPool's own (scheduler.pool)

        def _event(self, event: Event) -> list[Action]: ...

    def _spawn_job(self, command: SpawnWorker) -> None:
        # Evicted containers go first, so the engine never holds more than N.
        for victim_id in command.evict:
            log.info("evicting worker %s for a %s worker", victim_id, command.model)
            self._stop_container(victim_id, "evicted")
        stem = command.model == STEM
        log.info(
            "%s worker %s%s%s",
            "starting stem cell" if stem else ("pre-warming" if command.request_id is None else "spawning"),
            command.worker_id,
            "" if stem else f" for model {command.model}",
            f" on GPU {command.device}" if command.device else "",
        )

        def start() -> tuple[Started, Connection | None]:
            path = self.settings.models_dir.resolve() if stem else self.catalog.get(command.model).path
            started = self.backend.spawn(SpawnRequest(command.worker_id, command.model, path, command.device))
            return started, self.backend.connect(command.worker_id, self.settings.request_timeout_s)

        self._start(command, start, "ready")

    def _load_job(self, command: LoadWorker) -> None:
        """A stem cell loads ``command.model``; a failed load stops it (the core says so)."""
        log.info("stem cell %s loads model %s", command.worker_id, command.model)

        def load() -> tuple[Started, Connection | None]:
            path = self.catalog.get(command.model).path
            return self.backend.load(command.worker_id, path, self.settings.spawn_timeout_s), None

        self._start(command, load, "loaded into its stem cell")

    def _start(
        self,
        command: SpawnWorker | LoadWorker,
        run: Callable[[], tuple[Started, Connection | None]],
        done: str,
    ) -> None:
        """Run a start (a container, or a load into a stem cell) and tell the core how
        it went; a stem cell keeps the connection it was started with."""
        started_at = self.clock.now()
        try:
            started, connection = run()
        except WanwuError as exc:
            self._spawn_failed(command, exc)
            return
        except Exception as exc:  # a backend bug must not leave a waiter hanging
            log.exception("starting worker %s failed unexpectedly", command.worker_id)
            self._spawn_failed(
                command, WorkerError(f"starting worker {command.worker_id} failed: {exc}", command.worker_id)
            )
            return
        problem = _garbled_start(started)
        if problem is not None:  # the worker is up but not to be trusted: a failed start
            if connection is not None:
                connection.close()
            if isinstance(command, SpawnWorker):  # a failed load's stem cell is stopped by the core
                self._stop_container(command.worker_id, f"answered {problem}")
            self._spawn_failed(
                command, WorkerStartError(f"worker {command.worker_id} answered {problem}", command.worker_id)
            )
            return
        now = self.clock.now()
        spawn_ms = round((now - started_at) * 1000, 3)
        gpu_mb = started.health.get("gpu_memory_mb")
        with self._lock:
            if connection is not None:
                self._connections[command.worker_id] = connection
            log.info("worker %s (model %s) %s in %.0f ms", command.worker_id, command.model, done, spawn_ms)
            health_mb = float(gpu_mb) if isinstance(gpu_mb, (int, float)) else None
            actions = self._event(Ready(command.worker_id, now, spawn_ms, started.timing_ms, health_mb))
        self._run(actions)

    def _spawn_failed(self, command: SpawnWorker | LoadWorker, exc: WanwuError) -> None:
        with self._lock:
            actions = self._event(StartFailed(command.worker_id, self.clock.now(), exc))
            backoff = self.core.backoff.get(command.model)
            if backoff is not None:
                log.error(
                    "worker %s for model %s failed to start (%d in a row; next try in %.0f s): %s",
                    command.worker_id,
                    command.model,
                    backoff.failures,
                    self.core.backoff_delay(backoff),
                    exc,
                )
        self._run(actions)

    def _stop_job(self, command: StopWorker) -> None:
        """Stop a worker the core marked STOPPING, then tell the core it is gone."""
        self._stop_container(command.worker_id, command.reason)
        with self._lock:
            actions = self._event(Stopped(command.worker_id, self.clock.now()))
        self._run(actions)

    def _stop_container(self, worker_id: str, reason: str) -> None:
        try:
            self.backend.stop(worker_id)
        except WanwuError as exc:
            log.error("stopping worker %s (%s) failed: %s", worker_id, reason, exc)
        with self._lock:
            connection = self._connections.pop(worker_id, None)
        if connection is not None:
            connection.close()
        log.info("worker %s stopped: %s", worker_id, reason)

    @staticmethod
    def _log_stop(command: StopWorker) -> None:
        if command.reason in ("ttl", "gpu_pressure") and command.idle_s is not None:
            log.info(
                "reaping worker %s (model %s): %s after %.1f s idle",
                command.worker_id,
                command.model,
                command.reason,
                command.idle_s,
            )
        elif command.reason in ("crashed", "timeout"):
            log.warning("worker %s (model %s) removed: %s", command.worker_id, command.model, command.reason)
        else:
            log.info("stopping worker %s (model %s): %s", command.worker_id, command.model or "-", command.reason)

    def _run(self, actions: Iterable[Action]) -> None:
        for action in actions:
            action()

    def _later(self, fn: Callable[..., None], *args: Any) -> Action:
        """An action that hands ``fn(*args)`` to the executor."""

        def action() -> None:
            try:
                self._executor.submit(fn, *args)
            except RuntimeError:  # the executor is shut down: a start that outlived the shutdown; stop it here
                fn(*args)

        return action


def _garbled_start(started: Started) -> str | None:
    """What is wrong with what a started worker reported (its health's GPU memory, its
    start's timings), or None; the worker client checks the same, but a backend may
    add to it."""
    gpu_mb = started.health.get("gpu_memory_mb")
    if gpu_mb is not None and not (_finite(gpu_mb) and gpu_mb >= 0):
        return f"gpu_memory_mb {reprlib.repr(gpu_mb)}, not a finite number of megabytes"
    for name, value in started.timing_ms.items():
        if not _finite(value):
            return f"a start timing {reprlib.repr(name)} of {reprlib.repr(value)}, not a finite number"
    return None


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2**53
