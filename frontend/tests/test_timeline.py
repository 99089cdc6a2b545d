"""A model's timeline page (frontend/timeline.py) through Django's test client, on the history of real rollouts
(deployer/tests/test_history.py's story: v1 first, v2 canaried and promoted by hand, v3 rolled back
automatically, v1 restored by on-call)."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest

from deployer.tests.test_history import rollout_story
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def story(unique_name, make_user, monkeypatch):
    return rollout_story(unique_name, make_user, monkeypatch)


def chart_of(page: str) -> dict:
    found = re.search(r'<script id="timeline-chart-data" type="application/json">(.*?)</script>', page, re.S)
    assert found is not None, "no chart data in the page"
    return json.loads(found.group(1))


def test_the_timeline_page_draws_one_lane_per_version_with_its_shares_and_the_decisions_marked(story, browser_as):
    resp = browser_as(Role.DATA_SCIENTIST).get(f"/models/{story.model.name}/timeline/")
    assert resp.status_code == 200
    page = resp.content.decode()
    assert "frontend/vendor/uPlot.iife.min.js" in page and "frontend/timeline-charts.js" in page
    chart = chart_of(page)
    assert [lane["label"] for lane in chart["lanes"]] == ["v1", "v2", "v3"]
    v1, v2, v3 = chart["lanes"]
    assert len(chart["times"]) == len(v1["shares"]) == len(v2["shares"]) == len(v3["shares"])
    # Nothing while v1 loads, v1 alone, then 90/10 with v2, then v2 alone, 90/10 with v3, v2 alone, then v1
    # again to the end.
    steps = list(zip(v1["shares"], v2["shares"], v3["shares"], strict=True))
    changes = [s for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]
    assert changes == [(None, None, None), (100, None, None), (90, 10, None), (None, 100, None), (None, 90, 10),
                       (None, 100, None), (100, None, None)]
    assert v2["roles"][steps.index((90, 10, None))] == "canary"
    kinds = [m["kind"] for m in chart["markers"]]
    assert kinds == ["started", "promoted", "started", "promoted", "started", "rolled_back", "restore", "promoted"]
    assert chart["markers"][5]["label"] == "v3 rolled back (automatic)"
    assert chart["since"] <= chart["times"][0] and chart["times"][-1] == chart["until"]
    assert 'data-lanes="3"' in page and 'data-markers="8"' in page


def test_the_events_are_listed_newest_first_in_words_with_who_and_why(story, browser_as):
    page = browser_as(Role.ONCALL).get(f"/models/{story.model.name}/timeline/").content.decode()
    rows = re.findall(r'<tr data-action="([^"]+)" data-kind="([^"]*)">(.*?)</tr>', page, re.S)
    assert rows[0][0] == "alias.set" and rows[-1][0] == "deployment.create"
    rolled = next(body for action, _, body in rows if action == "deployment.rolled_back")
    assert "v3 rolled back (automatic)" in rolled and "system" in rolled
    assert "automatic rollback: canary error rate 9.0% against stable&#x27;s 0.0%" in rolled
    steps = [body for action, _, body in rows if action == "deployment.progressing"]
    assert "v3 takes 10% (step 1)" in steps[0] and "v2 takes 10% (step 1)" in steps[1]
    stables = [html.unescape(body) for action, _, body in rows if action == "endpoint.stable"]
    assert ["stable version v2 → v1" in stables[0], "stable version v1 → v2" in stables[1],
            "stable version none → v1" in stables[2]] == [True, True, True]
    restore = next(body for action, kind, body in rows if kind == "restore")
    assert story.oncall.username in restore and "answers wrong since 10:00" in restore


def test_asking_at_a_moment_answers_in_words_and_a_bad_time_says_the_format(story, browser_as):
    client = browser_as(Role.RELEASE_MANAGER)
    at = story.times["v2 canary at 10%"]
    page = client.get(f"/models/{story.model.name}/timeline/", {"at": at.isoformat()}).content.decode()
    answer = re.search(r'<div class="timeline-answer" id="timeline-answer".*?</div>', page, re.S)
    assert answer is not None
    text = html.unescape(answer.group(0))
    assert f"{story.model.name} served v1 90% (stable" in text and "v2 10% (canary of deployment" in text
    assert re.findall(r'data-version="(\d+)" data-share="(\d+)" data-role="(\w+)"', text) == [
        ("1", "90", "stable"), ("2", "10", "canary")]
    assert "Alias <code>champion</code>: v1" in text
    approvers = client.get(f"/models/{story.model.name}/timeline/",
                           {"at": story.times["v2 champion"].isoformat()}).content.decode()
    assert f"Champion v2: promoted by {story.manager.username}" in approvers
    bad = client.get(f"/models/{story.model.name}/timeline/", {"at": "noon-ish"})
    assert bad.status_code == 400
    assert "expected ISO 8601 with a time zone, e.g. 2026-11-30T06:13:24Z" in bad.content.decode()


def test_a_window_reads_only_its_rows_and_the_model_page_links_to_the_timeline(story, browser_as):
    client = browser_as(Role.CI)
    since = story.times["v3 canary at 10%"]
    page = client.get(f"/models/{story.model.name}/timeline/", {"since": since.isoformat()}).content.decode()
    chart = chart_of(page)
    assert [lane["label"] for lane in chart["lanes"]] == ["v1", "v2", "v3"]
    assert chart["lanes"][2]["shares"][0] == 10  # the canary's share at the window's start, from before it
    assert [m["kind"] for m in chart["markers"]] == ["rolled_back", "restore", "promoted"]
    actions = re.findall(r'<tr data-action="([^"]+)"', page)
    assert actions == ["alias.set", "endpoint.stable", "deployment.promoted", "deployment.create",
                       "deployment.rolled_back"]
    model_page = client.get(f"/models/{story.model.name}/").content.decode()
    assert f'href="/models/{story.model.name}/timeline/"' in model_page


def test_the_chart_data_is_empty_for_a_model_that_never_served(unique_name, browser_as):
    from deployer.testing import servable_model

    servable_model(unique_name)
    page = browser_as(Role.DATA_SCIENTIST).get(f"/models/{unique_name}/timeline/").content.decode()
    assert "No version served in this window." in page and "timeline-chart-data" not in page
    assert "Nothing recorded in this window." in page


def test_the_page_needs_a_sign_in_and_an_existing_model(client, browser_as):
    assert client.get("/models/anything/timeline/").status_code == 302
    assert browser_as(Role.DATA_SCIENTIST).get("/models/no-such-model-here/timeline/").status_code == 404


def test_a_range_that_ends_before_it_starts_is_refused_in_words(story, browser_as):
    since = story.times["v2 champion"]
    resp = browser_as(Role.DATA_SCIENTIST).get(f"/models/{story.model.name}/timeline/", {
        "since": since.isoformat(), "until": (since - timedelta(hours=1)).isoformat()})
    assert resp.status_code == 400 and "since must be before until" in resp.content.decode()


def test_a_quiet_window_still_shows_what_served_through_it(story, browser_as):
    from django.utils import timezone

    page = browser_as(Role.DATA_SCIENTIST).get(f"/models/{story.model.name}/timeline/", {
        "since": timezone.now().isoformat()}).content.decode()
    chart = chart_of(page)
    assert [lane["label"] for lane in chart["lanes"]] == ["v1"]
    assert set(chart["lanes"][0]["shares"]) == {100} and chart["markers"] == []
    assert chart["times"][0] == chart["since"] and "Nothing recorded in this window." in page
