"""The demo says what its rollouts really reached, read back from their rows, never what it hoped."""

from __future__ import annotations

from deployer.management.commands.demo_rollouts import Command
from deployer.models import Deployment, RolloutStatus
from registry.models import ModelVersion


def _ended(number: int, status: str, reason: str, override: str = "") -> Deployment:
    from pipelines.models import HilRun

    run = HilRun(pk=40 + number, status="passed" if not override else "failed")
    return Deployment(version=ModelVersion(version=number), status=status, reason=reason, hil_run=run,
                      hil_override=override)


def test_the_summary_says_as_intended_only_when_both_rollouts_ended_as_intended():
    text = Command.summary(_ended(2, RolloutStatus.PROMOTED, "promotion request 4 approved by demo-release-manager"),
                           _ended(3, RolloutStatus.ROLLED_BACK, "canary p99 latency 301 ms exceeds 100 ms",
                                  override="demo: deploying v3 without a passing HIL run (run 43 failed)"))
    assert text == ("Demo rollouts done, as intended: v2 promoted (HIL run 42 passed): promotion request 4 approved by "
                    "demo-release-manager; v3 rolled_back (HIL override: demo: deploying v3 without a passing HIL run "
                    "(run 43 failed)): canary p99 latency 301 ms exceeds 100 ms. Traffic goes on.")


def test_a_good_version_rolled_back_is_reported_with_its_reason():
    text = Command.summary(_ended(2, RolloutStatus.ROLLED_BACK, "canary p99 latency 232.7 ms exceeds 100 ms"),
                           _ended(3, RolloutStatus.ROLLED_BACK, "canary p99 latency 301 ms exceeds 100 ms"))
    assert text.startswith("Demo rollouts done, NOT as intended: v2 rolled_back (HIL run 42 passed) (NOT the intended "
                           "promoted: canary p99 latency 232.7 ms exceeds 100 ms); v3 rolled_back (HIL run 43 passed): "
                           "canary p99 latency 301 ms exceeds 100 ms.")


def test_the_drift_summary_reads_the_alert_and_its_check_back_or_says_it_did_not_come():
    from monitoring.models import Alert, DriftCheck

    alert = Alert(pk=7, status="firing", title="digits-classifier v2: drift in its inputs and predictions")
    check = DriftCheck(pk=12, summary="drift: 47 of 65 columns drifted", dataset_drift=True)
    assert Command.drift_summary((alert, check, 130.4)) == (
        "Demo drift as intended: alert 7 (firing), 130s after the shift, on drift check 12: drift: 47 of 65 columns "
        "drifted. Traffic goes on, shifted.")
    quiet = DriftCheck(summary="no drift: 2 of 65 columns drifted")
    assert Command.drift_summary((None, quiet, 900.0)) == (
        "Demo drift NOT as intended: no drift alert on drifted inputs within 900s of the shift; the newest drift "
        "check says: no drift: 2 of 65 columns drifted.")
