"""Monitoring's writes: a model's monitoring policy; drift checks of the versions serving traffic (each
endpoint's stable version and the canary of a rollout in progress, as the deployer lists them), each judged
on its captured window against its reference set; drift and disagreement as inputs of a canary step."""

from __future__ import annotations

import gzip
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from monitoring import alerts, drift, stats
from monitoring.canary import ALPHA
from monitoring.models import AlertKind, CapturedRow, DriftCheck, DriftOutcome, DriftReport, MonitorPolicy
from monitoring.selectors import policy_for
from pipelines.builder import reference_upload
from registry import locks
from registry.audit import Actor, audit_record
from registry.errors import RegistryError
from registry.models import ModelVersion, RegisteredModel
from registry.samples import MAX_SAMPLE_ROWS, load_reference_set
from registry.services import model_policy_update

log = logging.getLogger("monitoring")

PREDICTION = "prediction"
REPORTS_KEPT = 20  # Evidently reports kept per version (the checks themselves are all kept)


def policy_update(actor: Actor, model: RegisteredModel, changes: dict[str, Any]) -> MonitorPolicy:
    """Change some of the model's policy fields (validated by the caller); audited with before and after."""
    return model_policy_update(actor, MonitorPolicy, model, changes, "monitor_policy.update")  # type: ignore[no-any-return]


MIN_PINNED_ROWS = 50  # a reference pinned from traffic needs at least this many captured rows


def reference_pin(actor: Actor, version: ModelVersion, window_from: datetime, window_to: datetime) -> dict[str, Any]:
    """Make the version's captured traffic between two times (at most MAX_SAMPLE_ROWS, the newest) its
    reference set, with the predictions it answered then; drift is judged against it from the next check.
    Audited with the reference it replaces."""
    if window_to < window_from:
        raise RegistryError("window_to must not be before window_from")
    rows = list(CapturedRow.objects.filter(version=version, at__gte=window_from, at__lte=window_to)
                .order_by("-at").values_list("inputs", "prediction")[:MAX_SAMPLE_ROWS])
    label = f"{version.model.name} v{version.version}"
    if len(rows) < MIN_PINNED_ROWS:
        raise RegistryError(f"{len(rows)} rows of {label} were captured between {window_from.isoformat()} and "
                            f"{window_to.isoformat()}; a reference needs at least {MIN_PINNED_ROWS}")
    columns = sorted({c for inputs, _ in rows for c in inputs})
    data = json.dumps({"columns": columns, "rows": [[inputs.get(c) for c in columns] for inputs, _ in rows],
                       "prediction": [p for _, p in rows], "pinned": {
                           "window_from": window_from.isoformat(), "window_to": window_to.isoformat(),
                           "by": actor.name}}).encode()
    uri = reference_upload(data)
    with transaction.atomic():
        before = ModelVersion.objects.select_for_update().get(pk=version.pk).reference_uri
        ModelVersion.objects.filter(pk=version.pk).update(reference_uri=uri)
        audit_record(actor, "version.reference_pinned", "model_version", f"{version.model.name}/{version.version}",
                     before={"reference_uri": before}, after={
                         "reference_uri": uri, "rows": len(rows), "window_from": window_from.isoformat(),
                         "window_to": window_to.isoformat()})
    version.refresh_from_db()
    return {"reference_uri": uri, "rows": len(rows), "columns": len(columns), "window_from": window_from,
            "window_to": window_to}


def reference_frame(version: ModelVersion) -> pd.DataFrame | None:
    """The version's reference set as a frame: columns named as the capture names them (`<input>_<j>`)
    and the original model's prediction; None without one."""
    ref = load_reference_set(version.reference_uri)
    if ref is None:
        return None
    if "columns" in ref:  # pinned from captured traffic: the rows as captured, columns named
        frame = pd.DataFrame(ref["rows"], columns=ref["columns"])
    else:  # written by the first engine build: one input's rows, named as the capture names them
        rows = np.asarray(ref["rows"], dtype=np.float64)
        frame = pd.DataFrame(rows, columns=[f"{ref['input']}_{j}" for j in range(rows.shape[1])])
    if ref.get("prediction") is not None:
        frame[PREDICTION] = ref["prediction"]
    return frame


