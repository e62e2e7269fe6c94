"""The warm mode's routes: what a worker answers, whichever server carries it
(``server``: a Unix socket, or TCP with a per-worker secret).

    GET  /healthz                  {"status": "ready", "model", "task", "format", "device", ...}
    POST /predict?top_k=K          body: image bytes -> {"predictions": [...], "timing_ms": {...}}
                                   (an embed model: {"embedding": [...], "dim": D, "timing_ms": {...}})
    POST /predict_batch?top_k=K    body: images back to back, X-Wanwu-Parts: n1,n2,... (each
                                   image's length in bytes) -> {"results": [...], "timing_ms": {...}}
    POST /load                     (stem cells) body: {"model": "<bundle directory>"}

Both predict routes may ask for the raw scores of some labels (to score label subsets):
``subset=NAME`` (repeated; the bundle's named subsets, UTF-8 percent-encoded), then
``columns=3,17,250`` (label indices, so a long list stays short whatever the script),
then ``column_mask=`` (base64url of a bitmap over the labels: the same, bounded for any
number of labels), then ``labels=NAME`` (repeated); each label counts once, in that
order. Each answer with raw scores says which labels they are of: ``"logits_of"``, a
digest of their names (``bundle.labels_digest``). A classify model
then adds ``"logits"``, its raw outputs for those labels in that order, to each image's
answer. An unknown subset, column or label, an undecodable one, or any of them for an
embed model, is 400 ``bad_parameter``.

/predict_batch runs up to the bundle's ``batching.max_batch_size`` images (1 without
batching; more is 400 ``batch_too_large``) in one forward pass. ``results`` has one
entry per image, in order: ``{"predictions": [...]}``, or ``{"error": {"code",
"message"}}`` for an image that cannot be decoded, which does not affect the others.
A missing or malformed X-Wanwu-Parts, or one that does not add up to Content-Length, is
400 ``bad_parts``; a part over the body limit is 413 ``too_large``.

Errors are ``{"error": {"code", "message"}}`` with 400/404/405/409/411/413/422/500.

A stem cell (``serve --stem``) binds its socket with the runtime ready and no model:
/healthz says ``"status": "stem"``, /predict and /predict_batch answer 409
``not_loaded``, and one ``POST /load`` loads a bundle from the models root (same checks
and warm-up as a worker started for it) and answers its health and load timings; from
then on it is an ordinary worker. A bundle that fails to load answers 422 and leaves
the stem cell ``broken``: it refuses every other load and the pool replaces it, never
reusing a half-loaded process.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from .bundle import Bundle, check_name, labels_digest
from .errors import InputError, LengthRequired, PayloadTooLarge, WorkerError
from .predictor import parse_top_k

if TYPE_CHECKING:
    from .server import TcpWorkerServer, WorkerServer

log = logging.getLogger(__name__)

PARTS_HEADER = "X-Wanwu-Parts"
SECRET_HEADER = "X-Wanwu-Secret"
MAX_PART_DIGITS = 18  # more is no length a worker would read, and int() of it is slow


def parse_query(query: str) -> dict[str, list[str]]:
    """A request's query parameters, percent-decoded as UTF-8. Raises InputError
    (bad_parameter) for bytes that are not UTF-8, rather than guessing at them."""
    try:
        return parse_qs(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        message = f"the query string is not valid UTF-8 once percent-decoded: {exc}"
        raise InputError(message, code="bad_parameter") from None


def parse_parts(raw: str | None, max_parts: int) -> list[int]:
    """The byte length of each image in a /predict_batch body, from its X-Wanwu-Parts
    header ("n1,n2,..."). Raises InputError: ``bad_parts`` for a missing or malformed
    header, ``batch_too_large`` for more than ``max_parts`` parts."""
    if raw is None or not raw.strip():
        raise InputError(f"send {PARTS_HEADER}: each image's length in bytes, comma-separated", code="bad_parts")
    items = [item.strip() for item in raw.split(",")]
    if len(items) > max_parts:
        raise InputError(
            f"{len(items)} images in one batch; this worker takes at most {max_parts}", code="batch_too_large"
        )
    if not all(item.isascii() and item.isdigit() and len(item) <= MAX_PART_DIGITS for item in items):
        raise InputError(
            f"{PARTS_HEADER} is {raw[:100]!r}; expected byte lengths separated by commas, such as 1234,567",
            code="bad_parts",
        )
    return [int(item) for item in items]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WorkerServer | TcpWorkerServer
    server_version = "wanwu-worker"
    sys_version = ""
    body_unread = False  # an inference request's body is still in the stream

    def address_string(self) -> str:  # Unix sockets have no peer address.
        return "unix" if isinstance(self.client_address, (str, bytes)) else str(self.client_address[0])

    def _authorised(self) -> bool:
        """True unless the server wants a secret and this request lacks it; then it has
        been answered 401 and the connection is closed without reading the body."""
        secret = self.server.secret
        if secret is None:
            return True
        given = self.headers.get(SECRET_HEADER, "").encode("latin-1", "replace")
        if hmac.compare_digest(given, secret):
            return True
        log.warning("refused a request from %s without the worker secret", self.address_string())
        self.close_connection = True
        self._send_error(401, "unauthorized", f"this worker answers only requests with its {SECRET_HEADER}")
        return False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, {"error": {"code": code, "message": message}})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the stdlib parser (bad request line, ...) as JSON."""
        self.close_connection = True
        self._send_error(code, HTTPStatus(code).phrase.lower().replace(" ", "_"), message or HTTPStatus(code).phrase)

    def do_GET(self) -> None:
        if not self._authorised():
            return
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send_json(200, self._health())
        elif path == "/predict":
            self._send_error(405, "method_not_allowed", "use POST /predict with the image as the body")
        elif path == "/predict_batch":
            self._send_error(
                405, "method_not_allowed", f"use POST /predict_batch with the images as the body and {PARTS_HEADER}"
            )
        else:
            self._send_error(404, "not_found", f"no route {path}")

    def _health(self) -> dict[str, Any]:
        predictor, stem = self.server.predictor, self.server.stem
        if predictor is not None:
            return predictor.health()
        assert stem is not None
        health = stem.health()
        if self.server.broken:
            health.update(status="broken", error=self.server.broken)
        return health

    def do_POST(self) -> None:
        received = time.perf_counter()
        if not self._authorised():
            return
        url = urlsplit(self.path)
        if url.path == "/load":
            self._load()
            return
        if url.path not in ("/predict", "/predict_batch"):
            self._discard_body()
            self._send_error(404, "not_found", f"no route {url.path}")
            return
        predictor = self.server.predictor
        if predictor is None:
            self._discard_body()
            self._send_error(409, "not_loaded", "this stem cell has no model yet: POST /load first")
            return
        self.body_unread = True
        try:
            query = parse_query(url.query)
            top_k = parse_top_k(query.get("top_k", [None])[0])
            asked = asked_labels(query, predictor.bundle)
            # Passed only when asked for: a request without labels makes the call it always made.
            options = {"labels": asked} if asked else {}
            if url.path == "/predict":
                single = predictor.predict(self._read_body(), top_k, **options)
                answer: dict[str, Any] = {**single.result, "timing_ms": single.timing_ms}
                entries = [answer]
            else:
                batch = predictor.predict_batch(self._read_parts(predictor.max_batch_size), top_k, **options)
                answer = {"results": batch.results, "timing_ms": batch.timing_ms}
                entries = batch.results
            if asked:  # which labels the raw scores are of, for the gateway to check
                digest = labels_digest(asked)
                for entry in entries:
                    if "logits" in entry:
                        entry["logits_of"] = digest
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one request; _fail logs it
            self._fail(url.path, exc)
            return
        answer["timing_ms"] = {**answer["timing_ms"], "server": _elapsed_ms(received)}
        self._send_json(200, answer)

    def _fail(self, path: str, exc: Exception) -> None:
        """Answer a failed inference request with its JSON error. A body not read yet is
        read and dropped (or the connection closed) so the connection stays in step."""
        if self.body_unread and not self.close_connection:
            self._discard_body()
        if not isinstance(exc, WorkerError):
            log.error("unexpected error in %s", path, exc_info=exc)
            self._send_error(500, "internal", f"{type(exc).__name__}: {exc}")
            return
        if not isinstance(exc, InputError):
            log.error("%s failed: %s", path, exc)
        self._send_error(exc.status, exc.code, exc.message)

    def _load(self) -> None:
        """Turn this stem cell into a worker of one model (module doc)."""
        started = time.perf_counter()
        try:
            body = self._read_body()
            request = json.loads(body or b"{}")
            name = request.get("model") if isinstance(request, dict) else None
            if not isinstance(name, str) or not name:
                raise InputError('send {"model": "<bundle directory>"}', code="bad_request")
        except WorkerError as exc:
            self._send_error(exc.status, exc.code, exc.message)
            return
        except ValueError:
            self._send_error(400, "bad_request", 'the body is not JSON; send {"model": "<bundle directory>"}')
            return
        server = self.server
        try:
            check_name(name)
        except InputError as exc:  # the request's fault: the stem cell stays sound
            self._send_error(exc.status, exc.code, exc.message)
            return
        with server.load_lock:
            if server.stem is None or server.predictor is not None:
                loaded = server.predictor.bundle.name if server.predictor is not None else "?"
                self._send_error(409, "already_loaded", f"this worker already serves {loaded}")
                return
            if server.broken:
                self._send_error(409, "broken", f"an earlier load failed: {server.broken}")
                return
            try:
                server.predictor = server.stem.load(name)
            except WorkerError as exc:  # whatever failed, this process is not reused
                server.broken = exc.message
                log.error("loading %s failed; this stem cell is broken: %s", name, exc.message)
                self._send_error(422, exc.code, exc.message)
                return
            except Exception as exc:  # torch raising anything: the process may be in any state
                server.broken = f"{type(exc).__name__}: {exc}"
                log.exception("loading %s failed", name)
                self._send_error(500, "internal", server.broken)
                return
        predictor = server.predictor
        log.info("stem cell loaded %s (load %.0f ms, warm-up %.0f ms)", name, predictor.load_ms, predictor.warmup_ms)
        timing = {"load": predictor.load_ms, "warmup": predictor.warmup_ms, "total": _elapsed_ms(started)}
        self._send_json(200, {**predictor.health(), "timing_ms": timing})

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise LengthRequired("chunked bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw) if raw is not None else 0
        except ValueError:
            self.close_connection = True
            raise InputError(f"Content-Length is {raw!r}", code="bad_request") from None
        if length < 0:
            self.close_connection = True
            raise InputError(f"Content-Length is {raw!r}", code="bad_request")
        return length

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length > self.server.max_body:
            self._refuse_body()
            raise PayloadTooLarge(f"body is {length} bytes; the limit is {self.server.max_body}")
        return self._read_exactly(length)

    def _read_parts(self, max_parts: int) -> list[bytes]:
        """The images of a /predict_batch body, cut where X-Wanwu-Parts says (module doc)."""
        sizes = parse_parts(self.headers.get(PARTS_HEADER), max_parts)
        length, limit, largest = self._content_length(), self.server.max_body, max(sizes)
        if largest > limit or length > limit * len(sizes):
            self._refuse_body()
            raise PayloadTooLarge(
                f"an image is {largest} bytes; the limit is {limit} per image"
                if largest > limit
                else f"body is {length} bytes; the limit is {limit} per image, {limit * len(sizes)} for {len(sizes)}"
            )
        if sum(sizes) != length:
            raise InputError(
                f"{PARTS_HEADER} adds up to {sum(sizes)} bytes but Content-Length is {length}", code="bad_parts"
            )
        data = self._read_exactly(length)
        offsets = list(itertools.accumulate(sizes, initial=0))
        return [data[start:end] for start, end in itertools.pairwise(offsets)]

    def _read_exactly(self, length: int) -> bytes:
        self.body_unread = False
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise InputError(f"body ended after {len(data)} of {length} bytes", code="incomplete_body")
        return data

    def _refuse_body(self) -> None:
        """Do not read a body we will not use; the connection cannot be reused."""
        self.body_unread = False
        self.close_connection = True

    def _discard_body(self) -> None:
        try:
            length = self._content_length()
        except WorkerError:
            return
        if length > self.server.max_body:
            self.close_connection = True
        else:
            self.rfile.read(length)


def asked_labels(query: dict[str, list[str]], bundle: Bundle) -> tuple[str, ...]:
    """The labels whose raw scores a request asks for (module doc), each once, in order."""
    asked: list[str] = []
    for name in query.get("subset", []):
        if name not in bundle.subsets:
            raise InputError(f"model {bundle.name} has no subset {name!r}", code="bad_parameter")
        asked += bundle.subsets[name]
    for raw in query.get("columns", []):
        for part in raw.split(","):
            if not (part.isascii() and part.isdigit() and len(part) <= 9) or int(part) >= len(bundle.labels):
                raise InputError(
                    f"column {part!r} is not a label index of model {bundle.name} (0 to {len(bundle.labels) - 1})",
                    code="bad_parameter",
                )
            asked.append(bundle.labels[int(part)])
    for raw in query.get("column_mask", []):
        asked += [bundle.labels[i] for i in _mask_columns(raw, bundle)]
    asked += query.get("labels", [])
    return tuple(dict.fromkeys(asked))


def _mask_columns(raw: str, bundle: Bundle) -> list[int]:
    """``column_mask``: base64url (no padding) of a bitmap over the labels, bit i of
    byte i // 8 (least significant first) set for label i; its columns in order."""
    try:
        mask = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (ValueError, binascii.Error):
        raise InputError("column_mask is not base64url", code="bad_parameter") from None
    width = len(bundle.labels)
    columns = [i for i in range(len(mask) * 8) if mask[i // 8] >> (i % 8) & 1]
    if len(mask) > (width + 7) // 8 or (columns and columns[-1] >= width):
        raise InputError(f"column_mask is wider than model {bundle.name}'s {width} labels", code="bad_parameter")
    return columns


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
