"""The `make run` demo of rollouts, on the demo model that seed_demo registered:

1. version 1 is deployed (a first deployment: promoted once loaded);
2. client traffic starts through the gateway (digits rows, ~20 requests/s) and keeps going;
3. version 2 (a wider network) rolls out as a canary in steps and is promoted: `champion` moves to it;
4. version 3 is deliberately slow (its Triton config holds each request up to 300 ms hoping to fill a
   batch: a real misconfiguration) and is rolled back automatically by the latency analysis.

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

from django.core.management.base import BaseCommand, CommandError

from deployer import services
from deployer.models import ACTIVE_ROLLOUT_STATES, Deployment, Endpoint, RolloutStatus
from pipelines.models import BuildStatus, EngineBuild
from registry.audit import SYSTEM
from registry.management.commands.seed_demo import DEMO_MODEL, train_demo_model
from registry.models import ModelVersion, RegisteredModel, VersionStatus
from registry.services import version_register_from_archive

SLOW_TAGS = {"triton.max_queue_delay_us": "300000", "demo": "deliberately slow"}
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
        stopping = threading.Event()
        traffic = threading.Thread(target=self._traffic, args=(opts["gateway"], opts["rate"], stopping), daemon=True)
        traffic.start()
        try:
            v2 = self._version(model, 2, (128,), "A wider network (128 hidden units) (demo)", {})
            v2_end = self._deploy(model, v2.version, DEMO_ROLLOUT)
            v3 = self._version(model, 3, (128,), "The same network, served with a 300 ms batching delay (demo: "
                                                 "deliberately slow, rolled back by the analysis)", SLOW_TAGS)
            v3_end = self._deploy(model, v3.version, DEMO_ROLLOUT)
            self.stdout.write(self.summary(v2_end, v3_end), ending="\n")
            if not opts["no_traffic_after"]:
                while traffic.is_alive():
                    traffic.join(5)
        finally:
            stopping.set()

    @staticmethod
    def summary(v2: Deployment, v3: Deployment) -> str:
        """What the rollouts really reached (read back from their rows), and whether that was the intent."""
        def line(d: Deployment, intended: str) -> str:
            reached = f"v{d.version.version} {d.status}"
            if d.status == intended:
                return reached
            return f"{reached} (NOT the intended {intended}: {d.reason or 'no reason recorded'})"

        lines = [line(v2, RolloutStatus.PROMOTED), line(v3, RolloutStatus.ROLLED_BACK)]
        verdict = "as intended" if all("NOT the intended" not in x for x in lines) else "NOT as intended"
        return f"Demo rollouts done, {verdict}: {'; '.join(lines)}. Traffic goes on."

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
                                              tags={"demo": "true", **tags})
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
        done = Deployment.objects.select_related("version").filter(model=model, version__version=number).exclude(
            status__in=ACTIVE_ROLLOUT_STATES).order_by("-pk").first()
        if done is not None:
            self.say(f"v{number} was already deployed by an earlier run: {done.status} ({done.reason})")
            return done
        d = Deployment.objects.filter(model=model, version__version=number, status__in=ACTIVE_ROLLOUT_STATES).first()
        if d is None:
            d = services.deployment_create(SYSTEM, model, number, **rollout)
            self.say(f"deployment {d.pk}: rolling out v{number} (steps {d.steps}, {d.step_interval_s}s each)")
        last = ""
        while True:
            d.refresh_from_db()
            line = f"v{number}: {d.status} weight {d.weight}% {d.reason}"
            if line != last:
                self.say(line)
                last = line
            if d.status not in ACTIVE_ROLLOUT_STATES:
                return Deployment.objects.select_related("version").get(pk=d.pk)
            time.sleep(1)

    def _traffic(self, gateway: str, rate: float, stopping: threading.Event) -> None:
        from sklearn.datasets import load_digits

        rows = load_digits().data.astype("float32")
        host, _, port = gateway.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        engine = Endpoint.objects.select_related("stable_engine").get(model__name=DEMO_MODEL).stable_engine
        input_name = engine.io["inputs"][0]["name"] if engine is not None else "input"
        i, sent, failed, started = 0, 0, 0, time.monotonic()
        while not stopping.is_set():
            body = json.dumps({"inputs": [{"name": input_name, "shape": [1, 64], "datatype": "FP32",
                                           "data": rows[i % len(rows)].tolist()}]})
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