def window_frame(version: ModelVersion, policy: MonitorPolicy,
                 since: datetime | None = None) -> tuple[pd.DataFrame, datetime | None, datetime | None]:
    """The newest captured rows of the policy's window (or since `since`): (frame, first row's time, last
    row's time)."""
    since = since or timezone.now() - timedelta(minutes=policy.window_minutes)
    rows = list(CapturedRow.objects.filter(version=version, at__gte=since).order_by("-at")
                .values_list("at", "inputs", "prediction")[:policy.max_rows])
    if not rows:
        return pd.DataFrame(), None, None
    return _captured_frame([(inputs, p) for _, inputs, p in rows]), rows[-1][0], rows[0][0]


def _captured_frame(rows: list[tuple[dict[str, Any], Any]]) -> pd.DataFrame:
    """Captured rows (inputs, prediction) as a frame: a column per input, and the predictions if any."""
    frame = pd.DataFrame.from_records([inputs for inputs, _ in rows])
    if any(p is not None for _, p in rows):
        frame[PREDICTION] = [p for _, p in rows]
    return frame


def _numeric_like(reference: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The window's input columns as numbers where the reference's are (JSON carries 3 for 3.0)."""
    for column in current.columns:
        if column != PREDICTION and column in reference and pd.api.types.is_numeric_dtype(reference[column]):
            current[column] = pd.to_numeric(current[column], errors="coerce")
    return current


@dataclass(frozen=True)
class Unjudged:
    """Why a window was not judged: the check's outcome and the reason in words."""

    outcome: str
    reason: str


@dataclass(frozen=True)
class Judged:
    result: drift.DriftResult
    compared: drift.Compared  # what was judged, for Evidently's HTML report (drift.html)
    seconds: float
    rows: int


def _judge_window(reference: pd.DataFrame, current: pd.DataFrame, policy: MonitorPolicy, label: str,
                  where: str) -> Judged | Unjudged:
    """Evidently's verdict on `current` (captured rows of `label`, `where` says which) against `reference`,
    with the model's policy; or why it cannot be judged."""
    if len(current) < policy.min_rows:
        return Unjudged(DriftOutcome.NOT_ENOUGH_DATA, f"{len(current)} rows of {label} captured {where}; a check "
                                                       f"needs {policy.min_rows} (the model's monitoring policy)")
    common = [c for c in reference.columns if c in current.columns]
    if len(common) <= (1 if PREDICTION in common else 0):
        return Unjudged(DriftOutcome.FAILED, (
            f"the captured inputs of {label} ({', '.join(map(str, current.columns[:5]))}...) have no column in "
            f"common with its reference set ({', '.join(map(str, reference.columns[:5]))}...)"))
    started = time.monotonic()
    try:
        result, compared = drift.judge(reference, _numeric_like(reference, current), outputs=(PREDICTION,),
                                       drift_share=policy.drift_share, method=policy.drift_method or None,
                                       threshold=policy.drift_threshold)
    except Exception as exc:  # noqa: BLE001 - recorded as a check that could not be judged, with the reason
        log.exception("drift check of %s failed", label)
        return Unjudged(DriftOutcome.FAILED, f"Evidently could not judge the window: {exc}"[:2000])
    return Judged(result, compared, time.monotonic() - started, len(current))


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
    judged = _judge_window(reference, current, policy, label, f"in the last {policy.window_minutes} min")
    if isinstance(judged, Unjudged):
        return DriftCheck.objects.create(**base, outcome=judged.outcome, summary=judged.reason)
    result = judged.result
    prediction_drift, words = _prediction_drift(result, reference, current)
    drifted = result.dataset_drift or prediction_drift
    check = DriftCheck.objects.create(
        **base, outcome=DriftOutcome.DRIFT if drifted else DriftOutcome.NO_DRIFT,
        dataset_drift=result.dataset_drift, prediction_drift=prediction_drift,
        drifted_share=result.drifted_share, columns=result.as_dict()["columns"], summary=result.summary() + words,
        seconds=round(judged.seconds, 3))
    if drifted:  # the alert's evidence; a quiet window's report is drawn when someone asks (drift_report)
        _keep_report(check, judged.compared)
    _alert_on(check, label)
    return check


def _keep_report(check: DriftCheck, compared: drift.Compared) -> DriftReport:
    """Draw Evidently's report of a check and keep it (the newest REPORTS_KEPT per version)."""
    html_gz = gzip.compress(drift.html(compared).encode(), 6)
    try:
        with transaction.atomic():
            report = DriftReport.objects.create(drift_check=check, html_gz=html_gz)
    except IntegrityError:  # drawn by another request a moment ago
        return DriftReport.objects.get(drift_check=check)
    stale = DriftReport.objects.filter(drift_check__version=check.version).order_by(
        "-drift_check__created_at")[REPORTS_KEPT:]
    DriftReport.objects.filter(pk__in=list(stale.values_list("pk", flat=True))).delete()
    return report


def drift_report(check: DriftCheck) -> DriftReport:
    """The check's Evidently report: the kept one, or drawn now from the same reference set and captured rows
    (a quiet window's report is drawn only when someone asks). RegistryError (404) when it cannot be."""
    found = DriftReport.objects.filter(drift_check=check).first()
    if found is not None:
        return found
    if check.outcome not in (DriftOutcome.DRIFT, DriftOutcome.NO_DRIFT) or check.window_from is None:
        raise RegistryError(f"drift check {check.pk} reached no verdict ({check.get_outcome_display()}): there is "
                            "no report to draw", 404)
    version = check.version
    policy = policy_for(version.model_id)
    reference = reference_frame(version)
    rows = list(CapturedRow.objects.filter(version=version, at__gte=check.window_from, at__lte=check.window_to)
                .order_by("-at").values_list("inputs", "prediction")[:check.current_rows])
    if reference is None or len(rows) < check.current_rows:
        raise RegistryError(f"the rows drift check {check.pk} judged are no longer kept (captured rows are kept "
                            f"{policy.retention_hours} h), so its report cannot be drawn", 404)
    current = _captured_frame(rows)
    _, compared = drift.judge(reference, _numeric_like(reference, current), outputs=(PREDICTION,),
                              drift_share=check.drift_share, method=policy.drift_method or None,
                              threshold=policy.drift_threshold)
    return _keep_report(check, compared)


PREDICTION_EFFECT = 0.1  # the share of the answers' distribution that must move for prediction drift to count


def _prediction_drift(result: drift.DriftResult, reference: pd.DataFrame, current: pd.DataFrame) -> tuple[bool, str]:
    """Whether the version's answers drifted from its reference set's: Evidently's test on the prediction
    column, and an effect that matters (with thousands of rows a test finds any difference: a class 2 points
    more frequent than in the reference is not worth a page). Returns the verdict and words for the summary."""
    if not result.prediction_drift or PREDICTION not in reference or PREDICTION not in current:
        return False, ""
    shift = stats.answers_differ(reference[PREDICTION].dropna().tolist(), current[PREDICTION].dropna().tolist())
    if shift.effect >= PREDICTION_EFFECT:
        return True, f" ({shift.effect_name} {shift.effect:.2f} from the reference's answers)"
    return False, (f"; but the answers moved by {shift.effect_name} {shift.effect:.2f} from the reference's, under "
                   f"the {PREDICTION_EFFECT:g} that counts as prediction drift")


def window_drift(reference_of: ModelVersion, window_of: ModelVersion,
                 since: datetime | None = None) -> Judged | Unjudged:
    """`window_of`'s captured rows (its policy's window, or since `since`) against `reference_of`'s reference
    set: would that version see drift in this traffic?"""
    policy = policy_for(window_of.model_id)
    label = f"{window_of.model.name} v{window_of.version}"
    reference = reference_frame(reference_of)
    if reference is None:
        return Unjudged(DriftOutcome.NO_REFERENCE, f"v{reference_of.version} has no reference set")
    current, _, _ = window_frame(window_of, policy, since)
    where = f"since {since:%H:%M:%S} UTC" if since else f"in the last {policy.window_minutes} min"
    return _judge_window(reference, current, policy, label, where)


# ---- drift and disagreement as inputs of a canary step ------------------------------------------------------

MIN_ANSWERS = 100  # captured answers of each version, at the least, before the two are compared
DISAGREEMENT_EFFECT = 0.1  # ... and a difference that matters: a tenth of the answers' distribution moved


@dataclass(frozen=True)
class CanaryInputs:
    """Drift and prediction disagreement as a canary step sees them: failed or not, in words, with figures."""

    failed: bool
    reason: str
    figures: dict[str, Any]


def _answers_alike(canary: ModelVersion, stable: ModelVersion, since: datetime,
                   limit: int) -> tuple[list[Any], list[Any]]:
    """The canary's newest `limit` answers since `since`, and stable's over the same seconds (a random `limit`
    of them, widened by one capture interval each side): traffic changes over time, so answers from other
    seconds could differ for that alone."""
    mine = list(CapturedRow.objects.filter(version=canary, at__gte=since).exclude(prediction=None)
                .order_by("-at").values_list("at", "prediction")[:limit])
    if not mine:
        return [], []
    margin = timedelta(seconds=float(settings.PLATFORM["CAPTURE_S"]))
    theirs = (CapturedRow.objects.filter(version=stable, at__gte=max(since, mine[-1][0] - margin),
                                         at__lte=mine[0][0] + margin)
              .exclude(prediction=None).order_by("?").values_list("prediction", flat=True)[:limit])
    return [p for _, p in mine], list(theirs)


def canary_inputs(canary: ModelVersion, stable: ModelVersion, since: datetime) -> CanaryInputs:
    """The canary's captured traffic since `since` (the rollout's start): its answers against stable's over
    the same seconds (both arms take random shares of the same requests, so their answers should be alike;
    stable's from before the canary took traffic are left out),
    and its inputs against its own reference set. Each fails only with confidence 1 - ALPHA and an effect
    that matters; too few captured rows judge nothing, and say so."""
    policy = policy_for(canary.model_id)
    if not policy.canary_drift_gate:
        return CanaryInputs(False, "drift and disagreement not judged (off in the model's monitoring policy)",
                            {"judged": False})
    failed: list[str] = []
    passed: list[str] = []
    figures: dict[str, Any] = {}
    mine, theirs = _answers_alike(canary, stable, since, policy.max_rows)
    if min(len(mine), len(theirs)) < MIN_ANSWERS:
        passed.append(f"answers not compared yet: {len(mine)} canary and {len(theirs)} stable answers captured "
                      f"since the rollout began, {MIN_ANSWERS} of each needed")
    else:
        shift = stats.answers_differ(mine, theirs)
        figures["disagreement"] = {"test": shift.test, "p_value": round(shift.p_value, 6), shift.effect_name:
                                   round(shift.effect, 4), "canary_answers": len(mine), "stable_answers": len(theirs)}
        words = (f"{shift.effect_name} {shift.effect:.2f} between the canary's {len(mine)} and stable's "
                 f"{len(theirs)} answers on the same traffic ({shift.test} p={shift.p_value:.2g})")
        if shift.p_value < ALPHA and shift.effect >= DISAGREEMENT_EFFECT:
            failed.append(f"the canary answers unlike stable: {words}; a difference from {DISAGREEMENT_EFFECT:g} "
                          f"with {1 - ALPHA:.0%} confidence fails")
        else:
            passed.append(f"answers agree with stable's: {words}")
    judged = window_drift(canary, canary, since)
    if isinstance(judged, Unjudged):
        passed.append(f"inputs not judged: {judged.reason}")
    else:
        result = judged.result
        figures["drift"] = {"rows": judged.rows, "drifted_share": round(result.drifted_share, 4),
                            "drift_share": result.drift_share, "dataset_drift": result.dataset_drift,
                            "drifted_columns": [c.column for c in result.drifted[:10]]}
        if result.dataset_drift:
            failed.append(f"the canary's inputs drifted from the data it was validated on: {result.summary()}")
        else:
            passed.append(f"inputs: {result.summary()}")
    return CanaryInputs(bool(failed), "; ".join(failed or passed), {"judged": True, **figures})


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


def drift_checks(versions: list[ModelVersion]) -> int:
    """A check of each version (one pass at a time); returns how many were made."""
    made = 0
    with locks.claim("monitoring.drift") as mine:
        if not mine:
            return 0
        for version in versions:
            drift_check(version)
            made += 1
    return made
