"""The SLO figures from PromQL (PROMETHEUS_URL) against the platform's own (SloSample): a real Prometheus
server (Debian's `prometheus`, which `make test` installs when root) scraping a real gateway every second,
while requests go through that gateway to a real Triton model that answers, fails and is slow on cue."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from config.stack import free_port
from deployer.gateway.echo_model import write_echo_model
from deployer.gateway.routing import publish_routes
from deployer.testing import gateway_process, stop_process, wait_until
from monitoring import slo
from monitoring.models import MonitorPolicy, SloSample
from registry.models import ModelVersion, RegisteredModel

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

SCRAPE_MS = 1000  # Prometheus durations are whole numbers of a unit
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture
def prometheus_binary() -> str:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("prometheus is not installed (Debian's prometheus package; `make test` installs it as root)")
    return PROMETHEUS


@pytest.fixture
def triton(tmp_path: Path) -> Any:
    """One Triton server with the echo model; the test says through `fault` when it fails or is slow."""
    import tritonclient.http as triton_http

    from pipelines.triton_local import TritonServer

    fault = tmp_path / "fault"
    write_echo_model(tmp_path / "repo", "slo_echo_v1", 1.0, fault_file=fault)
    server = TritonServer(tmp_path / "repo", tmp_path / "triton")
    server.start()
    try:
        client = triton_http.InferenceServerClient(server.url)
        client.load_model("slo_echo_v1")
        client.close()
        yield server, fault
    finally:
        server.stop()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, query: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
            data = json.loads(r.read())
        assert data["status"] == "success", data
        return list(data["data"]["result"])

    def targets(self) -> list[tuple[str, str, str]]:
        """(job, health, last error) of each target: what a failed wait shows."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            active = json.loads(r.read())["data"]["activeTargets"]
        return [(t["labels"]["job"], t["health"], t["lastError"]) for t in active]

    def wait(self, query: str, timeout: float, what: str) -> Any:
        """The first value of `query` once there is one, within `timeout`."""
        try:
            return wait_until(lambda: self.value(query), timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; Prometheus' targets: {self.targets()}") from None

    def value(self, query: str) -> float | None:
        result = self.query(query)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(prometheus_binary: str, tmp_path: Path) -> Any:
    """A Prometheus server of the test's own (free port, its own storage), scraping every second:
    start({job: {"targets": [...], more scrape settings}})."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(jobs: dict[str, dict[str, Any]]) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": f"{SCRAPE_MS}ms", "evaluation_interval": f"{SCRAPE_MS}ms",
                       "scrape_timeout": f"{SCRAPE_MS * 4 // 5}ms"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": spec["targets"]}],
                                **{k: v for k, v in spec.items() if k != "targets"}}
                               for job, spec in jobs.items()]}))
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_until(ready, 30, "Prometheus ready", procs[-1])
        return Prometheus(url)

    yield start
    for proc in procs:
        stop_process(proc, 10)


def _client(port: int, model: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]})

    def infer() -> int:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    return infer


def _send(infer: Any, fault: Path, ok: int, slow: int, failing: int) -> dict[str, int]:
    """`slow` requests the model answers after 150 ms (over the 100 ms objective), `failing` it fails (the
    gateway answers 500), `ok` it answers at once; what the client saw."""
    seen = {"requests": 0, "errors": 0}
    for content, n in (("sleep:0.15", slow), ("error", failing), (None, ok)):
        if content is None:
            fault.unlink(missing_ok=True)
        else:
            fault.write_text(content)
        for _ in range(n):
            status = infer()
            seen["requests"] += 1
            seen["errors"] += status >= 500
    fault.unlink(missing_ok=True)
    return seen


def test_promql_counts_the_same_requests_errors_and_slow_requests_as_the_platforms_own_samples(
        prometheus, triton, unique_name, settings, tmp_path):  # prometheus first: its skip before Triton starts
    import redis

    server, fault = triton
    model = RegisteredModel.objects.create(name=unique_name)
    policy = MonitorPolicy.objects.create(model=model, slo_latency_ms=100)
    version = ModelVersion.objects.create(model=model, version=1, origin="upload", source="s", status="ready")
    routes_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/4"  # a Redis database of the test's own
    routes = redis.Redis.from_url(routes_url)
    publish_routes(routes, {unique_name: {"stable": {"version": "1", "triton_model": "slo_echo_v1",
                                                     "nodes": [server.url]}, "canary": None}})
    try:
        with gateway_process(routes_url, tmp_path / "gateway.log", "--sample-rate", "0", "--routes-poll-s", "0.2",
                             ) as (port, _proc):
            _compare(version, policy, port, fault, prometheus, settings)
    finally:
        routes.flushdb()
        routes.close()


def _compare(version: ModelVersion, policy: MonitorPolicy, port: int, fault: Path, prometheus: Any,
             settings: Any) -> None:
    name = version.model.name
    gateway = f"http://127.0.0.1:{port}/metrics"

    def routed() -> bool:  # a readiness probe, not an inference: it counts in no figure
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", f"/v2/models/{name}/ready")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    wait_until(routed, 30, "the gateway routing the model")
    prom = prometheus({"gateway": {"targets": [f"127.0.0.1:{port}"]}})
    labels = f'model="{name}",version="1"'

    def scraped(requests: int, errors: int) -> bool:
        """Prometheus holds the gateway's figures as they are once the client has had every answer."""
        return (prom.value(f"sum(gateway_request_duration_seconds_count{{{labels}}})") == requests
                and (prom.value(f"sum(gateway_request_errors_total{{{labels}}})") or 0) == errors)

    wait_until(lambda: scraped(0, 0), 30, "Prometheus scraping the gateway")

    def sample() -> datetime:  # the platform's own sampling, as its SLO tick does it (PROMETHEUS_URL unset)
        settings.PLATFORM = {**settings.PLATFORM, "PROMETHEUS_URL": ""}
        now = timezone.now()
        slo.slo_tick([gateway], [version], now)
        return now

    t0 = sample()
    infer = _client(port, name)
    first = _send(infer, fault, ok=60, slow=4, failing=5)
    wait_until(lambda: scraped(first["requests"], first["errors"]), 20, "the first burst in Prometheus")
    t1 = sample()
    # The short window below starts half a second after t1: wait for a scrape after that start, so that the
    # window's first sample holds the first burst's figures and the second burst comes after it.
    start = t1.timestamp() + 0.5
    wait_until(lambda: (prom.value(f"max(timestamp(gateway_request_duration_seconds_count{{{labels}}}))") or 0)
               > start, 20, "a scrape after the short window's start")
    second = _send(infer, fault, ok=80, slow=3, failing=2)
    total = {k: first[k] + second[k] for k in first}
    wait_until(lambda: scraped(total["requests"], total["errors"]), 20, "the second burst in Prometheus")
    t2 = sample()
    assert SloSample.objects.filter(version=version).count() == 3
    assert t0 < t1 < t2

    # 1. The SLO's own windows (5 min to 6 h), at the same moment: every series began inside them (Prometheus
    # and the gateway started within the last minute), so PromQL counts each from zero, as the samples do from
    # the first, taken before any request: exactly the same counts, and the ones the client saw.
    own = {b.kind: b for b in slo.evaluate(version, policy, t2)}
    settings.PLATFORM = {**settings.PLATFORM, "PROMETHEUS_URL": prom.url}
    promql = {b.kind: b for b in slo.evaluate(version, policy, t2)}
    for kind, b in own.items():
        assert promql[kind].counts == b.counts, kind
        assert promql[kind].rates == b.rates, kind
    for window, counts in own[next(iter(own))].counts.items():
        assert counts["requests"] == total["requests"] and counts["errors"] == total["errors"], window
        assert counts["slow"] >= 7, window  # 7 requests took 150 ms; any other over 100 ms counts too

    # 2. A window that begins between the two bursts, when every series already existed: PromQL's increase()
    # sees the second burst between the window's first and last scrapes, and extrapolates it to the window's
    # edges by at most 1.1 average scrape intervals at each (Prometheus' extrapolatedRate), never less than
    # the increase between its first and last sample. So, from the scrapes the window holds: exact <= PromQL
    # <= exact * (sampled + 2.2 * interval) / sampled. The samples count the second burst exactly.
    window = t2 - t1 - timedelta(seconds=0.5)
    exact = slo.window_counts(version, window, t2)
    assert exact.requests == second["requests"] and exact.errors == second["errors"]
    assert exact.slow >= 3
    from_promql = slo.prometheus_counts(version, policy, [window], t2)[window]
    ms = int(window.total_seconds() * 1000)
    raw = prom.query(f"gateway_request_duration_seconds_count{{{labels}}}[{ms}ms]", at=t2.timestamp())
    stamps = [float(t) for t, _ in raw[0]["values"]]
    sampled = stamps[-1] - stamps[0]
    interval = sampled / (len(stamps) - 1)
    most = (sampled + 2.2 * interval) / sampled
    for figure in ("requests", "errors", "slow"):
        got, want = getattr(from_promql, figure), getattr(exact, figure)
        assert want <= got + 1e-9 and got <= want * most + 1e-9, (figure, got, want, most)


def test_prometheus_scrapes_the_platforms_drift_and_alert_figures_with_a_platform_token(
        prometheus, live_server, make_user, token_for, unique_name):
    """Through the platform's URLs, views and authentication, served by pytest-django's live server (a thread
    of this process: the production uWSGI takes half a minute to load its workers on a busy machine, and
    tests/test_web_server.py covers it): with a token the figures arrive, without one the scrape is refused
    (the target is down)."""
    from monitoring.models import Alert, AlertKind, DriftCheck, DriftOutcome
    from registry.roles import Role

    model = RegisteredModel.objects.create(name=unique_name)
    version = ModelVersion.objects.create(model=model, version=2, origin="upload", source="s", status="ready")
    DriftCheck.objects.create(version=version, outcome=DriftOutcome.DRIFT, summary="s", dataset_drift=True,
                              drifted_share=0.75, current_rows=300, reference_rows=200, columns=[
                                  {"column": "input_0", "method": "K-S p_value", "threshold": 0.05, "score": 0.001,
                                   "drifted": True, "is_output": False}])
    Alert.objects.create(fingerprint=unique_name, model=model, version=version, kind=AlertKind.DRIFT, title="t",
                         summary="s", runbook="r", last_seen_at=timezone.now())
    target = live_server.url.removeprefix("http://")
    token = token_for(make_user(Role.ONCALL))
    prom = prometheus({"platform": {"targets": [target], "authorization": {"credentials": token}},
                       "platform-without-token": {"targets": [target]}})
    labels = f'model="{unique_name}",version="2"'
    share = prom.wait(f"mlops_drift_drifted_share{{{labels}}}", 30, "the drift figures scraped")
    assert share == 0.75
    assert prom.value(f'mlops_drift_column_score{{{labels},column="input_0",method="K-S p_value"}}') == 0.001
    assert prom.value(f'mlops_alerts_open{{model="{unique_name}",kind="drift",status="firing"}}') == 1
    assert wait_until(lambda: prom.query('up{job="platform-without-token"}'), 10, "the refused scrape")[0][
        "value"][1] == "0"
    assert prom.value('up{job="platform"}') == 1
