"""Monitoring's writes: drift checks of the versions serving traffic (each endpoint's stable version and
the canary of a rollout in progress), each judged on its captured window against its reference set."""

from __future__ import annotations

import gzip
import json
import logging
import time
from datetime import timedelta

import numpy as np
import pandas as pd
from django.utils import timezone

from deployer.models import SERVING_ROLLOUT_STATES, Deployment, Endpoint
from monitoring import alerts, drift
from monitoring.models import AlertKind, CapturedRow, DriftCheck, DriftOutcome, DriftReport, MonitorPolicy
from monitoring.selectors import policy_for
from registry import locks, mlflow_store
from registry.models import ModelVersion

log = logging.getLogger("monitoring")

PREDICTION = "prediction"
REPORTS_KEPT = 20  # Evidently reports kept per version (the checks themselves are all kept)


def serving_versions() -> list[ModelVersion]:
    ids = set(Endpoint.objects.exclude(stable_version=None).values_list("stable_version_id", flat=True))
    ids |= set(Deployment.objects.filter(status__in=SERVING_ROLLOUT_STATES).values_list("version_id", flat=True))
    return list(ModelVersion.objects.filter(pk__in=ids).select_related("model").order_by("model__name", "version"))


def reference_frame(version: ModelVersion) -> pd.DataFrame | None:
    """The version's reference set as a frame: columns named as the capture names them (`<input>_<j>`)
    and the original model's prediction; None without one."""
    if not version.reference_uri:
        return None
    folder, _, name = version.reference_uri.rpartition("/")
    text = mlflow_store.read_artifact_text(folder, name, limit=256 * 1024 * 1024)
    if text is None:
        return None
    ref = json.loads(text)
    rows = np.asarray(ref["rows"], dtype=np.float64)
    frame = pd.DataFrame(rows, columns=[f"{ref['input']}_{j}" for j in range(rows.shape[1])])
    if ref.get("prediction") is not None:
        frame[PREDICTION] = ref["prediction"]
    return frame


def window_frame(version: ModelVersion, policy: MonitorPolicy) -> tuple[pd.DataFrame, object, object]:
    """The newest captured rows of the policy's window: (frame, first row's time, last row's time)."""
    since = timezone.now() - timedelta(minutes=policy.window_minutes)
    rows = list(CapturedRow.objects.filter(version=version, at__gte=since).order_by("-at")
                .values_list("at", "inputs", "prediction")[:policy.max_rows])
    if not rows:
        return pd.DataFrame(), None, None
    frame = pd.DataFrame.from_records([inputs for _, inputs, _ in rows])
    predictions = [p for _, _, p in rows]
    if any(p is not None for p in predictions):
        frame[PREDICTION] = predictions
    return frame, rows[-1][0], rows[0][0]


def _numeric_like(reference: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The window's input columns as numbers where the reference's are (JSON carries 3 for 3.0)."""
    for column in current.columns:
        if column != PREDICTION and column in reference and pd.api.types.is_numeric_dtype(reference[column]):
            current[column] = pd.to_numeric(current[column], errors="coerce")
    return current


def drift_check(version: ModelVersion) -> DriftCheck:
    """Judge the version's captured window against its reference set and record the check."""
    policy = policy_for(version.model_id)
    label = f"{version.model.name} v{version.version}"
    reference = reference_frame(version)
    if reference is None:
        return DriftCheck.objects.create(
            version=version, outcome=DriftOutcome.NO_REFERENCE, drift_share=policy.drift_share,
            summary=f"{label} has no reference set yet (its first engine build writes it)")
    current, first, last = window_frame(version, policy)
    base = {"version": version, "window_from": first, "window_to": last, "current_rows": len(current),
            "reference_rows": len(reference), "drift_share": policy.drift_share}
    if len(current) < policy.min_rows:
        return DriftCheck.objects.create(**base, outcome=DriftOutcome.NOT_ENOUGH_DATA, summary=(
            f"{len(current)} rows of {label} captured in the last {policy.window_minutes} min; a check needs "
            f"{policy.min_rows} (the model's monitoring policy)"))
    common = [c for c in reference.columns if c in current.columns]
    if len(common) <= (1 if PREDICTION in common else 0):
        return DriftCheck.objects.create(**base, outcome=DriftOutcome.FAILED, summary=(
            f"the captured inputs of {label} ({', '.join(map(str, current.columns[:5]))}...) have no column in "
            f"common with its reference set ({', '.join(map(str, reference.columns[:5]))}...)"))
    started = time.monotonic()
    try:
        result, snapshot = drift.judge(reference, _numeric_like(reference, current), outputs=(PREDICTION,),
                                       drift_share=policy.drift_share, method=policy.drift_method or None,
                                       threshold=policy.drift_threshold)
    except Exception as exc:  # noqa: BLE001 - recorded as a check that could not be judged, with the reason
        log.exception("drift check of %s failed", label)
        return DriftCheck.objects.create(**base, outcome=DriftOutcome.FAILED,
                                         summary=f"Evidently could not judge the window: {exc}"[:2000])
    seconds = time.monotonic() - started
    drifted = result.dataset_drift or result.prediction_drift
    check = DriftCheck.objects.create(
        **base, outcome=DriftOutcome.DRIFT if drifted else DriftOutcome.NO_DRIFT,
        dataset_drift=result.dataset_drift, prediction_drift=result.prediction_drift,
        drifted_share=result.drifted_share, columns=result.as_dict()["columns"], summary=result.summary(),
        seconds=round(seconds, 3))
    DriftReport.objects.create(drift_check=check, html_gz=gzip.compress(drift.html(snapshot).encode(), 6))
    _alert_on(check, label)
    stale = DriftReport.objects.filter(drift_check__version=version).order_by("-drift_check__created_at")[REPORTS_KEPT:]
    DriftReport.objects.filter(pk__in=list(stale.values_list("pk", flat=True))).delete()
    return check


def _alert_on(check: DriftCheck, label: str) -> None:
    """A drifted window raises (or refreshes) the version's drift alert; a clear one lets it resolve."""
    version = check.version
    if check.outcome != DriftOutcome.DRIFT:
        alerts.alert_clear(version, AlertKind.DRIFT)
        return
    what = "its inputs and predictions" if check.dataset_drift and check.prediction_drift else \
        "its predictions" if check.prediction_drift else "its inputs"
    drifted = [c for c in check.columns if c["drifted"]]
    alerts.alert_seen(version, AlertKind.DRIFT, f"{label}: drift in {what}", check.summary, {
        "drift_check": check.pk, "checked_at": check.created_at.isoformat(), "current_rows": check.current_rows,
        "reference_rows": check.reference_rows, "drifted_share": check.drifted_share, "drift_share": check.drift_share,
        "prediction_drift": check.prediction_drift,
        "drifted_columns": [{k: c[k] for k in ("column", "method", "threshold", "score")} for c in drifted[:20]],
        "report": f"/api/v1/models/{version.model.name}/versions/{version.version}/drift/{check.pk}/report/"})


def drift_checks() -> int:
    """A check of every serving version (one pass at a time); returns how many were made."""
    made = 0
    with locks.claim("monitoring.drift") as mine:
        if not mine:
            return 0
        for version in serving_versions():
            drift_check(version)
            made += 1
    return made
