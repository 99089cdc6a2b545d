"""The Grafana dashboards in platform/grafana/ (drift, fleet, gateway, rollouts): valid dashboard JSON whose
every query parses as PromQL (checked by promtool, as recording rules) and names only series that exist: the
gateway's own (its metrics source), the platform's (monitoring/metrics.py, GET /metrics), the recording rules
of platform/prometheus/rules.yml, Triton's, or Prometheus' ALERTS."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from monitoring.metrics import FAMILIES as PLATFORM_METRICS

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "platform" / "grafana").glob("*.json"))
GATEWAY_METRICS = (REPO / "deployer" / "gateway" / "dataplane" / "src" / "metrics.rs").read_text()
RULES = (REPO / "platform" / "prometheus" / "rules.yml").read_text()
# Triton's per-model metrics (https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md)
TRITON = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us",
          "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count"}
SERIES = re.compile(r"\b([a-z_][a-z0-9_:]*)\s*(?=\{|\[)")
FUNCTIONS = {"rate", "sum", "histogram_quantile", "by", "ignoring", "group_left"}


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def _known(name: str) -> bool:
    base = re.sub(r"_(bucket|count|sum)$", "", name)
    return (base in GATEWAY_METRICS or name in PLATFORM_METRICS or f"record: {name}" in RULES or name in TRITON
            or name == "ALERTS")


def test_the_four_dashboards_are_there_and_well_formed():
    assert [d.stem for d in DASHBOARDS] == ["drift", "fleet", "gateway", "rollouts"]
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"].startswith("mlops-") and d["title"] and d["panels"]
        assert {v["name"] for v in d["templating"]["list"]} >= {"datasource"}
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]


def test_every_query_names_only_series_that_exist():
    for path in DASHBOARDS:
        for query in _queries(json.loads(path.read_text())):
            for name in set(SERIES.findall(query)) - FUNCTIONS:
                assert _known(name), f"{path.name}: {name} in {query}"


def test_every_variable_lists_the_labels_of_a_series_that_exists():
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"])
                assert found and _known(found[1]), f"{path.name}: {variable['query']}"


def test_the_known_series_check_refuses_a_name_nothing_exports():
    """Negative control: a misspelt family is not taken for one of the platform's or the gateway's."""
    assert _known("mlops_drift_drifted_share") and _known("gateway_request_duration_seconds_bucket")
    assert not _known("mlops_drift_drifted_shares") and not _known("gateway_request_latency_seconds")


def test_every_query_parses_as_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make test` installs it as root)")
    rules = ["groups:", "  - name: dashboard-queries", "    rules:"]
    for path in DASHBOARDS:
        for n, query in enumerate(_queries(json.loads(path.read_text()))):
            expr = query.replace("$triton_model", ".*").replace("$model", ".*")
            rules += [f"      - record: dashboard:{path.stem}:q{n}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "queries.yml").write_text("\n".join(rules) + "\n")
    out = subprocess.run([promtool, "check", "rules", "queries.yml"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
