"""The approvals inbox through Django's test client (and once in a real browser): pending promotion requests with
their approvals and whether the viewer may review them, a request's evidence beside the champion's, and the
decisions, each made by deployer.promotions, which says why a person may not (shown on the page, never a 500)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from deployer import promotions
from deployer.models import Deployment, Endpoint, PromotionRequest, PromotionStatus, RolloutStatus
from deployer.testing import awaiting_rollout
from registry.audit import SYSTEM
from registry.models import AuditEvent, PromotionPolicy
from registry.roles import Role

pytestmark = pytest.mark.django_db

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "approvals-test-password-1"


def waiting_rollout(name: str, make_user: Any, **policy: Any) -> dict[str, Any]:
    """deployer.testing.awaiting_rollout with its promotion request filed, as the reconciler files it."""
    found = awaiting_rollout(name, make_user, **policy)
    assert promotions.promotions_reconcile()["filed"] >= 1
    return {**found, "request": PromotionRequest.objects.get(deployment=found["deployment"])}


@pytest.fixture
def waiting(unique_name, make_user) -> dict[str, Any]:
    return waiting_rollout(unique_name, make_user)


def signed_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def row(html: str, req: PromotionRequest) -> str:
    found = re.search(rf'<tr data-request="{req.pk}"[^>]*>(.*?)</tr>', html, re.S)
    assert found is not None, f"no row for request {req.pk}"
    return found.group(1)


def nav_count(html: str) -> str | None:
    found = re.search(r'id="approvals-count"[^>]*>(\d+)<', html)
    return found.group(1) if found else None


def text(html: str) -> str:
    """The page's text with its tags and runs of white space gone (Django escapes quotes: unescaped here)."""
    plain = re.sub(r"<[^>]+>", " ", html).replace("&#x27;", "'").replace("&quot;", '"').replace("&amp;", "&")
    return re.sub(r"\s+", " ", plain)


# ---- the inbox ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/approvals/", "/approvals/1/"])
def test_anonymous_people_are_sent_to_the_login_page_from_the_approvals_pages(client, path):
    resp = client.get(path)
    assert resp.status_code == 302 and resp["Location"].startswith("/login/?next=")


def test_the_inbox_lists_pending_requests_first_with_their_approvals_and_whether_you_may_review(
        waiting, make_user, unique_name, browser_as):
    req = waiting["request"]
    decided = waiting_rollout(f"{unique_name}-b", make_user)["request"]
    promotions.promotion_cancel(SYSTEM, {Role.RELEASE_MANAGER}, decided.pk, "superseded")

    manager = browser_as(Role.RELEASE_MANAGER)
    html = manager.get("/approvals/").content.decode()
    pending = html.split('id="approvals-decided"')[0]
    mine = row(pending, req)
    assert waiting["model"].name in mine and "v3" in mine
    assert waiting["releaser"].username in mine
    assert "Awaiting approval" in mine and f'href="/deployments/{waiting["deployment"].pk}/"' in mine
    assert 'data-approvals="0/1"' in mine and "0 of 1" in mine
    assert f'href="/approvals/{req.pk}/">Review</a>' in mine
    assert f'data-request="{decided.pk}"' not in pending  # decided ones come below
    assert "Cancelled" in row(html.split('id="approvals-decided"')[1], decided)
    assert nav_count(html) == "1"  # the in-app notice to approvers

    # The requester may not approve their own request: the inbox says why, and does not count it for them.
    releaser = signed_in(waiting["releaser"]).get("/approvals/").content.decode()
    assert "You cannot approve: you requested this promotion" in text(row(releaser, req))
    assert nav_count(releaser) is None
    # Everyone who can read deployments sees the inbox; only approvers get the count.
    oncall = browser_as(Role.ONCALL).get("/approvals/").content.decode()
    assert "You cannot approve: approving needs deploy.promote" in text(row(oncall, req))
    assert 'href="/approvals/"' in oncall and nav_count(oncall) is None


