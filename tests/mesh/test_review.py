"""Interactive Creative Control through the gateway's public API, on a real mesh (the local renderer): a job
in review waits with its plan and quote; edits name the version they were made against (a stale one is
ABORTED and changes nothing), are re-quoted and kept as revisions; an approval names the version it
approves; a cancel before approval spends nothing; a gateway restart keeps all of it; a watcher sees every
change as a typed event."""

import contextlib
import threading
from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import error_info, field_violations, start_mesh, wait_terminal, watch_until
from helpers.postgres import fresh_schema

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2, gateway_pb2_grpc
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh

AWAITING = job_pb2.JOB_STATE_AWAITING_APPROVAL


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def review_mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh of its own (one of the tests restarts its gateway), on either store: every test runs on both."""
    with contextlib.ExitStack() as stack:
        environment = {}
        if request.param == "postgres":
            environment["AIPROD_DATABASE_URL"] = stack.enter_context(fresh_schema())
        running = start_mesh(tmp_path_factory.mktemp("review-mesh"), **environment)
        stack.callback(running.stop)
        yield running


def stub(mesh: Mesh, key: str | None = None) -> gateway_pb2_grpc.GatewayServiceStub:
    """A gateway stub on a fresh channel (a restarted gateway is found again), every call with the key
    (the development tenant's unless given)."""
    channel = with_api_key(grpc.insecure_channel(mesh.address("gateway")), key or mesh.api_key)
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def prefix_of(key: str) -> str:
    """An API key's prefix ("aiprod_<key id>"), which revisions, approvals and cancels record."""
    return "_".join(key.split("_")[:2])


def create(gateway, prompt: str, seconds: float = 2, preset: str = "brand_campaign", review: bool = False):
    spec = render_pb2.RenderSpec(prompt=prompt, duration_seconds=seconds, preset=preset)
    return gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec, review=review)).job


def shot_plan(prompt: str, seconds: float) -> render_pb2.RenderPlan:
    return render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt=prompt, duration_seconds=seconds)])


def edit(gateway, job_id: str, version: int, plan: render_pb2.RenderPlan) -> gateway_pb2.RenderJob:
    request = gateway_pb2.UpdateRenderManifestRequest(job_id=job_id, plan=plan, plan_version=version)
    return gateway.UpdateRenderManifest(request).job


def approve(gateway, job_id: str, version: int) -> gateway_pb2.RenderJob:
    request = gateway_pb2.ApproveRenderJobRequest(job_id=job_id, plan_version=version)
    return gateway.ApproveRenderJob(request).job


def get(gateway, job_id: str) -> gateway_pb2.RenderJob:
    return gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id)).job


def revisions(gateway, job_id: str) -> list[gateway_pb2.PlanRevision]:
    return list(gateway.ListRenderRevisions(gateway_pb2.ListRenderRevisionsRequest(job_id=job_id)).revisions)


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args)
    return raised.value


