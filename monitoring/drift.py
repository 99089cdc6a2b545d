"""Drift: a window of production rows (a version's inputs, and its outputs) against the version's reference
rows, judged by Evidently 0.7's DataDriftPreset. This is the only module that imports Evidently.

Evidently picks each column's method and threshold from its type and the number of rows (for example the
Kolmogorov-Smirnov p-value for a numerical column of at most 1000 reference rows, the normed Wasserstein
distance above that, chi-square or Jensen-Shannon for categories) and calls the dataset drifted when at
least `drift_share` of the columns drift. The verdicts here are Evidently's own: its method, threshold,
score and verdict per column, from the calculation behind the preset's tests (see `judge`), never
recomputed; a model's policy may set the share and a method or threshold. Evidently's HTML report is built
apart (`html`), only when it is wanted: drawing it is most of a Report's time."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, cast

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


@dataclass(frozen=True)
class Compared:
    """What a judgement compared (the frames, the preset's settings): enough for `html` to build
    Evidently's report of it later, and only if someone wants it."""

    reference: pd.DataFrame
    current: pd.DataFrame
    columns: list[str]
    drift_share: float
    method: str | None
    threshold: float | None

    def report(self) -> Any:
        """Evidently's full Report of the judgement (a snapshot): what `Report([DataDriftPreset()])` makes."""
        from evidently import Report
        from evidently.presets import DataDriftPreset

        preset = DataDriftPreset(columns=self.columns, drift_share=self.drift_share, method=self.method,
                                 threshold=self.threshold)
        return Report([preset], include_tests=True).run(self.current, self.reference)


def judge(reference: pd.DataFrame, current: pd.DataFrame, *, outputs: tuple[str, ...] = (),
          drift_share: float = DEFAULT_DRIFT_SHARE, method: str | None = None,
          threshold: float | None = None) -> tuple[DriftResult, Compared]:
    """Evidently's DataDriftPreset verdicts on the columns both frames have; returns the result and what
    `html` needs for Evidently's report.

    The verdicts come from the calculation behind the preset's own tests, without its widgets: a
    `Report([DataDriftPreset()])` spends most of its time drawing plotly figures (a histogram and a
    line plot per column, twice) whether or not anyone looks at them. The preset's tests are the
    `DriftedColumnsCount` test (the share of drifted columns, less than `drift_share`) and one `ValueDrift`
    test per column; the count is Evidently's `DatasetDriftMetric`, which runs `get_drift_for_columns`
    on the Report's own inputs (the data definition Evidently infers from the current frame, turned into
    its legacy column mapping by the Report's input generator), and each `ValueDrift` runs the same
    `get_one_column_drift` on the same column type and options. So the per-column results of that one
    call are the preset's: the method Evidently chose, its threshold, its score and its verdict.
    `monitoring/tests/test_drift.py` checks them against a full Report, column by column."""
    columns = [c for c in reference.columns if c in current.columns]
    if not columns:
        raise ValueError("the window and the reference have no column in common")
    if current.empty or reference.empty:
        raise ValueError("an empty window or reference cannot be judged")
    compared = Compared(reference[columns], current[columns], columns, drift_share, method, threshold)
    return _verdicts(compared, set(outputs)), compared


def _verdicts(compared: Compared, outputs: set[str]) -> DriftResult:
    from evidently import Dataset, Report
    from evidently.core.report import Context, _default_input_data_generator
    from evidently.legacy.calculations.data_drift import get_drift_for_columns
    from evidently.legacy.metrics import DatasetDriftMetric
    from evidently.legacy.utils.data_operations import process_columns

    # The Report's own path to its inputs: Dataset.from_any on each frame, the current one's data
    # definition, and the legacy InputData that its legacy metrics (DatasetDriftMetric) are given.
    context = Context(Report([], include_tests=True))
    context.init_dataset(Dataset.from_any(compared.current), Dataset.from_any(compared.reference))
    data = _default_input_data_generator(context, None)
    # DriftedColumnsCount's legacy metric, as the preset builds it (no per-type or per-column settings).
    metric = DatasetDriftMetric(columns=compared.columns, drift_share=compared.drift_share,
                                stattest=compared.method, stattest_threshold=compared.threshold)
    reference = cast(pd.DataFrame, data.reference_data)
    computed = get_drift_for_columns(  # what DatasetDriftMetric.calculate runs; it keeps only the counts
        current_data=data.current_data, reference_data=reference,
        dataset_columns=process_columns(reference, data.column_mapping),
        data_drift_options=metric.drift_options, drift_share_threshold=metric.drift_share,
        # agg_data only picks the form of a plot's scatter (binned or raw), made after the verdict: raw is
        # a reference to the column, binned costs a group-by per column.
        columns=metric.columns, agg_data=False)
    found = [ColumnDrift(column=column, method=d.stattest_name, threshold=float(d.stattest_threshold),
                         score=float(d.drift_score), drifted=bool(d.drift_detected), is_output=column in outputs)
             for column, d in computed.drift_by_columns.items()]
    found.sort(key=lambda c: (not c.drifted, c.column))
    share = float(computed.share_of_drifted_columns)
    # The preset's dataset test: "Share of Drifted Columns: Less <drift_share>", failed when it is not.
    dataset_drift = not share < compared.drift_share
    return DriftResult(found, share, compared.drift_share, dataset_drift, len(compared.current),
                       len(compared.reference))


def html(compared: Compared) -> str:
    """Evidently's HTML report of a judgement (self-contained: its scripts are inlined, no CDN). It runs
    the full Report (a few seconds on 10,000 rows x 20 columns): call it only when the page is wanted."""
    return str(compared.report().get_html_str(as_iframe=False))


# The stattests Evidently 0.7 knows by name, for tabular columns (a policy's drift_method is one of them;
# monitoring/tests/test_policy_api.py checks the list against Evidently's registry).
METHODS = frozenset({"TVD", "anderson", "chisquare", "cramer_von_mises", "ed", "empirical_mmd", "es", "fisher_exact",
                     "g_test", "hellinger", "jensenshannon", "kl_div", "ks", "mannw", "psi", "t_test", "wasserstein",
                     "z"})