def test_the_count_leaves_out_requests_whose_canary_is_still_running(waiting, browser_as):
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING)
    html = browser_as(Role.RELEASE_MANAGER).get("/approvals/").content.decode()
    assert nav_count(html) is None
    assert "its canary is still progressing" in text(row(html, waiting["request"]))


# ---- a request's page ---------------------------------------------------------------------------

def test_a_request_shows_the_candidates_evidence_beside_the_champions_with_the_policy(waiting, browser_as):
    req = waiting["request"]
    html = browser_as(Role.RELEASE_MANAGER).get(f"/approvals/{req.pk}/").content.decode()
    assert "Candidate v3" in html and "Champion v2" in html
    sections = re.findall(r'<tr data-section="(\w+)">(.*?)</tr>', html, re.S)
    assert [name for name, _ in sections] == ["lineage", "parity", "hil", "canary", "traffic", "alerts"]
    for name, cells in sections:
        assert cells.count('class="evidence-cell evidence-candidate"') == 1, name
        assert cells.count('class="evidence-cell evidence-champion"') == 1, name
    lineage = dict(sections)["lineage"]
    candidate, champion = lineage.split("evidence-champion")
    assert f"v3 registered by {waiting['author'].username}" in candidate and "badge-outcome-ok" in candidate
    assert "v2 registered by" in champion
    canary = dict(sections)["canary"]
    assert "p99 12 ms &lt;= 500 ms" in canary and f'href="/deployments/{waiting["deployment"].pk}/"' in canary
    assert "canary requests" in canary and "400" in canary  # a key figure
    page = text(html)
    assert "1 approval before" in page and "approvals count from release managers only" in page.lower()
    assert "never from the version's author (four eyes)" in page.lower()
    assert 'id="deployment-link"' in html and f'href="/deployments/{waiting["deployment"].pk}/"' in html
    assert 'id="approve-form"' in html and 'id="reject-form"' in html
    assert 'id="break-glass-form"' not in html and 'id="withdraw-form"' not in html
    assert "csrfmiddlewaretoken" in html


def test_an_eligible_release_manager_approves_with_a_comment_and_the_canary_is_promoted(waiting, browser_as):
    req = waiting["request"]
    manager = browser_as(Role.RELEASE_MANAGER)
    resp = manager.post(f"/approvals/{req.pk}/approve/", {"comment": "HIL and canary look right"})
    assert resp.status_code == 302 and resp["Location"] == f"/approvals/{req.pk}/"
    req.refresh_from_db()
    assert req.status == PromotionStatus.APPROVED
    d = Deployment.objects.get(pk=waiting["deployment"].pk)
    assert d.status == RolloutStatus.PROMOTED and d.decided_by == manager.user
    assert Endpoint.objects.get(model=waiting["model"]).stable_version.version == 3
    assert AuditEvent.objects.filter(action="promotion.approval", target_id=str(req.pk),
                                     actor_name=manager.user.username).exists()

    html = manager.get(resp["Location"]).content.decode()
    assert f"Approved: v3 of {waiting['model'].name} is the champion now" in text(html)
    assert 'data-status="approved"' in html and "1 of 1" in html
    assert "HIL and canary look right" in html and 'data-decision="approve"' in html
    assert 'id="approve-form"' not in html and 'id="reject-form"' not in html
    assert nav_count(html) is None


def test_a_policy_of_two_approvals_says_how_many_more_after_the_first(unique_name, make_user, browser_as):
    req = waiting_rollout(unique_name, make_user, approvals_required=2)["request"]
    first = browser_as(Role.RELEASE_MANAGER)
    resp = first.post(f"/approvals/{req.pk}/approve/", {"comment": ""}, follow=True)
    assert "Your approval is recorded: 1 of 2; the promotion waits for 1 more." in text(resp.content.decode())
    assert "you have already reviewed this request" in text(resp.content.decode())
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.PENDING


