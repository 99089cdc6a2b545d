"""The `make run` demo of rollouts, on the demo model that seed_demo registered:

Every version's kept engines are measured first (HIL runs on this machine's profile, judged against the p99
budget its registration declared, `hil.p99_ms`, and against the champion); a version is deployed on its
passing run, or, where it has none (v3 fails its budget; a run on a machine too busy to settle is unstable),
with a written override, as a release manager would, which the deployment and the audit log keep.

1. version 1 is deployed (a first deployment: promoted once loaded);
2. client traffic starts through the gateway (digits rows, ~20 requests/s) and keeps going;
3. version 2 (a wider network) rolls out as a canary in steps; the model is protected from its first champion
   on, so once every step has passed the rollout waits for its promotion request, which the demo's release
   manager (`demo-release-manager`, not the version's author nor the requester) approves with the evidence's
   words in the comment, as on /approvals/: then `champion` moves to it;
4. version 3 is deliberately slow (its Triton config holds each request up to 300 ms hoping to fill a
   batch: a real misconfiguration) and is rolled back automatically by the latency analysis;
5. then two of every three requests become brightness-scaled digits (each pixel 1.6 times brighter: a
   camera setting changed upstream), and the demo model's drift window is set to the last 3 minutes: the
   next drift checks see the shift and a drift alert fires on /alerts/.

Each step is skipped when it already happened (a second `make run` only restarts the traffic).
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from deployer import promotions, services
from deployer.models import (
    ACTIVE_ROLLOUT_STATES,
    Deployment,
    Endpoint,
    PromotionRequest,
    PromotionStatus,
    RolloutStatus,
)
from monitoring import services as monitoring_services
from monitoring.models import Alert, AlertKind, DriftCheck
from pipelines.models import TERMINAL_HIL_STATES, BuildStatus, EngineBuild, HilRun, HilStatus
from pipelines.services import hil_runs_request, serving_profile
from registry.audit import SYSTEM, Actor
from registry.management.commands.seed_demo import (
    DEMO_HIL_TAGS,
    DEMO_MODEL,
    demo_reference_sample,
    train_demo_model,
)
from registry.models import ModelVersion, RegisteredModel, VersionStatus
from registry.people import user_create
from registry.roles import Role
from registry.services import version_register_from_archive
from registry.tokens import user_roles

DRIFT_POLICY = {"window_minutes": 3, "min_rows": 300}  # the demo's drift window: the last 3 minutes of traffic
BRIGHTER = 1.6  # the demo's shift: pixels of two requests in three scaled by this
DRIFT_WAIT_S = 900.0  # how long the demo waits for its drift alert before saying it did not come
SLOW_TAGS = {"triton.max_queue_delay_us": "300000", "demo": "deliberately slow"}
HIL_WAIT_S = 900.0  # how long a deployment waits for its engine's HIL verdict before going without one
DEMO_APPROVER = "demo-release-manager"  # approves the demo's promotion requests
DEMO_ROLLOUT = {"steps": [10, 50], "step_interval_s": 15, "bake_s": 10, "max_p99_ms": 100.0}


class Command(BaseCommand):
    help = "Roll the demo model's versions out through the local fleet while sending it traffic."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--gateway", required=True, help="host:port of the inference gateway")
        parser.add_argument("--rate", type=float, default=20.0, help="client requests per second")
        parser.add_argument("--no-traffic-after", action="store_true", help="exit when the demo rollouts are done")

    def handle(self, *args: Any, **opts: Any) -> None:
        model = RegisteredModel.objects.filter(name=DEMO_MODEL).first()
        if model is None:
            raise CommandError(f"{DEMO_MODEL} is not registered: run seed_demo first")
        v1 = self._ready(model, 1)
        if not Endpoint.objects.filter(model=model, stable_version__isnull=False).exists():
            self._deploy(model, v1.version, {})
        stopping, shifted = threading.Event(), threading.Event()
        traffic = threading.Thread(target=self._traffic, args=(opts["gateway"], opts["rate"], stopping, shifted),
                                   daemon=True)
        traffic.start()
        try:
            v2 = self._version(model, 2, (128,), "A wider network (128 hidden units) (demo)", {})
            v2_end = self._deploy(model, v2.version, DEMO_ROLLOUT)
            v3 = self._version(model, 3, (128,), "The same network, served with a 300 ms batching delay (demo: "
                                                 "deliberately slow, rolled back by the analysis)", SLOW_TAGS)
            v3_end = self._deploy(model, v3.version, DEMO_ROLLOUT)
            self.stdout.write(self.summary(v2_end, v3_end), ending="\n")
            if opts["no_traffic_after"]:
                return
            self.stdout.write(self.drift_summary(self._drift(model, shifted)), ending="\n")
            while traffic.is_alive():
                traffic.join(5)
        finally:
            stopping.set()

    @staticmethod
    def summary(v2: Deployment, v3: Deployment) -> str:
        """What the rollouts really reached (read back from their rows), and whether that was the intent."""
        def line(d: Deployment, intended: str) -> str:
            hil = (f"HIL run {d.hil_run_id} {d.hil_run.status}" if d.hil_run and not d.hil_override
                   else f"HIL override: {d.hil_override}" if d.hil_override else "no HIL evidence")
            reached = f"v{d.version.version} {d.status} ({hil})"
            if d.status == intended:  # with its reason: who approved a promotion, what the analysis saw
                return f"{reached}: {d.reason}" if d.reason else reached
            return f"{reached} (NOT the intended {intended}: {d.reason or 'no reason recorded'})"

        lines = [line(v2, RolloutStatus.PROMOTED), line(v3, RolloutStatus.ROLLED_BACK)]
        verdict = "as intended" if all("NOT the intended" not in x for x in lines) else "NOT as intended"
        return f"Demo rollouts done, {verdict}: {'; '.join(lines)}. Traffic goes on."

    def _drift(self, model: RegisteredModel, shifted: threading.Event) -> tuple[Alert | None, DriftCheck | None, float]:
        """Shift the traffic and wait for the drift alert it should cause: one whose newest evidence is a check
        made after the shift that found the inputs drifted. Returns (that alert, or None; the newest drift check;
        seconds waited), read back from their rows."""
        monitoring_services.policy_update(SYSTEM, model, DRIFT_POLICY)
        since = timezone.now()
        shifted.set()
        self.say(f"drift: two of every three requests are now digits {BRIGHTER} times brighter; the demo model's "
                 f"drift window is the last {DRIFT_POLICY['window_minutes']} minutes, so a drift alert should fire "
                 "within a few minutes (watch /alerts/)")
        started = time.monotonic()
        last: DriftCheck | None = None
        while True:
            check = DriftCheck.objects.filter(version__model=model, created_at__gte=since).order_by("-created_at") \
                .select_related("version").first()
            if check is not None and (last is None or check.pk != last.pk):
                self.say(f"drift check of v{check.version.version}: {check.summary}")
                last = check
            if check is not None and check.dataset_drift:
                alert = Alert.objects.filter(model=model, version=check.version, kind=AlertKind.DRIFT,
                                             last_seen_at__gte=check.created_at).first()
                if alert is not None:
                    return alert, check, time.monotonic() - started
            if time.monotonic() - started >= DRIFT_WAIT_S:
                return None, last, time.monotonic() - started
            time.sleep(2)

    @staticmethod
    def drift_summary(found: tuple[Alert | None, DriftCheck | None, float]) -> str:
        alert, check, waited = found
        if alert is None or check is None:
            last = f"the newest drift check says: {check.summary}" if check is not None else "no drift check ran"
            return (f"Demo drift NOT as intended: no drift alert on drifted inputs within {waited:.0f}s of the shift; "
                    f"{last}.")
        return (f"Demo drift as intended: alert {alert.pk} ({alert.status}), {waited:.0f}s after the shift, on drift "
                f"check {check.pk}: {check.summary}. Traffic goes on, shifted.")

    def say(self, text: str) -> None:
        self.stdout.write(f"[demo] {text}")
        self.stdout.flush()

    def _version(self, model: RegisteredModel, number: int, hidden: tuple[int, ...], description: str,
                 tags: dict[str, str]) -> ModelVersion:
        existing = ModelVersion.objects.filter(model=model, version=number).first()
        if existing is None:
            self.say(f"registering v{number}: {description}")
            with tempfile.TemporaryDirectory() as tmp:
                archive = train_demo_model(Path(tmp), hidden)
                version_register_from_archive(SYSTEM, model.name, archive, description=description,
                                              tags={"demo": "true", **DEMO_HIL_TAGS, **tags},
                                              sample=demo_reference_sample())
        return self._ready(model, number)

    def _ready(self, model: RegisteredModel, number: int, timeout: float = 900) -> ModelVersion:
        """Wait for validation and every engine build (the worker does both); one must have been kept."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            version = ModelVersion.objects.filter(model=model, version=number).first()
            if version is not None and version.status == VersionStatus.INVALID:
                raise CommandError(f"demo v{number} is invalid: {version.status_detail}")
            builds = set(EngineBuild.objects.filter(version=version).values_list("status", flat=True)) \
                if version is not None else set()
            done = not builds & {BuildStatus.QUEUED, BuildStatus.RUNNING}
            if version is not None and version.status == VersionStatus.READY and done and \
                    BuildStatus.SUCCEEDED in builds:
                return version
            time.sleep(1)
        raise CommandError(f"demo v{number} was not validated and built within {timeout:.0f}s")

    def _deploy(self, model: RegisteredModel, number: int, rollout: dict[str, Any]) -> Deployment:
        """Roll the version out (or find the rollout an earlier run made) and return it once it ended."""
        done = Deployment.objects.select_related("version", "hil_run").filter(
            model=model, version__version=number).exclude(status__in=ACTIVE_ROLLOUT_STATES).order_by("-pk").first()
        if done is not None:
            self.say(f"v{number} was already deployed by an earlier run: {done.status} ({done.reason})")
            return done
        d = Deployment.objects.filter(model=model, version__version=number, status__in=ACTIVE_ROLLOUT_STATES).first()
        if d is None:
            run = self._hil(services.engine_for(ModelVersion.objects.get(model=model, version=number), "cpu"))
            override = "" if run is not None and run.status == HilStatus.PASSED else self._override_reason(
                number, run)
            d = services.deployment_create(SYSTEM, model, number, hil_override=override, **rollout)
            self.say(f"deployment {d.pk}: rolling out v{number} (steps {d.steps}, {d.step_interval_s}s each)"
                     + (f"; HIL override: {override}" if override else f" on HIL run {run.pk if run else '-'}"))
        last = ""
        while True:
            d.refresh_from_db()
            line = f"v{number}: {d.status} weight {d.weight}% {d.reason}"
            if line != last:
                self.say(line)
                last = line
            if d.status not in ACTIVE_ROLLOUT_STATES:
                return Deployment.objects.select_related("version", "hil_run").get(pk=d.pk)
            if d.status == RolloutStatus.AWAITING_APPROVAL:
                self._approve(d)
            time.sleep(1)

    def _approve(self, d: Deployment) -> None:
        """As the demo's release manager, approve the rollout's pending promotion request (filed by the
        reconciler), quoting the evidence it shows."""
        req = PromotionRequest.objects.filter(deployment=d, status=PromotionStatus.PENDING).first()
        if req is None:
            return  # not filed yet: the reconciler's next pass
        User = get_user_model()
        manager = User.objects.filter(username=DEMO_APPROVER).first() or user_create(
            SYSTEM, DEMO_APPROVER, [Role.RELEASE_MANAGER])
        evidence = {s["name"]: s for s in promotions.evidence_for(d.version, d)["sections"]}  # as it is now
        seen = "; ".join(f"{name}: {evidence[name]['outcome']}" for name in ("parity", "hil", "canary", "alerts")
                         if name in evidence)
        comment = f"demo: approved after reading the evidence ({seen})"
        done = promotions.promotion_approve(Actor(manager, "demo"), user_roles(manager), req.pk, comment)
        self.say(f"promotion request {req.pk} of v{d.version.version}: {done.status} by {DEMO_APPROVER}: {comment}")

    @staticmethod
    def _override_reason(number: int, run: HilRun | None) -> str:
        """Why the demo deploys a version without a passing HIL run, in the words a release manager would write."""
        if run is None:
            return f"demo: v{number}'s HIL run did not finish in time; deploying on the canary analysis alone"
        if run.status == HilStatus.UNSTABLE:
            return (f"demo: this shared machine was too busy for HIL run {run.pk} of v{number} to settle; deploying "
                    "on the canary analysis alone")
        return (f"demo: v{number}'s HIL run {run.pk} {run.status}; deploying it anyway to show the canary analysis "
                "rolling it back")

    def _hil(self, engine: EngineBuild, timeout: float = HIL_WAIT_S) -> HilRun | None:
        """The engine's HIL run on the fleet's profile once it has finished (asked for if there is none)."""
        profile = serving_profile(engine.target)
        runs = HilRun.objects.filter(build=engine, profile=profile)
        if not runs.exists():
            hil_runs_request(SYSTEM, engine, [profile])
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            run = runs.order_by("-pk").first()
            if run is not None and run.status in TERMINAL_HIL_STATES:
                self.say(f"HIL run {run.pk} of v{engine.version.version} ({engine.variant}) on {profile}: "
                         f"{run.verdict}")
                return run
            state = run.status if run else "not yet asked for"
            line = f"HIL run of v{engine.version.version} on {profile}: {state}"
            if line != last:
                self.say(line)
                last = line
            time.sleep(2)
        return None

    def _traffic(self, gateway: str, rate: float, stopping: threading.Event, shifted: threading.Event) -> None:
        import numpy as np
        from sklearn.datasets import load_digits

        # In a random order: the data set is sorted in blocks, and a window of traffic in its order would not
        # look like the reference sample (a random quarter) even before the shift.
        rows = load_digits().data.astype("float32")
        rows = rows[np.random.default_rng(0).permutation(len(rows))]
        host, _, port = gateway.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        engine = Endpoint.objects.select_related("stable_engine").get(model__name=DEMO_MODEL).stable_engine
        input_name = engine.io["inputs"][0]["name"] if engine is not None else "input"
        i, sent, failed, started = 0, 0, 0, time.monotonic()
        while not stopping.is_set():
            row = rows[i % len(rows)] * (BRIGHTER if shifted.is_set() and i % 3 else 1.0)
            body = json.dumps({"inputs": [{"name": input_name, "shape": [1, 64], "datatype": "FP32",
                                           "data": row.tolist()}]})
            try:
                conn.request("POST", f"/v2/models/{DEMO_MODEL}/infer", body, {"content-type": "application/json",
                                                                             "x-request-key": f"client-{i % 97}"})
                resp = conn.getresponse()
                resp.read()
                failed += resp.status != 200
            except (OSError, http.client.HTTPException):
                failed += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
            i += 1
            sent += 1
            if sent % 1000 == 0:
                self.say(f"traffic: {sent} requests sent, {failed} failed")
            stopping.wait(max(0.0, started + sent / rate - time.monotonic()))