def test_edits_against_versions_then_approval_of_the_current_one_renders_it(review_mesh):
    gateway = stub(review_mesh)
    author = prefix_of(review_mesh.api_key)
    job = create(gateway, "A fox in the snow")
    assert (job.state, job.plan_version) == (AWAITING, 1)
    [first] = revisions(gateway, job.job_id)
    assert (first.plan_version, first.author, list(first.changes)) == (1, "aiprod", [])
    assert first.plan == job.plan and first.quote == job.quote

    second = edit(gateway, job.job_id, 1, shot_plan("A wolf in the snow", 2))
    assert second.plan_version == 2
    assert second.plan.shots[0].prompt == "A wolf in the snow"
    # Re-quoted: a new quote, of the route it would take now.
    assert first.HasField("quote") and second.quote.quote_id != first.quote.quote_id
    assert second.quote.backend == backend_pb2.BACKEND_LOCAL

    # A second reviewer still on version 1: ABORTED, and nothing changes.
    stale = refused(edit, gateway, job.job_id, 1, shot_plan("A hare in the snow", 2))
    assert stale.code() == grpc.StatusCode.ABORTED
    info = error_info(stale)
    assert (info.reason, info.metadata["current_version"]) == ("PLAN_VERSION_STALE", "2")
    missing = refused(edit, gateway, job.job_id, 0, shot_plan("A hare in the snow", 2))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plan_version" in field_violations(missing)
    unchanged = get(gateway, job.job_id)
    assert (unchanged.plan_version, unchanged.plan) == (2, second.plan)
    assert unchanged.last_sequence == second.last_sequence

    third = edit(gateway, job.job_id, 2, shot_plan("A wolf in the snow", 1))
    assert third.plan_version == 3
    kept = revisions(gateway, job.job_id)
    assert [revision.plan_version for revision in kept] == [1, 2, 3]
    assert [revision.author for revision in kept] == ["aiprod", author, author]
    assert [list(revision.changes) for revision in kept] == [
        [],
        ["shots[0].prompt"],
        ["shots[0].duration_seconds"],
    ]
    assert [revision.plan for revision in kept] == [job.plan, second.plan, third.plan]
    assert [revision.quote for revision in kept[1:]] == [second.quote, third.quote]
    assert all(revision.HasField("create_time") for revision in kept)
    assert [revision.create_time.ToNanoseconds() for revision in kept] == sorted(
        revision.create_time.ToNanoseconds() for revision in kept
    )

    stale = refused(approve, gateway, job.job_id, 2)
    assert stale.code() == grpc.StatusCode.ABORTED
    assert error_info(stale).reason == "PLAN_VERSION_STALE"
    assert refused(approve, gateway, job.job_id, 0).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert get(gateway, job.job_id).state == AWAITING

    assert approve(gateway, job.job_id, 3).state == job_pb2.JOB_STATE_QUEUED
    done = wait_terminal(gateway, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result.video.frame_count == 24  # the approved plan's 1 s, not the 2 s first asked for
    late = refused(edit, gateway, job.job_id, 3, shot_plan("Too late", 1))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(late).reason == "JOB_WRONG_STATE"
    assert refused(approve, gateway, job.job_id, 3).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(revisions(gateway, job.job_id)) == 3


def test_a_cancel_before_approval_ends_the_job_with_nothing_spent(review_mesh):
    gateway = stub(review_mesh)
    with grpc.insecure_channel(review_mesh.address("metrics")) as channel:
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)

        def budgets(tenant_id: str) -> list[metrics_pb2.Budget]:
            return [
                metrics.GetBudget(metrics_pb2.GetBudgetRequest(tenant_id=tenant), timeout=10).budget
                for tenant in ("", tenant_id)
            ]

        # A preset without an approval step, reviewed because the request asks.
        job = create(gateway, "A paper boat", preset="quick_social", review=True)
        assert (job.state, job.plan_version) == (AWAITING, 1)
        before = budgets(job.tenant_id)
        edit(gateway, job.job_id, 1, shot_plan("A paper boat on a pond", 2))
        cancelled = gateway.CancelRenderJob(
            gateway_pb2.CancelRenderJobRequest(job_id=job.job_id, reason="not this week")
        ).job
        assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
        assert not cancelled.HasField("handle") and not cancelled.attempts  # never sent to a renderer
        assert cancelled.reserved.amount_micros == cancelled.cost.amount_micros == 0
        after = budgets(job.tenant_id)
        assert [(b.spent, b.reserved) for b in after] == [(b.spent, b.reserved) for b in before]

    event = watch_until(gateway, job.job_id, lambda event: False)[-1]  # the job has ended
    assert event.state == job_pb2.JOB_STATE_CANCELLED and event.previous_state == AWAITING
    assert event.cancelled == gateway_pb2.Cancellation(
        reason="not this week", cancelled_by=prefix_of(review_mesh.api_key)
    )
    assert refused(approve, gateway, job.job_id, 2).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(revisions(gateway, job.job_id)) == 2