@pytest.mark.parametrize("who, why", [
    ("requester", "you requested this promotion: it needs another person's approval (four eyes)"),
    ("author", "you registered v3: its promotion needs another person's approval (four eyes)"),
    ("ci", "CI and service accounts may request promotions but never approve or reject them"),
    ("admin", "promotion policy counts approvals from release managers only"),
])
def test_those_who_may_not_approve_see_why_and_their_approvals_are_refused_with_it(waiting, make_user, who, why):
    req = waiting["request"]
    if who == "requester":
        user = waiting["releaser"]
    elif who == "author":  # even holding the release manager role too
        user = waiting["author"]
        user.profile.roles = [Role.DATA_SCIENTIST, Role.RELEASE_MANAGER]
        user.profile.save()
    else:
        user = make_user(Role.CI if who == "ci" else Role.ADMIN)
    client = signed_in(user)
    html = client.get(f"/approvals/{req.pk}/").content.decode()
    said = re.search(r'id="approve-problem">(.*?)</p>', html, re.S)
    assert said is not None and text(said.group(1)).startswith("You cannot approve this request:")
    assert why in text(said.group(1))
    assert 'id="approve-form"' not in html and 'data-action="approve"' not in html

    resp = client.post(f"/approvals/{req.pk}/approve/", {"comment": "looks fine to me"})
    assert resp.status_code == 403
    said = re.search(r'id="approval-error">(.*?)</div>', resp.content.decode(), re.S)
    assert said is not None and text(said.group(1)).startswith(f"Could not approve promotion request #{req.pk}:")
    assert why in text(said.group(1))
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.PENDING
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.AWAITING_APPROVAL


def test_approving_before_every_canary_step_has_passed_is_refused_on_the_page(waiting, browser_as):
    Deployment.objects.filter(pk=waiting["deployment"].pk).update(status=RolloutStatus.PROGRESSING, step_index=0,
                                                                  weight=10)
    manager = browser_as(Role.RELEASE_MANAGER)
    req = waiting["request"]
    assert 'id="approve-form"' not in manager.get(f"/approvals/{req.pk}/").content.decode()
    resp = manager.post(f"/approvals/{req.pk}/approve/", {"comment": "early"})
    assert resp.status_code == 409 and "is still progressing" in text(resp.content.decode())


def test_a_rejection_needs_a_comment_then_rolls_the_canary_back(waiting, browser_as):
    req = waiting["request"]
    manager = browser_as(Role.RELEASE_MANAGER)
    resp = manager.post(f"/approvals/{req.pk}/reject/", {"comment": "  "})
    assert resp.status_code == 400
    assert "say why the promotion is rejected (comment)" in text(resp.content.decode())
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.PENDING

    resp = manager.post(f"/approvals/{req.pk}/reject/", {"comment": "the drift check is stale"}, follow=True)
    assert resp.status_code == 200
    assert "Rejected: the canary of" in text(resp.content.decode())
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.REJECTED
    d = Deployment.objects.get(pk=waiting["deployment"].pk)
    assert d.status == RolloutStatus.ROLLED_BACK and "the drift check is stale" in d.reason
    assert 'data-decision="reject"' in resp.content.decode()


def test_the_requester_may_reject_but_not_approve_and_ci_may_do_neither(waiting, make_user):
    author = signed_in(waiting["author"])  # a data scientist: rejecting, like approving, needs deploy.promote
    assert 'id="reject-form"' not in author.get(f"/approvals/{waiting['request'].pk}/").content.decode()
    ci = signed_in(make_user(Role.CI))
    resp = ci.post(f"/approvals/{waiting['request'].pk}/reject/", {"comment": "no"})
    assert resp.status_code == 403 and "never approve or reject" in text(resp.content.decode())
    releaser = signed_in(waiting["releaser"])  # the requester, a release manager: may stop it
    html = releaser.get(f"/approvals/{waiting['request'].pk}/").content.decode()
    assert 'id="reject-form"' in html and 'id="approve-form"' not in html


