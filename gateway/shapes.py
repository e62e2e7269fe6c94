"""The JSON bodies the gateway sends and takes, as types.

The route code builds its answers as these, so mypy checks what each route returns;
``tests/unit/test_openapi_shapes.py`` derives each one's schema (its keys, which are
required, their JSON types) and checks it against ``gateway/openapi.json``, so a key
added here and not described there (or the other way round) fails a unit test. The
document stays hand-written: it says far more (descriptions, examples, every error
code) than a type can.

    ErrorBody         every error                          #/components/schemas/Error
    PredictBody       POST /predict, .../predict           PredictResponse
    EmbedBody         POST .../embed                       EmbedResponse
    BatchBody         POST .../predict:batch, embed:batch  BatchResponse (entries: BatchEntry)
    ModelList         GET /v1/models                       ModelList
    PoolBody          GET /v1/pool                         Pool
    Health, Readiness GET /healthz, /readyz
    SettingsView      GET /v1/pool/settings                SettingsView
    SettingsChanged   PATCH /v1/pool/settings              SettingsChanged (takes SettingsPatch)
"""

# No ``from __future__ import annotations`` here: TypedDict reads NotRequired from the
# evaluated annotations (``__required_keys__``, which the shape test derives schemas from).
from typing import Any, Literal, NotRequired, TypedDict

# Values the scheduler or the request gives as plain strings (the document lists which):
# how the worker started (warm, container, stem, cached), an embedding's encoding (json,
# base64), a worker's state, a model's task, format and precision, the keep-alive policy.

# -- errors ------------------------------------------------------------------------------


class ErrorObject(TypedDict):
    code: str
    message: str
    request_id: str


class ErrorBody(TypedDict):
    error: ErrorObject


# -- predictions ---------------------------------------------------------------------------


class Prediction(TypedDict):
    label: str
    score: float


class Timing(TypedDict):
    """Milliseconds; on a cold start also the start's breakdown (which parts, the backend's)."""

    queue: float
    spawn: float
    worker: float
    total: float
    spawn_create: NotRequired[float]
    spawn_ready: NotRequired[float]
    spawn_load: NotRequired[float]
    spawn_warmup: NotRequired[float]
    spawn_total: NotRequired[float]


class Translated(TypedDict):
    lang: NotRequired[str]  # the translation the labels are in, when one was asked for


class Described(Translated):
    """An answer scored over a label subset says which."""

    labels: NotRequired[list[str]]
    subset: NotRequired[str]


class Scored(Translated):
    """A classification: a single answer or a batch entry."""

    result: str | None
    predictions: list[Prediction]
    groups: NotRequired[list[Prediction]]
    confident: NotRequired[bool]


class PredictBody(Scored, Described):
    model: str
    cold_start: bool
    start: str
    cached: bool
    timing_ms: Timing
    request_id: str
    cpu_fallback: NotRequired[Literal[True]]


class EmbedBody(TypedDict):
    model: str
    embedding: list[float] | str
    dim: int
    encoding: str
    cold_start: bool
    start: str
    cached: bool
    timing_ms: Timing
    request_id: str
    cpu_fallback: NotRequired[Literal[True]]


class _Entry(TypedDict):
    index: int
    file: str


class AnsweredEntry(_Entry, Scored):
    pass


class EmbeddedEntry(_Entry):
    embedding: list[float] | str
    dim: int


class FailedEntry(_Entry):
    error: ErrorObject
    retryable: bool


BatchEntry = AnsweredEntry | EmbeddedEntry | FailedEntry


class BatchBody(Described):
    model: str
    results: list[BatchEntry]
    count: int
    failed: int
    cold_start: bool
    calls: int
    timing_ms: Timing
    request_id: str
    encoding: NotRequired[str]
    cpu_fallback: NotRequired[Literal[True]]


# -- the catalog --------------------------------------------------------------------------


class Batching(TypedDict):
    max_batch_size: int
    max_wait_ms: float


class ModelEntry(TypedDict):
    name: str
    task: str
    format: str
    labels: list[str]
    subsets: dict[str, list[str]]
    groups: list[str]
    language: str | None
    languages: list[str]
    confidence_threshold: float | None
    embedding_dim: int | None
    cpu_fallback: bool
    input_size: list[int]
    precision: str
    gpu_memory_mb: float
    idle_ttl_s: float
    batching: Batching | None
    default: bool


class Limits(TypedDict):
    max_upload_mb: float
    max_batch_images: int
    max_batch_upload_mb: float


class ModelList(TypedDict):
    models: list[ModelEntry]
    limits: Limits
    invalid: dict[str, str]


# -- the pool and health ----------------------------------------------------------------


class WorkerEntry(TypedDict):
    id: str
    model: str
    state: str
    idle_s: float | None
    age_s: float
    gpu_mb: float
    device: str | None
    requests: int


class GpuEntry(TypedDict):
    device: str
    used_mb: float
    total_mb: float


class KeepAliveView(TypedDict):
    policy: str
    models: dict[str, Any]  # each policy says its own per-model state


class PoolBody(TypedDict):
    capacity: int
    queue_depth: int
    waiting: dict[str, int]
    workers: list[WorkerEntry]
    counters: dict[str, int]
    reaps: dict[str, int]
    gpus: list[GpuEntry]
    backoff_s: dict[str, float]
    settings: dict[str, Any]  # the live settings, what ``wanwu replay`` simulates
    keepalive: KeepAliveView


class Health(TypedDict):
    status: Literal["ok"]


class Check(TypedDict):
    ok: bool
    detail: str


class Readiness(TypedDict):
    ready: bool
    checks: dict[str, Check]


# -- run-time settings --------------------------------------------------------------------


class RuntimeSettings(TypedDict):
    max_workers: int
    idle_ttl_s: float
    keepalive: str
    stem_cells: int
    model_ttl_s: dict[str, float]


class Change(TypedDict):
    old: Any
    new: Any


class SettingsChange(TypedDict):
    at: str
    who: str
    changed: dict[str, Change]
    persisted: bool


class SettingsView(TypedDict):
    settings: RuntimeSettings
    admin: Literal["enabled", "disabled"]
    state_file: str | None
    changes: list[SettingsChange]


class SettingsChanged(SettingsView):
    changed: dict[str, Change]
    persisted: bool


class SettingsPatch(TypedDict, total=False):
    """What PATCH /v1/pool/settings takes (checked by gateway.admin, key by key)."""

    max_workers: int
    idle_ttl_s: float
    keepalive: str
    stem_cells: int
    model_ttl_s: dict[str, float | None]
    persist: bool
