"""A model's serving history (deployer/history.py) rebuilt from the audit log: real rollouts driven through the
deployer's services (a fleet that has every model loaded at once, analysis verdicts given), then the answer at
moments between them, the timeline, and the API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from deployer import champions, history, services
from deployer.models import Deployment, RolloutMode, RolloutStatus
from deployer.testing import servable_model
from monitoring import canary
from registry.audit import SYSTEM, Actor, audit_record
from registry.models import RegisteredModel
from registry.roles import Role

pytestmark = pytest.mark.django_db(transaction=True)


class PlacingFleet:
    """A fleet that has the model loaded at once (loading itself is tested end to end in test_rollouts.py)."""

    kind = "placing"

    def place(self, placement: Any) -> None:
        return None


@dataclass
class Story:
    """What happened to a model, and a moment after each chapter (times taken between the writes, so each
    falls exactly between the rows before it and those after)."""

    model: RegisteredModel
    manager: Any
    oncall: Any
    times: dict[str, datetime] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.times[name] = timezone.now()


def champion_moved(model: RegisteredModel, version: int) -> None:
    """The reconciler's row when it moves MLflow's `champion` (deployer/services.py _move_champions)."""
    audit_record(SYSTEM, "alias.set", "registered_model", model.name, after={"alias": "champion", "version": version})


def advance(d: Deployment) -> Deployment:
    services.rollout_advance(Deployment.objects.select_related("model", "version").get(pk=d.pk))
    return Deployment.objects.get(pk=d.pk)


def rollout_story(name: str, make_user: Any, monkeypatch: Any) -> Story:
    """v1 first deployed (promoted once loaded); v2 canaried at 10% then promoted by a release manager; v3
    canaried at 10% and rolled back automatically on a failed window; v1 restored by on-call."""
    monkeypatch.setattr(services, "fleet", lambda: PlacingFleet())
    story = Story(servable_model(name, versions=3, int8=False), make_user(Role.RELEASE_MANAGER),
                  make_user(Role.ONCALL))
    manager, oncall = Actor(story.manager, "api"), Actor(story.oncall, "web")
    story.mark("before")
    d1 = services.deployment_create(manager, story.model, 1)
    story.mark("v1 loading")
    assert advance(d1).status == RolloutStatus.PROMOTED
    champion_moved(story.model, 1)
    story.mark("v1 champion")
    d2 = services.deployment_create(manager, story.model, 2, steps=[10, 50])
    assert advance(d2).weight == 10
    story.mark("v2 canary at 10%")
    services.deployment_promote(manager, Deployment.objects.get(pk=d2.pk))
    story.mark("v2 promoted, alias still v1")
    champion_moved(story.model, 2)
    story.mark("v2 champion")
    d3 = services.deployment_create(manager, story.model, 3, steps=[10])
    assert advance(d3).weight == 10
    story.mark("v3 canary at 10%")
    monkeypatch.setattr(services, "analyse", lambda d, now: canary.Verdict(
        "fail", "canary error rate 9.0% against stable's 0.0%",
        {"canary_requests": 50, "canary_error_rate": 0.09, "canary_p99_ms": 12.0}))
    assert advance(d3).status == RolloutStatus.ROLLED_BACK
    story.mark("v3 rolled back")
    d4 = champions.champion_rollback(oncall, story.model, "answers wrong since 10:00")
    assert advance(d4).status == RolloutStatus.PROMOTED
    champion_moved(story.model, 1)
    story.mark("v1 restored")
    story.deployments = {"d1": d1, "d2": d2, "d3": d3, "d4": d4}
    return story


@pytest.fixture
def story(unique_name: str, make_user: Any, monkeypatch: Any) -> Story:
    return rollout_story(unique_name, make_user, monkeypatch)


def shares(answer: dict[str, Any]) -> dict[int, tuple[int, str]]:
    return {s["version"]: (s["share"], s["role"]) for s in answer["serving"]}


def test_before_the_first_deployment_nothing_serves_and_no_alias_is_set(story):
    before = history.state_at(story.model, story.times["before"])
    assert before["serving"] == [] and before["aliases"] == {} and before["champion"] is None
    assert before["rollout"] is None and before["last_event"] is None
    assert before["summary"].endswith("nothing served " + story.model.name + ". No alias was set.")
    loading = history.state_at(story.model, story.times["v1 loading"])
    assert loading["serving"] == []  # loading onto the fleet: no traffic yet
    assert loading["rollout"]["status"] == "pending" and loading["rollout"]["version"] == 1
    assert loading["rollout"]["started_by"] == story.manager.username


def test_a_first_deployment_serves_all_traffic_once_loaded_and_the_reconciler_moves_the_champion_alias(story):
    answer = history.state_at(story.model, story.times["v1 champion"])
    assert shares(answer) == {1: (100, "stable")}
    assert answer["champion_alias"] == 1 and answer["rollout"] is None
    champion = answer["champion"]
    assert champion["deployment"] == story.deployments["d1"].pk
    assert champion["approvers"] == [] and champion["source"] == "deployment.promoted"
    assert champion["reason"] == "first deployment of the model: no stable version to compare with"
    assert "promoted automatically" in answer["summary"]


def test_during_a_canary_at_ten_percent_the_stable_version_serves_ninety_and_the_rollout_is_in_progress(story):
    answer = history.state_at(story.model, story.times["v2 canary at 10%"])
    assert shares(answer) == {1: (90, "stable"), 2: (10, "canary")}
    d2 = story.deployments["d2"].pk
    assert [s["deployment"] for s in answer["serving"]] == [story.deployments["d1"].pk, d2]
    rollout = answer["rollout"]
    assert (rollout["deployment"], rollout["version"], rollout["status"], rollout["step"], rollout["weight"],
            rollout["steps"], rollout["mode"]) == (d2, 2, "progressing", 0, 10, [10, 50], "canary")
    assert answer["champion_alias"] == 1
    assert "v1 90% (stable" in answer["summary"] and f"v2 10% (canary of deployment {d2}" in answer["summary"]
    assert "step 1 of 2" in answer["summary"]


def test_after_a_promotion_by_hand_the_new_version_serves_all_traffic_and_its_promoter_is_named(story):
    promoted = history.state_at(story.model, story.times["v2 promoted, alias still v1"])
    assert shares(promoted) == {2: (100, "stable")}
    assert promoted["stable_version"] == 2 and promoted["rollout"] is None
    assert promoted["champion_alias"] == 1  # MLflow's alias follows at the reconciler's next pass
    champion = promoted["champion"]
    assert champion["approvers"] == [story.manager.username] and champion["promoted_by"] == story.manager.username
    assert champion["reason"] == f"promoted by {story.manager.username}"
    assert history.state_at(story.model, story.times["v2 champion"])["champion_alias"] == 2


def test_promotion_rows_are_marked_for_their_model_only_and_only_from_when_they_were_written(story, make_user):
    d2 = story.deployments["d2"].pk
    written = timezone.now()
    # Promotion requests (their own lifecycle) record who approved, naming model, version and deployment.
    alice = make_user(Role.RELEASE_MANAGER, username=f"alice-{story.model.name}")
    audit_record(Actor(alice, "web"), "promotion.approved", "promotion", 77, after={
        "model": story.model.name, "version": 2, "deployment": d2, "approvers": [alice.username, "bob"]})
    audit_record(Actor(alice, "web"), "promotion.break_glass", "promotion", 78, after={
        "model": story.model.name, "version": 2, "deployment": d2, "reason": "incident 12"})
    audit_record(SYSTEM, "promotion.approved", "promotion", 79, after={
        "model": "another-model", "version": 2, "deployment": d2, "approvers": ["mallory"]})
    then = history.state_at(story.model, story.times["v3 canary at 10%"])
    assert then["champion"]["version"] == 2  # the rows came later: at that moment v2's promoter is all known
    assert then["champion"]["approvers"] == [story.manager.username] and then["champion"]["break_glass"] is None
    marks = history.timeline(story.model, since=written)["markers"]
    assert [m["kind"] for m in marks] == ["approval", "break_glass"]  # another model's approval is not here
    assert marks[0]["approvers"] == [alice.username, "bob"]
    assert marks[0]["label"] == f"promotion of v2 approved by {alice.username}, bob"
    assert marks[1]["label"] == f"v2 promoted by break-glass by {alice.username}"
    assert marks[1]["reason"] == "incident 12" and all(m["deployment"] == d2 for m in marks)


def test_an_approved_promotion_names_its_approvers_at_any_later_moment(unique_name, make_user, monkeypatch):
    monkeypatch.setattr(services, "fleet", lambda: PlacingFleet())
    model = servable_model(unique_name, versions=2, int8=False)
    manager = make_user(Role.RELEASE_MANAGER)
    d1 = services.deployment_create(Actor(manager, "api"), model, 1)
    advance(d1)
    d2 = services.deployment_create(Actor(manager, "api"), model, 2, steps=[10], require_approval=True)
    advance(d2)
    services.deployment_transition(d2.pk, RolloutStatus.AWAITING_APPROVAL, reason="all steps passed")
    audit_record(Actor(manager, "web"), "promotion.requested", "promotion", 5, after={
        "model": model.name, "version": 2, "deployment": d2.pk, "approvers": []})
    audit_record(Actor(manager, "web"), "promotion.approved", "promotion", 5, after={
        "model": model.name, "version": 2, "deployment": d2.pk, "approvers": ["carol", "dave"]})
    waiting = history.state_at(model, timezone.now())
    assert waiting["rollout"]["status"] == "awaiting_approval" and shares(waiting) == {1: (90, "stable"),
                                                                                         2: (10, "canary")}
    services.deployment_promote(Actor(manager, "api"), Deployment.objects.get(pk=d2.pk))
    answer = history.state_at(model, timezone.now())
    assert answer["champion"]["approvers"] == ["carol", "dave"]
    assert answer["champion"]["source"] == "promotion.approved"
    assert answer["champion"]["promoted_by"] == manager.username
    assert "approved by carol, dave" in answer["summary"]
    kinds = [m["kind"] for m in history.timeline(model)["markers"]]
    assert kinds == ["started", "promoted", "started", "awaiting_approval", "request", "approval", "promoted"]


def test_aliases_moved_by_people_are_followed_beside_the_reconcilers_champion(story, make_user):
    person = Actor(make_user(Role.DATA_SCIENTIST), "api")
    audit_record(person, "alias.set", "registered_model", story.model.name, after={"alias": "staging", "version": 3})
    set_at = timezone.now()
    audit_record(person, "alias.delete", "registered_model", story.model.name, after={"alias": "staging",
                                                                                      "version": 3})
    deleted_at = timezone.now()
    assert history.state_at(story.model, set_at)["aliases"] == {"champion": 1, "staging": 3}
    assert history.state_at(story.model, deleted_at)["aliases"] == {"champion": 1}
    spans = [(a["alias"], a["version"], a["to"] is None) for a in history.timeline(story.model)["aliases"]]
    assert spans == [("champion", 1, False), ("champion", 2, False), ("champion", 1, True), ("staging", 3, False)]
    marks = history.timeline(story.model, since=story.times["v1 restored"])["markers"]
    assert [(m["label"], m["actor"]) for m in marks] == [("staging → v3", person.name), ("staging removed",
                                                                                          person.name)]


def test_an_approval_of_an_earlier_reign_is_not_taken_for_the_restored_champions(story):
    d1 = story.deployments["d1"].pk
    # Written after the fact for the sake of the test: an approval of v1's first deployment, and one naming v1
    # with no deployment but after the restore's promotion; neither approved the restore.
    audit_record(SYSTEM, "promotion.approved", "promotion", 90, after={
        "model": story.model.name, "version": 1, "deployment": d1, "approvers": ["erin"]})
    audit_record(SYSTEM, "promotion.approved", "promotion", 91, after={
        "model": story.model.name, "version": 1, "deployment": None, "approvers": ["frank"]})
    champion = history.state_at(story.model, timezone.now())["champion"]
    assert champion["deployment"] == story.deployments["d4"].pk
    assert champion["approvers"] == [] and champion["source"] == "deployment.promoted"


def test_an_automatic_rollback_gives_all_traffic_back_to_the_stable_version_with_its_reason(story):
    during = history.state_at(story.model, story.times["v3 canary at 10%"])
    assert shares(during) == {2: (90, "stable"), 3: (10, "canary")}
    after = history.state_at(story.model, story.times["v3 rolled back"])
    assert shares(after) == {2: (100, "stable")} and after["rollout"] is None
    [rollback] = [m for m in history.timeline(story.model)["markers"] if m["kind"] == "rolled_back"]
    assert rollback["automatic"] and rollback["actor"] == "system" and rollback["version"] == 3
    assert rollback["label"] == "v3 rolled back (automatic)"
    assert rollback["reason"] == "automatic rollback: canary error rate 9.0% against stable's 0.0%"


def test_a_champion_restore_brings_the_previous_version_back_and_names_who_asked_and_why(story):
    answer = history.state_at(story.model, story.times["v1 restored"])
    d4 = story.deployments["d4"].pk
    assert shares(answer) == {1: (100, "stable")} and answer["champion_alias"] == 1
    assert answer["champion"]["deployment"] == d4 and answer["champion"]["mode"] == "restore"
    assert answer["champion"]["reason"] == (f"champion rollback: v1 restored in place of v2: answers wrong since "
                                            f"10:00 (by {story.oncall.username})")
    marks = [m for m in history.timeline(story.model)["markers"] if m["deployment"] == d4]
    assert [(m["kind"], m["actor"]) for m in marks] == [("restore", story.oncall.username),
                                                         ("promoted", "system")]
    assert marks[0]["label"] == f"champion rollback to v1 started by {story.oncall.username}"
    assert marks[0]["reason"] == f"answers wrong since 10:00 (by {story.oncall.username})"
    assert marks[1]["label"] == "v1 promoted (champion rollback)"


def test_the_timeline_holds_each_versions_share_from_change_to_change(story):
    t = story.times
    found = history.timeline(story.model)
    assert not found["truncated"] and found["since"] is None
    lanes = [(s["version"], s["share"], s["role"]) for s in found["segments"]]
    assert lanes == [(1, 100, "stable"), (1, 90, "stable"), (2, 10, "canary"), (2, 100, "stable"),
                     (2, 90, "stable"), (3, 10, "canary"), (2, 100, "stable"), (1, 100, "stable")]
    for s in found["segments"]:
        assert s["to"] is None or s["from"] < s["to"]
    assert t["v1 loading"] < found["segments"][0]["from"] < t["v1 champion"]
    assert found["segments"][-1]["to"] is None  # v1 still serves
    assert found["segments"][-2]["to"] == found["segments"][-1]["from"]  # v2 handed over at the restore
    assert [(a["alias"], a["version"]) for a in found["aliases"]] == [("champion", 1), ("champion", 2),
                                                                     ("champion", 1)]
    assert found["aliases"][-1]["to"] is None
    kinds = [m["kind"] for m in found["markers"]]
    assert kinds.count("started") == 3 and kinds.count("restore") == 1 and kinds.count("rolled_back") == 1
    assert len(found["events"]) == found["events_read"]


def test_a_window_starts_from_the_state_at_its_beginning_and_a_limit_continues_where_it_stopped(story):
    t = story.times
    window = history.timeline(story.model, since=t["v2 canary at 10%"], until=t["v3 canary at 10%"])
    first = window["segments"][:2]
    # Open at the window's start: the lanes as they were then, with the time they began.
    assert [(s["version"], s["share"]) for s in first] == [(1, 90), (2, 10)]
    assert first[0]["from"] < t["v2 canary at 10%"]
    assert all(e["at"] > t["v2 canary at 10%"] for e in window["events"])
    assert window["segments"][-1]["to"] is None and window["until"] == t["v3 canary at 10%"]

    everything = history.timeline(story.model)
    pages, since = [], None
    while True:
        page = history.timeline(story.model, since=since, limit=3)
        pages += page["events"]
        if not page["truncated"]:
            break
        assert page["events_read"] <= 3 and page["next_since"] == page["events"][-1]["at"]
        since = page["next_since"]
    assert [e["id"] for e in pages] == [e["id"] for e in everything["events"]]


def test_a_shadow_rollout_takes_no_client_traffic_and_the_share_it_is_mirrored_is_said(unique_name, make_user,
                                                                                        monkeypatch):
    monkeypatch.setattr(services, "fleet", lambda: PlacingFleet())
    model = servable_model(unique_name, versions=2, int8=False)
    actor = Actor(make_user(Role.RELEASE_MANAGER), "api")
    advance(services.deployment_create(actor, model, 1))
    d2 = services.deployment_create(actor, model, 2, mode=RolloutMode.SHADOW, shadow_share=30)
    advance(d2)
    answer = history.state_at(model, timezone.now())
    assert shares(answer) == {1: (100, "stable"), 2: (0, "shadow")}
    [shadow] = [s for s in answer["serving"] if s["role"] == "shadow"]
    assert shadow["mirrored"] == 30 and shadow["deployment"] == d2.pk
    assert "v2 no client traffic (shadow of deployment" in answer["summary"] and "30% of stable's" in answer["summary"]


def test_a_time_without_a_zone_is_utc_and_a_time_that_is_not_one_is_refused_saying_the_format():
    assert history.parse_time("2026-11-30T06:13:24") == datetime(2026, 11, 30, 6, 13, 24, tzinfo=UTC)
    assert history.parse_time("2026-11-30T07:13:24+01:00") == history.parse_time("2026-11-30T06:13:24Z")
    with pytest.raises(history.HistoryError, match="expected ISO 8601 with a time zone"):
        history.parse_time("yesterday")


# ---- the API ---------------------------------------------------------------------------------------------------


def test_the_api_answers_at_an_instant_to_the_second(story, client_as):
    client = client_as(Role.DATA_SCIENTIST)
    t = story.times["v2 canary at 10%"]
    # Whole seconds: the answer at the second after the canary's step is the canary's.
    at = (t + timedelta(seconds=1)).replace(microsecond=0)
    resp = client.get(f"/api/v1/models/{story.model.name}/history/", {"at": at.isoformat()})
    assert resp.status_code == 200, resp.content
    body = resp.json()
    expected = history.state_at(story.model, at)
    assert [(s["version"], s["share"]) for s in body["serving"]] == [(s["version"], s["share"])
                                                                     for s in expected["serving"]]
    assert body["summary"] == expected["summary"] and body["at"].startswith(at.strftime("%Y-%m-%dT%H:%M:%S"))
    zulu = client.get(f"/api/v1/models/{story.model.name}/history/",
                      {"at": story.times["v2 canary at 10%"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
    assert [(s["version"], s["share"]) for s in zulu.json()["serving"]] == [(1, 90), (2, 10)]


def test_the_api_gives_the_timeline_bounded_and_refuses_bad_times_and_unknown_models(story, client_as):
    client = client_as(Role.CI)
    url = f"/api/v1/models/{story.model.name}/history/"
    whole = client.get(url)
    assert whole.status_code == 200
    body = whole.json()
    assert [(s["version"], s["share"]) for s in body["segments"]][:3] == [(1, 100), (1, 90), (2, 10)]
    assert "from" in body["segments"][0] and body["truncated"] is False
    assert {m["kind"] for m in body["markers"]} >= {"started", "promoted", "rolled_back", "restore", "alias"}
    limited = client.get(url, {"limit": 2}).json()
    assert limited["truncated"] is True and limited["events_read"] <= 2 and limited["next_since"]
    bad = client.get(url, {"at": "last tuesday"})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == ("at: 'last tuesday' is not a time; expected ISO 8601 with a time "
                                              "zone, e.g. 2026-11-30T06:13:24Z or 2026-11-30T07:13:24+01:00")
    assert client.get(url, {"since": "2026-11-30T07:00:00Z", "until": "2026-11-30T06:00:00Z"}).status_code == 400
    assert client.get(url, {"limit": 100000}).status_code == 400
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):  # no moment UTC can name
        out = client.get(url, {"at": edge})
        assert out.status_code == 400 and "out of range" in out.json()["error"]["message"]
    missing = client.get("/api/v1/models/no-such-model-here/history/", {"at": "2026-11-30T06:13:24Z"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    from rest_framework.test import APIClient

    assert APIClient().get(url).status_code == 401


@pytest.mark.parametrize("role", Role.values)
def test_every_role_may_read_a_models_history(role, client_as, unique_name):
    servable_model(unique_name, versions=1, int8=False)
    resp = client_as(role).get(f"/api/v1/models/{unique_name}/history/", {"at": "2026-11-30T06:13:24Z"})
    assert resp.status_code == 200, resp.content  # deploy.read: everyone
    assert resp.json()["serving"] == [] and resp.json()["rollout"] is None
