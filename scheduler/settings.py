"""One frozen, validated settings object.

Sources, later ones winning: defaults < a TOML file (``WANWU_CONFIG`` or ``--config``)
< ``WANWU_*`` environment variables < command-line flags. A bad value stops start-up
with a ConfigError that names where it came from, the key and the value, e.g.
``WANWU_IDLE_TTL_S='-5': must be > 0``. Nothing reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import BACKENDS
from .errors import ConfigError
from .keepalive import POLICIES as KEEPALIVE_POLICIES


def _default_socket_root(euid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    # Short paths: a Unix socket path must fit in 108 bytes. Root: /run/wanwu (its own
    # XDG_RUNTIME_DIR is 0700, closed to the process backend's workers); another user: its
    # XDG_RUNTIME_DIR if that is its own, else /tmp/wanwu-<uid>. The backends make the
    # directory and refuse one that is not this user's or that others may write.
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return Path("/run/wanwu")
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR", "")
    try:
        owned = os.path.isabs(runtime) and os.lstat(runtime).st_uid == euid and os.path.isdir(runtime)
    except OSError:
        owned = False
    return Path(runtime) / "wanwu" if owned else Path(f"/tmp/wanwu-{euid}")


def _default_models_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "wanwu" / "models"


@dataclass(frozen=True)
class Settings:
    """Every knob of a wanwu server. Field names are the TOML keys; the environment
    variable is ``WANWU_`` + the upper-cased name."""

    backend: str = "docker"  # docker | process | swarm: what runs the workers (scheduler/backends/factory.py)
    worker_python: str = ""  # the process backend's worker interpreter; empty: the gateway's own
    worker_user: str = ""  # the process backend's worker uid; empty: 10001 under root, else the gateway's
    max_workers: int = 2
    idle_ttl_s: float = 30.0
    keepalive: str = "adaptive"
    stem_cells: int = 1
    stem_gpu_mb: float = 500.0  # GPU memory a waiting stem cell holds (its CUDA context), for placement
    gpu_high_watermark: float = 0.90
    gpu_low_watermark: float = 0.80
    request_timeout_s: float = 30.0
    queue_timeout_s: float = 10.0
    queue_max: int = 64
    interactive_reserve_s: float = 10.0  # batch work leaves a slot free this long after an interactive request
    max_upload_mb: float = 20.0
    max_batch_images: int = 64  # images in one predict:batch request
    max_batch_upload_mb: float = 64.0  # bytes of one predict:batch request
    max_pixels: int = 40_000_000
    pool_id: str = "wanwu"
    worker_image: str = "wanwu-worker:cpu"
    models_dir: Path = field(default_factory=_default_models_dir)
    default_model: str = "general"
    gpus: tuple[str, ...] = ()  # device indexes or UUIDs; swarm: NODE/GPU, or auto (every GPU the nodes advertise)
    socket_dir: Path = field(default_factory=_default_socket_root)
    spawn_timeout_s: float = 60.0
    reap_interval_s: float = 1.0
    shutdown_grace_s: float = 10.0
    # The HTTP front (gateway/server.py): threads that run requests read whole by the
    # event loop, and the limits that keep slow or greedy clients from holding them.
    http_threads: int = 32
    http_header_timeout_s: float = 10.0  # a request's head, from its first byte
    http_body_min_kb_s: float = 4.0  # the slowest body accepted, after the grace below
    http_body_grace_s: float = 5.0
    http_keepalive_s: float = 5.0  # an idle keep-alive connection closes after this
    http_max_connections: int = 1000  # at the bound: the longest-idle closes, else 503
    http_max_connections_per_client: int = 100  # one address (IPv6: its /64); else 429
    client_max_requests: int = 16  # one client's requests in the app at once; else 429
    trusted_proxies: str = ""  # CIDRs, comma-separated: their X-Forwarded-For names the client
    worker_memory: str = "2g"
    worker_pids: int = 512
    worker_cpus: float = 0.0
    worker_threads: int = 1
    swarm_network: str = "wanwu-workers"  # the overlay network workers and the gateway share
    swarm_constraints: str = ""  # placement constraints for every worker, ';'-separated (node.role==worker)
    swarm_gpu_resource: str = "NVIDIA-GPU"  # the generic resource kind GPU nodes advertise
    cache_enabled: bool = True
    cache_size: int = 1024
    cache_ttl_s: float = 300.0
    log_level: str = "INFO"
    access_log: str = ""  # a path: one JSON line per request (wanwu tune reads it); empty: off
    # The bearer token of PATCH /v1/pool/settings; empty: the admin endpoints answer 403.
    admin_token: str = field(default="", repr=False)
    admin_token_file: str = ""  # a file holding the admin token (a Docker secret); read at load
    state_file: str = ""  # where persisted runtime settings live; empty: $XDG_STATE_HOME/wanwu/<pool id>.json

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from a TOML file, the environment and flags (see module doc).
        ``environ`` defaults to ``os.environ``; flags whose value is None are unset."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        path = config_file or environ.get("WANWU_CONFIG")
        if path:
            for key, raw in _read_toml(Path(path)).items():
                values[key], origin[key] = raw, f"{path}: {key}"
        for name in _FIELDS:
            env = f"WANWU_{name.upper()}"
            if env in environ:
                values[name], origin[name] = environ[env], env
        for name, raw in (flags or {}).items():
            if raw is not None:
                if name not in _FIELDS:
                    raise ConfigError(f"unknown setting {name!r}")
                values[name], origin[name] = raw, "--" + name.replace("_", "-")
        parsed = {name: _parse(name, raw, origin[name]) for name, raw in values.items()}
        if parsed.get("admin_token_file"):
            parsed["admin_token"] = _read_admin_token(parsed, origin)
            origin["admin_token"] = f"{origin['admin_token_file']} ({parsed['admin_token_file']})"
        settings = cls(**parsed)
        settings._check(origin, values)
        return settings

    def _check(self, origin: Mapping[str, str], raw: Mapping[str, Any]) -> None:
        def fail(name: str, problem: str) -> ConfigError:
            where = origin.get(name, f"WANWU_{name.upper()} (default)")
            return ConfigError(f"{where}={raw.get(name, getattr(self, name))!r}: {problem}")

        positive = (
            "max_workers",
            "idle_ttl_s",
            "request_timeout_s",
            "queue_timeout_s",
            "max_upload_mb",
            "max_batch_images",
            "max_batch_upload_mb",
            "max_pixels",
            "spawn_timeout_s",
            "reap_interval_s",
            "worker_pids",
            "cache_size",
            "cache_ttl_s",
            "http_threads",
            "http_header_timeout_s",
            "http_keepalive_s",
            "http_max_connections",
            "http_max_connections_per_client",
            "client_max_requests",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise fail(name, "must be > 0")
        at_least_zero = (
            "queue_max",
            "shutdown_grace_s",
            "worker_cpus",
            "worker_threads",
            "stem_cells",
            "stem_gpu_mb",
            "interactive_reserve_s",
            "http_body_min_kb_s",
            "http_body_grace_s",
        )
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise fail(name, "must be >= 0")
        for name in ("gpu_high_watermark", "gpu_low_watermark"):
            if not 0 < getattr(self, name) <= 1:
                raise fail(name, "must be in (0, 1]")
        if self.gpu_low_watermark >= self.gpu_high_watermark:
            raise fail("gpu_low_watermark", f"must be below gpu_high_watermark ({self.gpu_high_watermark})")
        if not self.pool_id or not all(c.isalnum() or c in "-_." for c in self.pool_id) or len(self.pool_id) > 32:
            raise fail("pool_id", "must be 1-32 letters, digits, '-', '_' or '.'")
        if len(str(self.socket_dir)) + len(self.pool_id) + 30 > 107:
            raise fail("socket_dir", "is too long for Unix socket paths (108 bytes)")
        if self.backend not in BACKENDS:
            raise fail("backend", f"must be one of {', '.join(BACKENDS)}")
        if self.gpus == ("auto",) and self.backend != "swarm":
            raise fail("gpus", "auto finds the GPUs of swarm nodes; WANWU_BACKEND is not swarm")
        if self.backend != "swarm" and any("/" in gpu for gpu in self.gpus):
            raise fail("gpus", "NODE/GPU names a swarm node's GPU; WANWU_BACKEND is not swarm")
        if self.backend == "swarm":
            for gpu in self.gpus:
                if gpu != "auto" and "/" not in gpu:
                    raise fail("gpus", "swarm GPUs are NODE/GPU (a node's hostname and a GPU it advertises), or auto")
        if not self.swarm_network:
            raise fail("swarm_network", "must name an overlay network")
        if self.keepalive not in KEEPALIVE_POLICIES:
            raise fail("keepalive", f"must be one of {', '.join(KEEPALIVE_POLICIES)}")
        for proxy in filter(None, (p.strip() for p in self.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise fail("trusted_proxies", f"{proxy!r} is not an address or a CIDR network") from None
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise fail("log_level", "must be DEBUG, INFO, WARNING or ERROR")
        size = len(self.admin_token.encode("utf-8"))
        if 0 < size < MIN_ADMIN_TOKEN_BYTES:  # named and measured, never shown
            raise ConfigError(
                f"{origin.get('admin_token', 'WANWU_ADMIN_TOKEN')}: the admin token is {size} bytes, fewer than "
                f"{MIN_ADMIN_TOKEN_BYTES}; use a long random one, e.g. `openssl rand -hex 32` (or none: admin off)"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def changed(self, source: str, **changes: Any) -> Settings:
        """These settings with ``changes`` (raw values, parsed as from the environment),
        checked as at start; a ConfigError names ``source``, the key and the value."""
        origin = {name: f"{source}: {name}" for name in changes}
        for name in changes:
            if name not in _FIELDS:
                raise ConfigError(f"{source}: unknown setting {name!r}")
        parsed = {name: _parse(name, raw, origin[name]) for name, raw in changes.items()}
        settings = self.replace(**parsed)
        settings._check(origin, changes)
        return settings

    @property
    def state_path(self) -> Path:
        """The file runtime settings changes persist to (``state_file``, or a default)."""
        if self.state_file:
            return Path(self.state_file).expanduser()
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "wanwu" / f"{self.pool_id}.json"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_batch_upload_bytes(self) -> int:
        return int(self.max_batch_upload_mb * 2**20)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
MIN_ADMIN_TOKEN_BYTES = 16  # a short token is guessed however slowly 401s are answered


def _read_admin_token(parsed: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    """The admin token from ``admin_token_file``, stripped (a secret made with
    ``echo`` or ``openssl rand`` ends in a newline). Errors name the key and the path,
    never the file's content."""
    path, where = Path(parsed["admin_token_file"]).expanduser(), origin["admin_token_file"]
    if parsed.get("admin_token"):
        raise ConfigError(f"{origin['admin_token']} and {where} are both set: give the admin token one way")
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{where}={str(path)!r}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}={str(path)!r}: not UTF-8 text") from None
    if not token:
        raise ConfigError(f"{where}={str(path)!r}: the file is empty")
    return token


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    section = data.get("wanwu", data)
    unknown = sorted(set(section) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(unknown)}")
    return dict(section)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _to_gpus(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    gpus = tuple(str(item).strip() for item in items if str(item).strip())
    if gpus == ("auto",):
        return gpus
    for gpu in gpus:
        node, _, device = gpu.rpartition("/")
        if "/" in gpu and not (node and device):
            raise ValueError("expected NODE/GPU, e.g. gpu-1/GPU-0")
        if not (device.isdigit() or device.startswith(("GPU-", "MIG-")) or node):
            raise ValueError("expected device indexes or UUIDs separated by commas, e.g. 0,1 (swarm: NODE/GPU or auto)")
    return gpus


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError("expected an integer")
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _to_float(raw: Any) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": lambda raw: str(raw).strip(),
    "Path": lambda raw: Path(str(raw)).expanduser(),
    "tuple[str, ...]": _to_gpus,
}


def _parse(name: str, raw: Any, where: str) -> Any:
    parser = _PARSERS[str(_FIELDS[name].type)]
    try:
        return parser(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}={raw!r}: {exc}") from None
