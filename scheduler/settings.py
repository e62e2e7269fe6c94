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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import BACKENDS
from .errors import ConfigError
from .keepalive import POLICIES as KEEPALIVE_POLICIES
from .settingspec import AT_LEAST_ZERO, DAY_S, MAX_WORKERS, POSITIVE, WEEK_S, Spec, markdown, parse_value, setting


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
    """Every knob of a wanwu server, declared once: its type, default, bounds, whether it
    changes at run time, and its help (``Spec``, in each field's metadata). Field names are
    the TOML keys; the environment variable is ``WANWU_`` + the upper-cased name."""

    backend: str = setting(
        "docker",
        choices=BACKENDS,
        help="what runs workers: `docker` (hardened containers), `process` (local child processes, no Docker "
        "needed; see [Backends](#backends)) or `swarm` (services across a Docker Swarm; see "
        "[Several hosts](#several-hosts))",
    )
    worker_python: str = setting(
        "",
        shown_default="(the gateway's)",
        help="`process` backend: the interpreter workers run with; it needs torch and pillow (the worker package "
        "comes from this repository); under root, uid 10001 must be able to read it (not under `/root`)",
    )
    worker_user: str = setting(
        "",
        help="`process` backend: the uid workers run as; empty: 10001 if the gateway is root, else the gateway's "
        "own; `gateway`: the gateway's own, root's included (workers then are not separated from it)",
    )
    max_workers: int = setting(
        2, **POSITIVE, high=MAX_WORKERS, runtime=True, flag=True, help="pool capacity N, across all models"
    )
    idle_ttl_s: float = setting(
        30.0,
        **POSITIVE,
        high=WEEK_S,
        runtime=True,
        flag=True,
        help="idle seconds before a worker stops (a bundle's `idle_ttl_s` overrides, and so does a model's TTL set "
        "at run time, both within the same bounds); with `adaptive` keep-alive, the price of a cold start in idle "
        "seconds",
    )
    keepalive: str = setting(
        "adaptive",
        choices=KEEPALIVE_POLICIES,
        runtime=True,
        help="`fixed` (the TTL), `adaptive` (per-model windows from idle-time histograms, see [Tuning](#tuning)) "
        "or `hybrid` (the ATC'20 reference policy)",
    )
    stem_cells: int = setting(
        1,
        **AT_LEAST_ZERO,
        high=MAX_WORKERS,
        runtime=True,
        help="stem cells to keep ready in spare slots (0 turns them off); the models directory must be searchable "
        "by uid 10001 (`chmod o+x`), else they are turned off with a warning",
    )
    stem_gpu_mb: float = setting(
        500.0,
        **AT_LEAST_ZERO,
        help="GPU memory a waiting stem cell holds (its CUDA context), for placement; stem cells start only while "
        "a GPU stays under the low watermark",
    )
    gpu_high_watermark: float = setting(
        0.90, **POSITIVE, high=1, help="GPU memory fraction that starts reaping idle workers"
    )
    gpu_low_watermark: float = setting(
        0.80, **POSITIVE, high=1, help="reaping stops below this (it must be below the high watermark)"
    )
    request_timeout_s: float = setting(
        30.0,
        **POSITIVE,
        high=DAY_S,
        help="a worker's answer; past it the worker is killed and the request retried once",
    )
    queue_timeout_s: float = setting(
        10.0, **POSITIVE, high=DAY_S, help="waiting for a worker (including its start) before 503"
    )
    queue_max: int = setting(64, **AT_LEAST_ZERO, help="requests that may wait; more get 503 at once")
    interactive_reserve_s: float = setting(
        10.0,
        **AT_LEAST_ZERO,
        high=DAY_S,
        help="on a pool of two or more, batch-priority work leaves the last free slot alone this long after an "
        "interactive request arrived (0: only while one waits)",
    )
    max_upload_mb: float = setting(20.0, **POSITIVE, help="upload size limit (413), per image in a batch too")
    max_batch_images: int = setting(64, **POSITIVE, help="images in one `predict:batch` request")
    max_batch_upload_mb: float = setting(64.0, **POSITIVE, help="size of one `predict:batch` request")
    max_pixels: int = setting(
        40_000_000,
        **POSITIVE,
        help="pixel cap, checked from the header (413). A baseline JPEG in colour or grey counts at the size it "
        "decodes to (JPEG decodes at 1/2, 1/4 or 1/8 scale, no smaller than the model's input; the gateway judges "
        "at 1024 px), so a 48 MP phone photo is answered; it may declare at most 64× the cap (Pillow refuses over "
        "about 179 MP first). A progressive or CMYK JPEG counts at its declared size: its decoder holds the whole "
        "image's coefficients whatever the scale (1 GB for a 2 MB progressive file declaring 177 MP)",
    )
    pool_id: str = setting(
        "wanwu",
        flag=True,
        help="label of this pool's containers (1-32 letters, digits, `-`, `_` or `.`); two gateways on one engine "
        "need two ids",
    )
    worker_image: str = setting("wanwu-worker:cpu", flag=True, help="worker image")
    models_dir: Path = setting(
        factory=_default_models_dir,
        flag=True,
        shown_default="`~/.cache/wanwu/models`",
        help="model bundles, one directory each; rescanned every 5 s and when an unknown name is asked for (a "
        "replaced bundle retires its workers: [Model bundles](#model-bundles))",
    )
    default_model: str = setting(
        "general",
        help="model of `POST /predict`; a built-in one (`general`, `demo-shapes`) is copied out of the image on "
        "first start with its embedding model (the process backend makes them)",
    )
    gpus: tuple[str, ...] = setting(
        (),
        flag=True,
        help="GPU ids or UUIDs for workers, e.g. `0,1`; empty runs on the CPU. `swarm`: `NODE/GPU` entries, or "
        "`auto` for every GPU the nodes advertise",
    )
    socket_dir: Path = setting(
        factory=_default_socket_root,
        shown_default="`/run/wanwu` (root), else `$XDG_RUNTIME_DIR/wanwu` if that is the user's, else "
        "`/tmp/wanwu-<uid>`",
        help="per-worker socket directories; made if missing, and refused (with what is wrong) if it or the pool's "
        "directory in it is a link, not the gateway's user's, or writable by others, or if a directory above it is "
        "another user's or writable by others without the sticky bit; made mode 0700 if missing (0711 for a root "
        "gateway's process workers, which pass through it), never changed if it exists (it may be a shared one "
        "such as `/run`); the pool's own directory in it is set to that mode",
    )
    spawn_timeout_s: float = setting(60.0, **POSITIVE, high=DAY_S, help="a worker must answer /healthz within this")
    reap_interval_s: float = setting(
        1.0,
        **POSITIVE,
        high=3600,
        help="how often GPU memory is read (pressure reaping) and the models directory polled; keep-alive ends, "
        "pre-warms and held batches are exact, not on this interval",
    )
    shutdown_grace_s: float = setting(10.0, **AT_LEAST_ZERO, high=DAY_S, help="in-flight requests' grace on shutdown")
    # The HTTP front (gateway/server.py): threads that run requests read whole by the
    # event loop, and the limits that keep slow or greedy clients from holding them.
    http_threads: int = setting(
        32,
        **POSITIVE,
        high=1024,
        help="threads that run requests (`--threads`, `WANWU_THREADS`); each request is read whole before a "
        "thread sees it, so slow clients never hold one",
    )
    http_header_timeout_s: float = setting(
        10.0,
        **POSITIVE,
        help="a request's head must arrive within this of its first byte (else 408); also how long a client may "
        "stop reading an answer",
    )
    http_body_min_kb_s: float = setting(
        4.0,
        **AT_LEAST_ZERO,
        help="a body must arrive at no less than this rate after the grace (else 408): a 20 MB upload may take 85 "
        "minutes, a byte a second is closed after about 6 s",
    )
    http_body_grace_s: float = setting(
        5.0, **AT_LEAST_ZERO, help="how long a body may arrive slower than `WANWU_HTTP_BODY_MIN_KB_S` at first"
    )
    http_keepalive_s: float = setting(5.0, **POSITIVE, help="an idle keep-alive connection closes after this")
    http_max_connections: int = setting(
        1000,
        **POSITIVE,
        help="open connections; at the bound the longest-idle keep-alive one is closed to make room, else the new "
        "one gets 503 `server_busy` (the descriptor limit is raised to 3× this)",
    )
    http_max_connections_per_client: int = setting(
        100,
        **POSITIVE,
        help="open connections from one address (IPv6: its /64); more get 429 `too_many_connections`. Trusted "
        "proxies are exempt",
    )
    client_max_requests: int = setting(
        16,
        **POSITIVE,
        help="one client's requests in the app at once (waiting for a worker included); more get 429 "
        "`too_many_requests` with Retry-After. /healthz, /readyz and /metrics are not counted",
    )
    trusted_proxies: str = setting(
        "",
        help="addresses or CIDRs of proxies in front (e.g. `127.0.0.1,10.0.0.0/8`): behind them a client is the "
        "right-most X-Forwarded-For address that is not a proxy",
    )
    worker_memory: str = setting(
        "2g", help="memory limit per worker (containers; processes: see [Backends](#backends))"
    )
    worker_pids: int = setting(512, **POSITIVE, help="process and thread limit per worker")
    worker_cpus: float = setting(0.0, **AT_LEAST_ZERO, help="CPUs per worker (0: no limit)")
    worker_threads: int = setting(
        1,
        **AT_LEAST_ZERO,
        help="torch intra-op threads per worker; one small image gains nothing from more, and workers share the "
        "cores (raise it for large models on the CPU)",
    )
    swarm_network: str = setting(
        "wanwu-workers", help="`swarm`: the overlay network (internal) that workers and the gateway share"
    )
    swarm_constraints: str = setting(
        "",
        help="`swarm`: placement constraints for every worker, `;`-separated, e.g. `node.role==worker`",
    )
    swarm_gpu_resource: str = setting("NVIDIA-GPU", help="`swarm`: the generic resource kind GPU nodes advertise")
    cache_enabled: bool = setting(True, help="the result cache (answers to an image already seen)")
    cache_size: int = setting(1024, **POSITIVE, help="answers the result cache holds")
    cache_ttl_s: float = setting(300.0, **POSITIVE, help="how long the result cache keeps an answer")
    log_level: str = setting("INFO", help="the gateway's log level: DEBUG, INFO, WARNING or ERROR")
    access_log: str = setting(
        "",
        help="a file to append one JSON line per request to (`ts`, `request_id`, `method`, `path`, `status`, "
        "`model`, `cold_start`, `cached`, `timing_ms`): a trace for `wanwu tune`",
    )
    admin_token: str = setting(
        "",
        in_repr=False,
        help="bearer token of `PATCH /v1/pool/settings`, at least 16 bytes (a shorter one stops start-up); empty: "
        "runtime changes are off (403)",
    )
    admin_token_file: str = setting(
        "",
        help="a file holding the admin token instead (a Docker secret, or a file only the gateway's user reads), "
        "read at start and stripped; not together with `WANWU_ADMIN_TOKEN`",
    )
    state_file: str = setting(
        "",
        shown_default="`$XDG_STATE_HOME/wanwu/<pool id>.json`",
        help="where `--persist`ed runtime settings are kept and read back at start",
    )

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
        for name in SPECS:
            env = env_name(name)
            if env in environ:
                values[name], origin[name] = environ[env], env
        for name, raw in (flags or {}).items():
            if raw is not None:
                if name not in SPECS:
                    raise ConfigError(f"unknown setting {name!r}")
                values[name], origin[name] = raw, "--" + name.replace("_", "-")
        parsed = {name: parse(name, raw, origin[name]) for name, raw in values.items()}
        if parsed.get("admin_token_file"):
            parsed["admin_token"] = _read_admin_token(parsed, origin)
            origin["admin_token"] = f"{origin['admin_token_file']} ({parsed['admin_token_file']})"
        settings = cls(**parsed)
        settings._check(origin, values)
        return settings

    def changed(self, source: str, strict: bool = False, **changes: Any) -> Settings:
        """These settings with ``changes``, checked as at start; a ConfigError names
        ``source``, the key and the value. ``strict``: the values are JSON (an integer
        setting takes a JSON integer, not the string "3"), as a PATCH sends them."""
        origin = {name: f"{source}: {name}" for name in changes}
        for name in changes:
            if name not in SPECS:
                raise ConfigError(f"{source}: unknown setting {name!r}")
        parsed = {name: parse(name, raw, origin[name], strict) for name, raw in changes.items()}
        settings = self.replace(**parsed)
        settings._check(origin, changes)
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def _check(self, origin: Mapping[str, str], raw: Mapping[str, Any]) -> None:
        """What no one setting's bounds say: how settings go together, and the few whose
        values have a form (pool id, GPU names, proxies)."""

        def fail(name: str, problem: str) -> ConfigError:
            where = origin.get(name, f"{env_name(name)} (default)")
            return ConfigError(f"{where}={raw.get(name, getattr(self, name))!r}: {problem}")

        if self.gpu_low_watermark >= self.gpu_high_watermark:
            raise fail("gpu_low_watermark", f"must be below gpu_high_watermark ({self.gpu_high_watermark})")
        if not self.pool_id or not all(c.isalnum() or c in "-_." for c in self.pool_id) or len(self.pool_id) > 32:
            raise fail("pool_id", "must be 1-32 letters, digits, '-', '_' or '.'")
        if len(str(self.socket_dir)) + len(self.pool_id) + 30 > 107:
            raise fail("socket_dir", "is too long for Unix socket paths (108 bytes)")
        problem = _gpus_problem(self.backend, self.gpus)
        if problem:
            raise fail("gpus", problem)
        if not self.swarm_network:
            raise fail("swarm_network", "must name an overlay network")
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


