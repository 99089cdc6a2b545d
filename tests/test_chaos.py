"""Chaos drills (issue 11): one trial of each fault of bench/chaos.py against a platform started for
this test (its own state folder, ports, PostgreSQL and Redis), under inference traffic, a stream of
registrations and a rollout in progress. The bench's targets, with slack on recovery for a loaded CI
machine: the bench's target is 10 s, here 30 s."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bench.chaos import FAULTS, REPO, report, run_drills

RECOVERY_LIMIT_S = 30.0


@pytest.fixture(scope="module")
def drills() -> Iterator[dict[str, Any]]:
    # Under the repository's state folder: as root, PostgreSQL runs as 'nobody', which cannot enter /tmp/pytest-of-root.
    state = REPO / ".state" / f"chaos-test-{uuid.uuid4().hex[:8]}"
    try:
        summary = run_drills(state, FAULTS, trials=1, rate=20.0)
        print(report(summary))  # shown with -s, and with the first test's failure
        yield summary
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("fault", FAULTS)
def test_after_a_sigkill_nothing_is_lost_duplicated_or_stuck_and_everything_recovers(drills: dict[str, Any],
                                                                                      fault: str) -> None:
    f = drills["per_fault"][fault]
    trial = f["trial_details"][0]
    assert f["trials"] == 1
    assert f["lost"] == 0, trial
    assert f["duplicated"] == 0, trial
    assert f["stuck"] == 0, trial
    assert f["rollouts_stuck"] == 0, trial
    # One Triton node of two dies: the other serves, so the exception (the last node) does not apply.
    assert f["failed_inference"] == 0, trial
    assert trial["back_s"] is not None, trial
    assert f["recovery_s_max"] is not None and f["recovery_s_max"] < RECOVERY_LIMIT_S, trial
