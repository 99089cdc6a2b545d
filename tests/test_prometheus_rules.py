"""The Prometheus rules shipped in platform/prometheus/ (recording rules, the burn-rate alerts, and the
ticket for a served version whose drift checks stopped) load and behave as their unit tests say, checked by
promtool (Debian's prometheus package, which `make test` installs when it runs as root)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[1] / "platform" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; `make test` installs it as root)")
    return found


def test_the_rules_are_valid(promtool):
    out = subprocess.run([promtool, "check", "rules", "rules.yml"], cwd=RULES, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 15 rules found" in out.stdout


def test_a_sustained_burn_pages_and_a_short_burst_does_not(promtool):
    out = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=RULES, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_fails_a_rules_test_whose_expectation_is_wrong(promtool, tmp_path):
    """Negative control: the same test expecting no page where the rules page must fail."""
    text = (RULES / "rules_test.yml").read_text()
    wrong = text.replace("eval_time: 45m", "eval_time: 70m", 1)  # expects no alert at a time it fires
    (tmp_path / "rules.yml").write_text((RULES / "rules.yml").read_text())
    (tmp_path / "rules_test.yml").write_text(wrong)
    out = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "ModelErrorBudgetBurning" in out.stdout + out.stderr
