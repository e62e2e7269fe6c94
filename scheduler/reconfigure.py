"""Settings changed at run time (``wanwu pool set``, ``PATCH /v1/pool/settings``): the
new settings and per-model TTL overrides become a ``Configure`` event of the core, and
the pool's executors grow with N. ``Reconfigure`` is a part of ``WarmPool`` (a mixin),
on the pool's own attributes (declared here for the type checker)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import events as ev
from .clock import Clock
from .coreconfig import CoreConfig
from .settings import Settings
from .snapshot import runtime_settings

if TYPE_CHECKING:
    from .starts import Action

# The pool's log lines keep the logger name they had before the pool was split.
log = logging.getLogger("scheduler.pool")


class Reconfigure:
    """``WarmPool``'s settings at run time."""

    settings: Settings
    clock: Clock
    _lock: threading.Lock
    _executor: Executor
    _calls: Executor | None
    _own_executor: bool
    _sized_for: int
    _ttl_overrides: dict[str, float]

    if TYPE_CHECKING:  # WarmPool's own (scheduler.pool)

        def _event(self, event: ev.Event) -> list[Action]: ...
        def _run(self, actions: list[Action]) -> None: ...
        def _core_config(self) -> CoreConfig: ...

    def runtime_settings(self) -> dict[str, Any]:
        """What ``reconfigure`` can change, as it is now."""
        with self._lock:
            return self._runtime_settings()

    def reconfigure(
        self, settings: Settings, model_ttl_s: Mapping[str, float | None] | None = None
    ) -> dict[str, tuple[Any, Any]]:
        """Run with ``settings`` from now on (validated by the caller) and per-model TTL
        overrides (None removes one), without a restart: a settings-changed event of the
        core. A smaller N stops idle workers first and never a busy one (the pool is
        over N until they finish); a larger N serves waiting requests at once. Returns
        what changed as {key: (old, new)}."""
        with self._lock:
            before = self._runtime_settings()
            ttl = dict(self._ttl_overrides)
            for model, value in (model_ttl_s or {}).items():
                if value is None:
                    ttl.pop(model, None)
                else:
                    ttl[model] = float(value)
            self.settings, self._ttl_overrides = settings, ttl
            self._grow_executors(settings.max_workers)
            after = self._runtime_settings()
            actions = self._event(ev.Configure(self._core_config(), self.clock.now()))
        self._run(actions)
        changed = {key: (before[key], after[key]) for key in after if before[key] != after[key]}
        if changed:
            log.info(
                "settings changed: %s", ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            )
        return changed

    def _grow_executors(self, workers: int) -> None:
        """Give a larger N threads enough to start and stop that many workers at once
        (lock held). The old executors finish what they were given."""
        if workers <= self._sized_for or not self._own_executor:
            return
        old, self._executor = self._executor, ThreadPoolExecutor(workers * 2 + 4, thread_name_prefix="wanwu-pool")
        old.shutdown(wait=False)
        if self._calls is not None:
            calls, self._calls = self._calls, ThreadPoolExecutor(max(4, workers * 2), thread_name_prefix="wanwu-batch")
            calls.shutdown(wait=False)
        self._sized_for = workers

    def _runtime_settings(self) -> dict[str, Any]:
        return runtime_settings(self.settings, self._ttl_overrides)