def test_break_glass_is_offered_to_administrators_only_and_needs_a_reason(waiting, browser_as):
    req = waiting["request"]
    url = f"/approvals/{req.pk}/break-glass/"
    manager = browser_as(Role.RELEASE_MANAGER)
    assert 'id="break-glass-form"' not in manager.get(f"/approvals/{req.pk}/").content.decode()
    resp = manager.post(url, {"reason": "x" * 40})
    assert resp.status_code == 403 and "breaking glass needs promotion.break_glass" in text(resp.content.decode())

    admin = browser_as(Role.ADMIN)
    assert 'id="break-glass-form"' in admin.get(f"/approvals/{req.pk}/").content.decode()
    short = admin.post(url, {"reason": "urgent"})
    assert short.status_code == 400 and "at least 20 characters" in text(short.content.decode())
    assert re.search(r'<textarea name="reason"[^>]*>urgent</textarea>', short.content.decode())  # kept to mend
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionStatus.PENDING

    reason = "INC-412: v2 mislabels every EU request and the release managers are unreachable"
    resp = admin.post(url, {"reason": reason}, follow=True)
    html = resp.content.decode()
    assert "Broke glass" in text(html) and reason in html and 'data-decision="break_glass"' in html
    req.refresh_from_db()
    assert (req.status, req.break_glass) == (PromotionStatus.APPROVED, reason)
    assert Deployment.objects.get(pk=waiting["deployment"].pk).status == RolloutStatus.PROMOTED


def test_the_requester_withdraws_the_request_and_others_cannot(waiting, browser_as):
    req = waiting["request"]
    scientist = browser_as(Role.DATA_SCIENTIST)
    assert 'id="withdraw-form"' not in scientist.get(f"/approvals/{req.pk}/").content.decode()
    refused = scientist.post(f"/approvals/{req.pk}/withdraw/", {"comment": "mine now"})
    assert refused.status_code == 403 and "only its requester or a release manager" in text(refused.content.decode())

    releaser = signed_in(waiting["releaser"])
    assert 'id="withdraw-form"' in releaser.get(f"/approvals/{req.pk}/").content.decode()
    resp = releaser.post(f"/approvals/{req.pk}/withdraw/", {"comment": "the train was cancelled"}, follow=True)
    assert f"Withdrew promotion request #{req.pk}" in text(resp.content.decode())
    req.refresh_from_db()
    assert req.status == PromotionStatus.CANCELLED and "the train was cancelled" in req.outcome


def test_an_unknown_action_or_request_is_a_404(waiting, browser_as):
    manager = browser_as(Role.RELEASE_MANAGER)
    assert manager.post(f"/approvals/{waiting['request'].pk}/promote/").status_code == 404
    assert manager.get("/approvals/999999999/").status_code == 404
    assert manager.get(f"/approvals/{waiting['request'].pk}/approve/").status_code == 405


# ---- the deployment page ------------------------------------------------------------------------

def test_a_protected_rollout_waiting_for_approval_links_its_request_instead_of_a_promote_button(waiting, browser_as):
    d, req = waiting["deployment"], waiting["request"]
    html = browser_as(Role.RELEASE_MANAGER).get(f"/deployments/{d.pk}/").content.decode()
    assert 'data-action="promote"' not in html and "Approve and promote" not in html
    link = re.search(r'<a [^>]*id="promotion-request-link"[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', html)
    assert link is not None and link.group(1) == f"/approvals/{req.pk}/"
    assert "0 of 1 approvals" in link.group(2)
    assert 'data-action="abort"' in html  # the other controls stay

    # Not protected: the bare button is back (and the service allows it).
    PromotionPolicy.objects.filter(model=waiting["model"]).update(protected=False)
    html = browser_as(Role.RELEASE_MANAGER).get(f"/deployments/{d.pk}/").content.decode()
    assert 'data-action="promote"' in html


