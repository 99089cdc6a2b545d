"""Traffic capture: the gateway's sampled inference exchanges (a Redis stream, see
monitoring/samples.py) become rows of named inputs with the prediction the engine answered,
stored per model version for the drift checks (monitoring/services.py).

One pass reads the stream from the stored cursor, decodes what it can (monitoring/kserve.py) and stores
the rows and the new cursor in one transaction: a pass that dies stores nothing twice and skips nothing.
Only one pass runs at a time (a claim, registry/locks.py). What cannot be decoded is counted per model
and reason in Redis (`monitoring:capture:refused:<model>`), never stored half. Rows past their model's
retention are deleted by `forget_old`."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import ujson
from django.db import connection, transaction
from django.utils import timezone

from monitoring import kserve
from monitoring.models import CaptureCursor, CapturedRow
from monitoring.samples import SAMPLES_STREAM
from monitoring.selectors import policies_for
from registry import locks
from registry.models import ModelVersion

log = logging.getLogger("monitoring.capture")

REFUSED_KEY = "monitoring:capture:refused:"
BATCH = 2000  # stream entries read per round trip


def _argmax(values: list[Any]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def predictions(outputs: list[kserve.Tensor], rows: int) -> list[Any]:
    """The prediction per row, as the engine builds compare them (pipelines/build_sandbox.engine_outputs):
    a `label` output; else the argmax of a float output with one score per class; else the single value."""
    by_name = {t.name: t for t in outputs}
    chosen = by_name.get("label") or outputs[0]
    width = len(chosen.values) // rows if rows else 0
    if chosen.name != "label" and width > 1 and all(isinstance(v, float) for v in chosen.values[:width]):
        return [_argmax(chosen.values[i * width:(i + 1) * width]) for i in range(rows)]
    if width != 1:
        return [None] * rows
    return list(chosen.values)


@dataclass(frozen=True)
class Decoded:
    model: str
    version: str
    at: datetime
    rows: list[dict[str, Any]]
    predictions: list[Any]


def decode(fields: dict[bytes, bytes]) -> Decoded | None:
    """A sample's rows; None for what is not a successful inference exchange (not captured, not refused).
    Raises kserve.DecodeError with the reason for a body that cannot be read."""
    get = fields.get
    request, request_head = get(b"request"), get(b"request_head", b"")
    if get(b"status") != b"200" or not request or not kserve.is_inference(request_head):
        return None
    rows = kserve.rows(kserve.tensors(request, kserve.header_length(request_head), key="inputs"))
    outputs = kserve.tensors(get(b"response", b""), kserve.header_length(get(b"response_head", b"")), key="outputs")
    ts = get(b"ts")
    at = datetime.fromtimestamp(float(ts), tz=UTC) if ts else timezone.now()
    return Decoded(get(b"model", b"").decode(), get(b"version", b"").decode(), at, rows,
                   predictions(outputs, len(rows)))


class _Versions:
    """(model name, version number) to the version's id, looked up once per pass."""

    def __init__(self) -> None:
        self.known: dict[tuple[bytes, bytes], int | None] = {}

    def learn(self, entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Look up the versions a batch names, before its COPY holds the connection."""
        for _id, fields in entries:
            key = (fields.get(b"model", b""), fields.get(b"version", b""))
            if key not in self.known:
                model, version = key[0].decode("utf-8", "replace"), key[1].decode("utf-8", "replace")
                self.known[key] = ModelVersion.objects.filter(model__name=model, version=int(version)) \
                    .values_list("pk", flat=True).first() if version.isdigit() else None

    def id_of(self, fields: dict[bytes, bytes]) -> int | None:
        return self.known.get((fields.get(b"model", b""), fields.get(b"version", b"")))


def _dumps(value: Any) -> str:
    return ujson.dumps(value, ensure_ascii=False, escape_forward_slashes=False, allow_nan=False, reject_bytes=True)


def _json(value: Any) -> str:
    """JSON text for a jsonb column. PostgreSQL's JSON has no NaN or infinity (a binary FP32 tensor may
    hold them: stored as null), no NUL character and no lone surrogate (a BYTES tensor may hold them:
    stored as U+FFFD, as undecodable bytes are); one such sample must not fail its whole batch, again at
    every pass."""
    try:
        text = _dumps(value)
    except OverflowError:  # NaN or an infinity
        return _dumps(_storable(value))
    if "\\u0000" in text or not (text.isascii() or _utf8(text)):
        return _dumps(_storable(value))
    return text


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL; surrogates, which here are never in a pair


def _storable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


# A row to store: version id, when, inputs (JSON text), prediction (JSON text, None for SQL NULL).
Row = tuple[int, datetime, str, str | None]


def _rows_of(entries: Iterable[tuple[bytes, dict[bytes, bytes]]], versions: _Versions,
             refused: dict[tuple[str, str], int]) -> Iterator[Row]:
    for _id, fields in entries:
        version_id = versions.id_of(fields)
        try:
            decoded = decode(fields)
        except kserve.DecodeError as exc:
            refused[(fields.get(b"model", b"?").decode("utf-8", "replace"), str(exc)[:200])] += 1
            continue
        if decoded is None or version_id is None:
            continue
        at = decoded.at
        for row, pred in zip(decoded.rows, decoded.predictions, strict=True):
            yield version_id, at, _json(row), None if pred is None else _json(pred)


def _store(rows: Iterable[Row]) -> int:
    """The rows in one COPY, in the caller's transaction; returns how many. For 10,000 rows here a COPY
    took a quarter of the time of bulk_create's INSERTs and a twentieth of its CPU, with no model instance
    per row; and as the rows are made while it runs, PostgreSQL turns each into jsonb while the next is
    decoded."""
    meta = CapturedRow._meta
    column = {f.name: f.column for f in meta.concrete_fields}
    names = ", ".join(connection.ops.quote_name(column[f]) for f in ("version", "at", "inputs", "prediction"))
    count = 0
    with connection.cursor() as cursor, \
            cursor.cursor.copy(f"COPY {connection.ops.quote_name(meta.db_table)} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def capture_pass(redis: Any, stream: str = SAMPLES_STREAM, budget_s: float = 2.0) -> int:
    """Read what the stream holds past the cursor (for at most about `budget_s`); returns the rows stored."""
    stored = 0
    versions = _Versions()
    deadline = time.monotonic() + budget_s
    with locks.claim("monitoring.capture") as mine:
        if not mine:
            return 0
        while time.monotonic() < deadline:
            cursor, _ = CaptureCursor.objects.get_or_create(stream=stream)
            entries = redis.xrange(stream, min=f"({cursor.last_id}", count=BATCH) if cursor.last_id != "0-0" \
                else redis.xrange(stream, count=BATCH)
            if not entries:
                break
            refused: dict[tuple[str, str], int] = defaultdict(int)
            versions.learn(entries)
            with transaction.atomic():
                with connection.cursor() as sql:
                    # Atomic still, only not waiting for the disk: a crash can lose the last moments' commits,
                    # rows and cursor together, and the samples they came from are read again from the stream.
                    sql.execute("SET LOCAL synchronous_commit TO OFF")
                count = _store(_rows_of(entries, versions, refused))
                last = entries[-1][0]
                CaptureCursor.objects.filter(pk=cursor.pk).update(
                    last_id=last.decode() if isinstance(last, bytes) else str(last), updated_at=timezone.now())
            stored += count
            if refused:
                pipe = redis.pipeline(transaction=False)
                for (model, reason), n in refused.items():
                    pipe.hincrby(REFUSED_KEY + model, reason, n)
                pipe.execute()
            if len(entries) < BATCH:
                break
    return stored


def refused_reasons(redis: Any, model: str) -> dict[str, int]:
    """Why samples of a model could not be captured, with how many."""
    return {k.decode(): int(v) for k, v in redis.hgetall(REFUSED_KEY + model).items()}


def forget_old() -> int:
    """Delete captured rows past their model's retention; returns how many."""
    deleted = 0
    now = timezone.now()
    version_models = dict(ModelVersion.objects.filter(
        pk__in=CapturedRow.objects.values("version_id").distinct()).values_list("pk", "model_id"))
    policies = policies_for(list(set(version_models.values())))
    for version_id, model_id in version_models.items():
        keep = timedelta(hours=policies[model_id].retention_hours)
        deleted += CapturedRow.objects.filter(version_id=version_id, at__lt=now - keep).delete()[0]
    return deleted
