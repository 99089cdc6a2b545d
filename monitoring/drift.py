"""Drift: a window of production rows (a version's inputs, and its outputs) against the version's reference
rows, judged by Evidently 0.7's DataDriftPreset. This is the only module that imports Evidently.

Evidently picks each column's method and threshold from its type and the number of rows (for example the
Kolmogorov-Smirnov p-value for a numerical column of at most 1000 reference rows, the normed Wasserstein
distance above that, chi-square or Jensen-Shannon for categories) and calls the dataset drifted when at
least `drift_share` of the columns drift. The verdicts here are Evidently's own test results, read from
its snapshot, never recomputed; a model's policy may set the share and a method or threshold."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

os.environ.setdefault("DO_NOT_TRACK", "1")  # an air-gapped platform: no usage telemetry, ever

DEFAULT_DRIFT_SHARE = 0.5  # Evidently's default


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    method: str  # as Evidently names it: "K-S p_value", "Wasserstein distance (normed)", ...
    threshold: float
    score: float
    drifted: bool
    is_output: bool  # an output of the model (prediction drift) rather than an input


@dataclass(frozen=True)
class DriftResult:
    columns: list[ColumnDrift]
    drifted_share: float  # of all columns judged, as Evidently counts it
    drift_share: float  # the share at which the dataset counts as drifted
    dataset_drift: bool
    current_rows: int
    reference_rows: int

    @property
    def drifted(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.drifted]

    @property
    def prediction_drift(self) -> bool:
        return any(c.drifted for c in self.columns if c.is_output)

    def summary(self) -> str:
        """The verdict in words, with its figures."""
        drifted = self.drifted
        head = (f"{len(drifted)} of {len(self.columns)} columns drifted ({self.drifted_share:.0%}; the dataset "
                f"counts as drifted from {self.drift_share:.0%}) in {self.current_rows} rows against "
                f"{self.reference_rows} reference rows")
        if not drifted:
            return f"no drift: {head}"
        worst = ", ".join(f"{c.column} ({c.method} {c.score:.3g}, threshold {c.threshold:g})" for c in drifted[:5])
        more = f" and {len(drifted) - 5} more" if len(drifted) > 5 else ""
        kind = "drift" if self.dataset_drift else "some columns drifted"
        outputs = "; the model's outputs drifted too" if self.prediction_drift else ""
        return f"{kind}: {head}: {worst}{more}{outputs}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


_TEST_NAME = re.compile(r"^Value Drift for column (?P<column>.+)$")


def judge(reference: pd.DataFrame, current: pd.DataFrame, *, outputs: tuple[str, ...] = (),
          drift_share: float = DEFAULT_DRIFT_SHARE, method: str | None = None,
          threshold: float | None = None) -> tuple[DriftResult, Any]:
    """Evidently's DataDriftPreset on the columns both frames have; returns the result and Evidently's
    snapshot (for the HTML report)."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    columns = [c for c in reference.columns if c in current.columns]
    if not columns:
        raise ValueError("the window and the reference have no column in common")
    if current.empty or reference.empty:
        raise ValueError("an empty window or reference cannot be judged")
    preset = DataDriftPreset(columns=columns, drift_share=drift_share, method=method, threshold=threshold)
    snapshot = Report([preset], include_tests=True).run(current[columns], reference[columns])
    return _read(snapshot.dict(), set(outputs), drift_share, len(current), len(reference)), snapshot


def _read(doc: dict[str, Any], outputs: set[str], drift_share: float, current_rows: int,
          reference_rows: int) -> DriftResult:
    by_metric = {m["id"]: m for m in doc["metrics"]}
    found: list[ColumnDrift] = []
    dataset_drift, share = False, 0.0
    for test in doc["tests"]:
        metric = by_metric.get(test["metric_config"]["metric_id"], {})
        params = test["metric_config"]["params"]
        if params.get("type") == "evidently:metric_v2:DriftedColumnsCount":
            share = float(metric.get("value", {}).get("share", 0.0))
            dataset_drift = test["status"] == "FAIL"  # "Share of Drifted Columns: Less <drift_share>" failed
        elif params.get("type") == "evidently:metric_v2:ValueDrift":
            column = params["column"]
            found.append(ColumnDrift(column=column, method=params["method"], threshold=float(params["threshold"]),
                                     score=float(metric.get("value", float("nan"))),
                                     drifted=test["status"] == "FAIL", is_output=column in outputs))
    found.sort(key=lambda c: (not c.drifted, c.column))
    return DriftResult(found, share, drift_share, dataset_drift, current_rows, reference_rows)


def html(snapshot: Any) -> str:
    """Evidently's HTML report of a snapshot (self-contained: its scripts are inlined, no CDN)."""
    return str(snapshot.get_html_str(as_iframe=False))


# The stattests Evidently 0.7 knows by name, for tabular columns (a policy's drift_method is one of them;
# monitoring/tests/test_policy_api.py checks the list against Evidently's registry).
METHODS = frozenset({"TVD", "anderson", "chisquare", "cramer_von_mises", "ed", "empirical_mmd", "es", "fisher_exact",
                     "g_test", "hellinger", "jensenshannon", "kl_div", "ks", "mannw", "psi", "t_test", "wasserstein",
                     "z"})
