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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import transaction
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
    f = {k.decode(): v for k, v in fields.items()}
    if f.get("status") != b"200" or not f.get("request") or not kserve.is_inference(f.get("request_head", b"")):
        return None
    inputs = kserve.tensors(f["request"], kserve.header_length(f.get("request_head", b"")), key="inputs")
    rows = kserve.rows(inputs)
    outputs = kserve.tensors(f.get("response", b""), kserve.header_length(f.get("response_head", b"")), key="outputs")
    at = datetime.fromtimestamp(float(f.get("ts", b"0") or 0), tz=UTC) if f.get("ts") else timezone.now()
    return Decoded(f.get("model", b"").decode(), f.get("version", b"").decode(), at, rows,
                   predictions(outputs, len(rows)))


class _Versions:
    """(model name, version number) to the version's id, looked up once per pass."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, str], int | None] = {}

    def id_of(self, model: str, version: str) -> int | None:
        key = (model, version)
        if key not in self.known:
            pk = ModelVersion.objects.filter(model__name=model, version=int(version)).values_list("pk", flat=True) \
                .first() if version.isdigit() else None
            self.known[key] = pk
        return self.known[key]


def _rows_of(entries: Iterable[tuple[bytes, dict[bytes, bytes]]], versions: _Versions,
             refused: dict[tuple[str, str], int]) -> list[CapturedRow]:
    out: list[CapturedRow] = []
    for _id, fields in entries:
        try:
            decoded = decode(fields)
        except kserve.DecodeError as exc:
            refused[(fields.get(b"model", b"?").decode("utf-8", "replace"), str(exc)[:200])] += 1
            continue
        if decoded is None:
            continue
        version_id = versions.id_of(decoded.model, decoded.version)
        if version_id is None:
            continue
        out.extend(CapturedRow(version_id=version_id, at=decoded.at, inputs=row, prediction=pred)
                   for row, pred in zip(decoded.rows, decoded.predictions, strict=True))
    return out


def capture_pass(redis: Any, stream: str = SAMPLES_STREAM, budget_s: float = 2.0) -> int:
    """Read what the stream holds past the cursor (for at most about `budget_s`); returns the rows stored."""
    from collections import defaultdict

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
            rows = _rows_of(entries, versions, refused)
            with transaction.atomic():
                CapturedRow.objects.bulk_create(rows, batch_size=1000)
                last = entries[-1][0]
                CaptureCursor.objects.filter(pk=cursor.pk).update(
                    last_id=last.decode() if isinstance(last, bytes) else str(last), updated_at=timezone.now())
            stored += len(rows)
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
