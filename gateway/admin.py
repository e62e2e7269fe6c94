"""Runtime settings: ``GET /v1/pool/settings`` (anyone) and ``PATCH /v1/pool/settings``
(a bearer token, ``WANWU_ADMIN_TOKEN``) change N, the TTL, keep-alive, stem cells and
per-model TTLs without a restart, as a settings-changed event of the pool's core.

Without a token configured the PATCH answers 403 and says how to enable it; a missing or
wrong token is 401 (compared in constant time). A client (an address, an IPv6 /64, or
behind a trusted proxy the address it forwards) that sends a wrong token again and again
is held off: 429 with Retry-After, before its token is even looked at (``AuthThrottle``).
Every change is logged (who, old, new), kept in the last 20 changes shown by GET, and
counted in metrics. With ``"persist": true`` the settings after the change are written
to the state file (``state_path``: ``WANWU_STATE_FILE``, default
``$XDG_STATE_HOME/wanwu/<pool id>.json``), durably: a crash leaves the old file or the
new one, whole. At start the gateway applies that file over its configuration and logs
that it did.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from cachetools import TTLCache
from flask import Blueprint, Response, current_app, jsonify, request

from scheduler.errors import ConfigError, UnknownModel
from scheduler.files import write_text_whole
from scheduler.pool import WarmPool
from scheduler.settings import RUNTIME, Settings, parse

from .clients import client_address, peer_key
from .errors import ApiError
from .services import record, services
from .shapes import Change, RuntimeSettings, SettingsChange, SettingsChanged, SettingsView

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__)


class AuthThrottle:
    """Slows down guessing the admin token, per client key.

    The first ``free`` wrong tokens from a client cost nothing; from then on each one
    holds the client off for a delay that doubles, from ``first_delay_s`` up to
    ``max_delay_s``. While held off, a client is refused before its token is compared,
    so a right guess then tells it nothing. A client is forgotten ``forget_s`` after its
    last wrong token, or at once on a right one. At most ``max_clients`` are remembered
    (the least recently failed go first). ``clock`` is any monotonic seconds function.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        free: int = 5,
        first_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        forget_s: float = 600.0,
        max_clients: int = 10_000,
    ) -> None:
        if forget_s < max_delay_s:
            raise ValueError("forget_s must be at least max_delay_s: a held-off client would be forgotten")
        self.clock = clock
        self.free, self.first_delay_s, self.max_delay_s = free, first_delay_s, max_delay_s
        # client -> (wrong tokens so far, held off until)
        self._failed: TTLCache[str, tuple[int, float]] = TTLCache(max_clients, forget_s, timer=clock)
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds before ``client`` may try a token again; 0: now."""
        with self._lock:
            entry = self._failed.get(client)
            return 0.0 if entry is None else max(0.0, entry[1] - self.clock())

    def failed(self, client: str) -> float:
        """Count a wrong token from ``client``; returns how long it is now held off."""
        with self._lock:
            count = self._failed.get(client, (0, 0.0))[0] + 1
            over = count - self.free
            delay = 0.0 if over < 0 else min(self.max_delay_s, self.first_delay_s * 2.0 ** min(over, 62))
            self._failed[client] = (count, self.clock() + delay)
        return delay

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failed.pop(client, None)


class Admin:
    """Changes the pool's settings at run time and keeps their history. ``throttle``
    (default: one on the pool's clock) slows token guessing; ``fsync`` is how the state
    file reaches the disk."""

    def __init__(
        self,
        settings: Settings,
        pool: WarmPool,
        throttle: AuthThrottle | None = None,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.token = settings.admin_token
        self.state_path = settings.state_path
        self.pool = pool
        self.throttle = throttle or AuthThrottle(pool.clock.now)
        self.fsync = fsync
        self.changes: deque[SettingsChange] = deque(maxlen=20)
        self._lock = threading.Lock()  # one change (and state-file write) at a time

    # -- the API's view -------------------------------------------------------------

    def view(self) -> SettingsView:
        return {
            "settings": self.current(),
            "admin": "enabled" if self.token else "disabled",
            # Its name only: where it lives is the operator's (the log and `wanwu doctor` say).
            "state_file": self.state_path.name if self.state_path.is_file() else None,
            "changes": list(self.changes),
        }

    def current(self) -> RuntimeSettings:
        """The settings that change at run time, as they are now."""
        now = self.pool.runtime_settings()
        return {
            "max_workers": int(now["max_workers"]),
            "idle_ttl_s": float(now["idle_ttl_s"]),
            "keepalive": str(now["keepalive"]),
            "stem_cells": int(now["stem_cells"]),
            "model_ttl_s": {str(model): float(ttl) for model, ttl in now["model_ttl_s"].items()},
        }

    def authorize(self, header: str | None, client: str) -> None:
        """Let ``client`` (its key: gateway.app.peer_key) change settings with the
        Authorization ``header``, or raise the ApiError to answer."""
        if not self.token:
            raise ApiError(
                403,
                "admin_disabled",
                "changing settings at run time is off: start the gateway with WANWU_ADMIN_TOKEN set "
                "(a long random string) and send it as 'Authorization: Bearer <token>'",
            )
        wait = self.throttle.wait_s(client)
        if wait > 0:
            raise ApiError(
                429,
                "too_many_requests",
                f"{client} sent wrong admin tokens too often; try again in {math.ceil(wait)} s",
                retry_after=wait,
            )
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            held = self.throttle.failed(client)
            if held:
                log.warning("settings: %s sent a wrong admin token again; held off for %.0f s", client, held)
            raise ApiError(
                401,
                "unauthorized",
                "send the admin token as 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="wanwu"'},
            )
        self.throttle.succeeded(client)

    # -- changing ---------------------------------------------------------------------

    def change(self, body: Any, who: str) -> SettingsChange:
        """Validate ``body`` (the PATCH's JSON), apply it, persist it if asked; returns
        the record of the change."""
        scalars, ttls, persist = self._parse(body)
        with self._lock:
            settings = self._validated(scalars)
            if persist:
                self._save(settings, ttls)
            changed = self.pool.reconfigure(settings, ttls)
            shown: dict[str, Change] = {key: {"old": old, "new": new} for key, (old, new) in changed.items()}
            record: SettingsChange = {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "who": who,
                "changed": shown,
                "persisted": persist,
            }
            self.changes.append(record)
        for key, (old, new) in changed.items():
            saved = " (persisted)" if persist else ""
            log.warning("settings: %s changed %s from %r to %r%s", who, key, old, new, saved)
        return record

    def _parse(self, body: Any) -> tuple[dict[str, Any], dict[str, float | None], bool]:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_settings", 'send a JSON object, e.g. {"max_workers": 3}')
        unknown = sorted(set(body) - {*RUNTIME, "model_ttl_s", "persist"})
        if unknown:
            raise ApiError(
                400,
                "invalid_settings",
                f"unknown settings {', '.join(unknown)}; these change at run time: "
                f"{', '.join(RUNTIME)}, model_ttl_s (and persist)",
            )
        scalars = {key: body[key] for key in RUNTIME if key in body}
        ttls = self._parse_ttls(body.get("model_ttl_s", {}))
        persist = body.get("persist", False)
        if not isinstance(persist, bool):
            raise ApiError(400, "invalid_settings", f"persist={persist!r}: expected true or false")
        if not scalars and "model_ttl_s" not in body and not persist:
            raise ApiError(400, "invalid_settings", "nothing to change: give at least one setting (or persist)")
        if scalars.get("stem_cells") and self.pool.stem_problem:
            raise ApiError(400, "invalid_settings", f"stem_cells: {self.pool.stem_problem}")
        return scalars, ttls, persist

    def _parse_ttls(self, raw: Any) -> dict[str, float | None]:
        if not isinstance(raw, dict):
            raise ApiError(400, "invalid_settings", f"model_ttl_s={raw!r}: expected an object of model: seconds")
        ttls: dict[str, float | None] = {}
        for model, value in raw.items():
            try:
                self.pool.catalog.get(model)
            except UnknownModel as exc:
                raise ApiError(400, "invalid_settings", f"model_ttl_s: {exc}") from None
            try:  # a model's TTL has the bounds of the default one (the settings table's)
                ttls[model] = None if value is None else parse("idle_ttl_s", value, f"model_ttl_s.{model}", strict=True)
            except ConfigError as exc:
                raise ApiError(400, "invalid_settings", f"{exc} (or null: the default)") from None
        return ttls

    def _validated(self, scalars: Mapping[str, Any]) -> Settings:
        try:
            return self.pool.settings.changed("PATCH /v1/pool/settings", strict=True, **scalars)
        except ConfigError as exc:
            raise ApiError(400, "invalid_settings", str(exc)) from None

    def _save(self, settings: Settings, ttls: Mapping[str, float | None]) -> None:
        """Write the settings as they will be after this change, atomically."""
        merged = {**self.pool.runtime_settings()["model_ttl_s"], **ttls}
        state = {
            "pool_id": settings.pool_id,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {
                **{key: getattr(settings, key) for key in RUNTIME},
                "model_ttl_s": {model: ttl for model, ttl in sorted(merged.items()) if ttl is not None},
            },
        }
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_whole(self.state_path, json.dumps(state, indent=2, ensure_ascii=False) + "\n", self.fsync)
        except OSError as exc:
            raise ApiError(
                500,
                "state_file_unwritable",
                f"cannot persist to {self.state_path}: {exc.strerror or exc}; "
                "nothing was changed (set WANWU_STATE_FILE to a writable path, or leave out persist)",
            ) from None

    def restore(self) -> None:
        """Apply the persisted settings at start, over the configuration. A state file
        that cannot be read or applied is reported and left alone."""
        path = self.state_path
        if not path.is_file():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            saved = dict(state["settings"])
            ttls = dict(saved.get("model_ttl_s") or {})
            for model in list(ttls):
                if model not in {m.name for m in self.pool.catalog.all()}:
                    log.warning("the state file %s sets a TTL for %s, which is not served: left out", path, model)
                    del ttls[model]
            saved["model_ttl_s"] = ttls
            if saved.get("stem_cells") and self.pool.stem_problem:
                log.warning("the state file %s asks for stem cells, but %s: left out", path, self.pool.stem_problem)
                del saved["stem_cells"]
            applied = self.change(saved, f"the state file {path}")
        except (OSError, ValueError, KeyError, TypeError, OverflowError, ApiError) as exc:
            log.error("ignoring the persisted settings in %s: %s", path, getattr(exc, "message", exc))
            return
        log.warning("applied the persisted settings in %s over the configuration: %s", path, applied["changed"])


def admin() -> Admin:
    found: Admin = current_app.extensions["wanwu_admin"]
    return found


def _client() -> str:
    """Who sends this request, as the per-client bounds count clients."""
    forwarded = request.headers.get("X-Forwarded-For")
    return peer_key(client_address(request.remote_addr or "", forwarded, services().trusted))


@bp.get("/v1/pool/settings")
def get_settings() -> Response:
    return jsonify(admin().view())


@bp.patch("/v1/pool/settings")
def patch_settings() -> Response:
    keeper = admin()
    keeper.authorize(request.headers.get("Authorization"), _client())
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the settings as application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nested too deep for the parser
        body = None
    if body is None:
        raise ApiError(400, "invalid_settings", "the body is not valid JSON")
    operator = request.headers.get("X-Wanwu-Operator", "").strip()[:100]
    who = f"{operator or 'an operator'} from {request.remote_addr or 'unknown'}"
    change = keeper.change(body, who)
    record().settings_changed = list(change["changed"])  # counted by Metrics.record
    answer: SettingsChanged = {**keeper.view(), "changed": change["changed"], "persisted": change["persisted"]}
    return jsonify(answer)