SPECS: Mapping[str, Spec] = {f.name: f.metadata["spec"] for f in dataclasses.fields(Settings)}
TYPES: Mapping[str, str] = {f.name: str(f.type) for f in dataclasses.fields(Settings)}
DEFAULTS: Mapping[str, Any] = {  # those not computed at load (paths from the environment are)
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}
RUNTIME = tuple(name for name, spec in SPECS.items() if spec.runtime)  # what changes without a restart
MIN_ADMIN_TOKEN_BYTES = 16  # a short token is guessed however slowly 401s are answered


def markdown_table() -> str:
    """The README's settings table (tests/unit/test_settings_table.py keeps them equal)."""
    return markdown((name, TYPES[name], DEFAULTS.get(name), spec) for name, spec in SPECS.items())


def env_name(name: str) -> str:
    return f"WANWU_{name.upper()}"


def parse(name: str, raw: Any, where: str, strict: bool = False) -> Any:
    """``raw`` as setting ``name``: parsed (from text, TOML, or JSON when ``strict``) and
    within its bounds, or a ConfigError naming ``where``, the value and what is wrong."""
    try:
        value = parse_value(TYPES[name], raw, strict)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{where}={raw!r}: {exc}") from None
    problem = SPECS[name].problem(value)
    if problem:
        raise ConfigError(f"{where}={raw!r}: {problem}")
    return value


def _gpus_problem(backend: str, gpus: tuple[str, ...]) -> str | None:
    if gpus == ("auto",) and backend != "swarm":
        return "auto finds the GPUs of swarm nodes; WANWU_BACKEND is not swarm"
    if backend != "swarm" and any("/" in gpu for gpu in gpus):
        return "NODE/GPU names a swarm node's GPU; WANWU_BACKEND is not swarm"
    if backend == "swarm" and any(gpu != "auto" and "/" not in gpu for gpu in gpus):
        return "swarm GPUs are NODE/GPU (a node's hostname and a GPU it advertises), or auto"
    return None


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
    unknown = sorted(set(section) - set(SPECS))
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(unknown)}")
    return dict(section)
