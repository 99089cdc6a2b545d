"""The model timeline page in a real browser (Debian's Chromium, headless): the swimlane chart drawn by the
vendored uPlot from the embedded history of real rollouts, and the answer at a moment asked through its form."""

from __future__ import annotations

import re

import pytest

from deployer.tests.test_history import rollout_story
from registry.roles import Role
from tests.test_browser import ARTIFACTS, PASSWORD, _sign_in

pytestmark = pytest.mark.browser


def test_a_release_manager_reads_what_served_when_on_the_timeline_and_asks_about_a_moment(
        platform_server, browser_page, make_user, unique_name, monkeypatch):
    page = browser_page
    story = rollout_story(unique_name, make_user, monkeypatch)
    user = make_user(Role.RELEASE_MANAGER, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)

    _sign_in(page, platform_server, user.username)
    page.goto(f"{platform_server}/models/{unique_name}/")
    page.click("#model-timeline-link")
    page.wait_for_url(f"{platform_server}/models/{unique_name}/timeline/")

    # The chart: three lanes, each named in the legend, drawn in colour (not an empty canvas), with the markers.
    page.locator("#timeline-chart[data-drawn='true']").wait_for()
    assert page.locator("#timeline-chart .uplot canvas").count() == 1
    legend = page.locator("#timeline-chart .u-legend").inner_text()
    assert all(v in legend for v in ("v1", "v2", "v3"))
    assert page.locator("#timeline-chart").get_attribute("data-markers") == "8"
    drawn = page.evaluate("""() => {
        const canvas = document.querySelector('#timeline-chart canvas');
        const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let blue = 0, red = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i + 3] < 200) continue;
            if (Math.abs(px[i] - 31) < 30 && Math.abs(px[i + 1] - 95) < 30 && Math.abs(px[i + 2] - 191) < 30) blue++;
            if (Math.abs(px[i] - 200) < 30 && Math.abs(px[i + 1] - 50) < 30 && Math.abs(px[i + 2] - 42) < 30) red++;
        }
        return {blue, red};
    }""")
    assert drawn["blue"] > 100 and drawn["red"] > 20, drawn  # v1's band, the rollback's marker
    page.screenshot(path=str(ARTIFACTS / "ui-model-timeline.png"), full_page=True)

    # Ask about the moment v2 was a canary at 10%: the answer in words under the form.
    page.fill("#timeline-at-input", story.times["v2 canary at 10%"].isoformat())
    page.click("#timeline-at button[type=submit]")
    page.wait_for_url(re.compile(r"/timeline/\?at="))
    answer = page.locator("#timeline-answer").inner_text()
    assert "v1 90% (stable" in answer and "v2 10% (canary of deployment" in answer
    assert "champion: v1" in answer
    page.locator("#timeline-chart[data-drawn='true']").wait_for()