def test_review_calls_on_another_tenants_job_or_an_unknown_one_are_not_found(review_mesh):
    job = create(stub(review_mesh), "Mine to review")
    other = stub(review_mesh, review_mesh.create_api_key("review-other", admin_pb2.SLA_TIER_BRONZE))
    for job_id in (job.job_id, "job_" + "0" * 32):
        for call, *args in (
            (revisions, other, job_id),
            (edit, other, job_id, 1, shot_plan("Not yours", 1)),
            (approve, other, job_id, 1),
        ):
            error = refused(call, *args)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(error).reason == "JOB_NOT_FOUND"
    assert get(stub(review_mesh), job.job_id).state == AWAITING  # untouched


def test_a_job_in_review_keeps_its_plan_version_and_revisions_across_a_gateway_restart(review_mesh):
    gateway = stub(review_mesh)
    job = create(gateway, "Waits through a restart")
    edited = edit(gateway, job.job_id, 1, shot_plan("Waits through a restart, edited", 1))
    kept = revisions(gateway, job.job_id)

    review_mesh.kill("gateway")
    review_mesh.start_service("gateway")
    gateway = stub(review_mesh)

    again = get(gateway, job.job_id)
    assert (again.state, again.plan_version, again.plan, again.quote) == (
        AWAITING,
        2,
        edited.plan,
        edited.quote,
    )
    assert revisions(gateway, job.job_id) == kept
    assert refused(approve, gateway, job.job_id, 1).code() == grpc.StatusCode.ABORTED
    assert approve(gateway, job.job_id, 2).state == job_pb2.JOB_STATE_QUEUED
    done = wait_terminal(gateway, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.result.video.frame_count == 24


def test_a_watcher_sees_every_change_as_a_typed_event(review_mesh):
    gateway = stub(review_mesh)
    author = prefix_of(review_mesh.api_key)
    job = create(gateway, "Watched while reviewed")
    messages: list[gateway_pb2.WatchRenderJobResponse] = []
    watching = threading.Event()

    def watch() -> None:
        request = gateway_pb2.WatchRenderJobRequest(job_id=job.job_id)
        for message in stub(review_mesh).WatchRenderJob(request, timeout=120):
            messages.append(message)
            watching.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(30)  # the snapshot came: the watcher follows the job from here
    edited = edit(gateway, job.job_id, 1, shot_plan("Watched while reviewed, edited", 1))
    approve(gateway, job.job_id, 2)
    watcher.join(120)
    assert not watcher.is_alive()

    assert messages[0].job.job_id == job.job_id
    events = [message.event for message in messages[1:]]
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    # Every event says the state it left: the state of the event before it.
    assert events[0].previous_state == job_pb2.JOB_STATE_UNSPECIFIED
    assert [event.previous_state for event in events[1:]] == [event.state for event in events[:-1]]
    created, updated, approved = events[:3]
    assert (created.state, created.plan_updated.plan_version, created.plan_updated.author) == (
        AWAITING,
        1,
        "aiprod",
    )
    assert updated.state == AWAITING
    assert updated.plan_updated.plan_version == 2 and updated.plan_updated.author == author
    assert updated.plan_updated.plan == edited.plan
    assert updated.quoted == edited.quote == updated.plan_updated.quote
    assert approved.approved == gateway_pb2.Approval(plan_version=2, approver=author)
    assert approved.state == job_pb2.JOB_STATE_QUEUED
    states = [event.state for event in events]
    assert job_pb2.JOB_STATE_RUNNING in states and states[-1] == job_pb2.JOB_STATE_SUCCEEDED
    qc = [
        event.render.succeeded.qc
        for event in events
        if event.HasField("render") and event.render.HasField("succeeded")
    ]
    assert qc and qc[-1].score > 0
    assert not any(event.HasField("cancelled") for event in events)