def test_promotion_is_requested_from_a_protected_rollouts_page_before_it_waits(waiting, browser_as):
    d = waiting["deployment"]
    promotions.promotion_cancel(SYSTEM, {Role.RELEASE_MANAGER}, waiting["request"].pk, "start again")
    Deployment.objects.filter(pk=d.pk).update(status=RolloutStatus.PROGRESSING, step_index=0, weight=10)
    scientist = browser_as(Role.DATA_SCIENTIST)
    html = scientist.get(f"/deployments/{d.pk}/").content.decode()
    assert 'data-action="request-promotion"' in html
    resp = scientist.post(f"/approvals/request/{d.pk}/", {"reason": "the release train leaves at 5"})
    req = PromotionRequest.objects.get(deployment=d, status=PromotionStatus.PENDING)
    assert resp.status_code == 302 and resp["Location"] == f"/approvals/{req.pk}/"
    assert (req.requested_by, req.reason) == (scientist.user, "the release train leaves at 5")
    again = scientist.post(f"/approvals/request/{d.pk}/", {}, follow=True)
    assert "is pending already" in text(again.content.decode())
    assert browser_as(Role.ONCALL).post(f"/approvals/request/{d.pk}/", {}).status_code == 403


# ---- in a real browser --------------------------------------------------------------------------



@pytest.mark.browser
def test_a_release_manager_approves_a_promotion_from_the_inbox_in_the_browser(platform_server, browser_page,
                                                                              make_user, unique_name):
    page = browser_page
    found = waiting_rollout(unique_name, make_user)
    req, d = found["request"], found["deployment"]
    manager = make_user(Role.RELEASE_MANAGER, password=PASSWORD)
    ARTIFACTS.mkdir(exist_ok=True)

    page.goto(f"{platform_server}/approvals/")
    assert "/login/" in page.url
    page.fill("#id_username", manager.username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{platform_server}/approvals/")

    # The nav tells an approver something waits for them; the inbox lists it with its approvals.
    assert page.locator(".nav-links #approvals-count").inner_text() == "1"
    pending = page.locator(f"#pending-table tr[data-request='{req.pk}']")
    assert unique_name in pending.inner_text() and "0 of 1" in pending.inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-approvals-inbox.png"), full_page=True)
    pending.locator("text=Review").click()
    page.wait_for_url(f"{platform_server}/approvals/{req.pk}/")

    # The evidence side by side: one row per section, the candidate's column beside the champion's.
    header = page.locator("#evidence-table thead").inner_text()
    assert "CANDIDATE V3" in header.upper() and "CHAMPION V2" in header.upper()  # (headers are set in capitals)
    assert page.locator("#evidence-table tbody tr").count() == 6
    lineage = page.locator("#evidence-table tr[data-section='lineage']")
    assert f"registered by {found['author'].username}" in lineage.locator(".evidence-candidate").inner_text()
    assert "v2 registered by" in lineage.locator(".evidence-champion").inner_text()
    candidate_box = lineage.locator(".evidence-candidate").bounding_box()
    champion_box = lineage.locator(".evidence-champion").bounding_box()
    assert candidate_box and champion_box and champion_box["x"] > candidate_box["x"] + candidate_box["width"] - 1
    assert abs(champion_box["y"] - candidate_box["y"]) < 1  # side by side, not one under the other
    assert "p99 12 ms <= 500 ms" in page.locator("#evidence-table tr[data-section='canary']").inner_text()
    page.screenshot(path=str(ARTIFACTS / "ui-approval-request.png"), full_page=True)

    # Approve with a comment (the page asks to confirm: this approval is the last one needed).
    page.fill("#approve-form textarea[name=comment]", "HIL and canary look right; champion beaten on p99")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#approve-form button[data-action=approve]")
    page.wait_for_url(f"{platform_server}/approvals/{req.pk}/")
    page.locator("#request-status [data-status=approved]").wait_for()
    assert "is the champion now" in page.locator(".messages").inner_text()
    assert "HIL and canary look right" in page.locator("#reviews").inner_text()
    assert page.locator("#approve-form").count() == 0
    assert page.locator(".nav-links #approvals-count").count() == 0

    # The deployment: promoted.
    page.click("#deployment-link")
    page.wait_for_url(f"{platform_server}/deployments/{d.pk}/")
    page.locator("#deployment-status [data-status=promoted]").wait_for()
    assert Deployment.objects.get(pk=d.pk).status == RolloutStatus.PROMOTED
    assert Endpoint.objects.get(model=found["model"]).stable_version.version == 3
    page.screenshot(path=str(ARTIFACTS / "ui-approval-promoted.png"), full_page=True)
