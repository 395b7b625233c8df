"""The gateway's public API through its generated stub, against the real mesh."""

import av
import grpc
import pytest
from helpers.mesh import TERMINAL, error_info, eventually, field_violations, wait_terminal, watch_until

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc


def create(gateway, request_id: str = "", **spec) -> gateway_pb2.RenderJob:
    spec.setdefault("prompt", "A red kite over green hills")
    spec.setdefault("duration_seconds", 1)
    request = gateway_pb2.CreateRenderJobRequest(request_id=request_id, spec=render_pb2.RenderSpec(**spec))
    return gateway.CreateRenderJob(request).job


def all_jobs(gateway) -> list[gateway_pb2.RenderJob]:
    return list(gateway.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=1000)).jobs)


def test_a_prompt_becomes_a_video_of_the_requested_size_and_duration(gateway):
    job = create(gateway, "video-169", duration_seconds=2, aspect_ratio=render_pb2.ASPECT_RATIO_16_9)
    assert job.state == job_pb2.JOB_STATE_QUEUED
    done = wait_terminal(gateway, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.backend == backend_pb2.BACKEND_LOCAL
    assert done.result.video.uri.startswith("file:///")
    with av.open(done.result.video.uri.removeprefix("file://")) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height) == (1280, 720)
        assert stream.average_rate == 24
    assert frames == 48
    assert done.result.qc.score > 0.9
    assert done.result.cost.amount_micros == 0


@pytest.mark.parametrize(
    ("aspect_ratio", "size"),
    [(render_pb2.ASPECT_RATIO_9_16, (720, 1280)), (render_pb2.ASPECT_RATIO_1_1, (960, 960))],
)
def test_aspect_ratios_give_their_frame_sizes(gateway, aspect_ratio, size):
    done = wait_terminal(gateway, create(gateway, aspect_ratio=aspect_ratio).job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert (done.result.video.width, done.result.video.height) == size


def test_watch_sends_the_job_first_then_every_event_in_order_with_the_handle_before_progress(gateway):
    job = create(gateway)
    messages = list(gateway.WatchRenderJob(gateway_pb2.WatchRenderJobRequest(job_id=job.job_id), timeout=120))
    assert messages[0].WhichOneof("kind") == "job"
    events = [message.event for message in messages[1:]]
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))
    assert events[-1].state == job_pb2.JOB_STATE_SUCCEEDED
    kinds = [event.render.WhichOneof("kind") for event in events if event.HasField("render")]
    assert kinds.index("submitted") < kinds.index("progress")
    assert kinds[-1] == "succeeded"


def test_watch_resumes_after_a_sequence_number(gateway):
    job = create(gateway)
    first = watch_until(gateway, job.job_id, lambda event: event.sequence == 3)
    rest = watch_until(gateway, job.job_id, lambda event: event.state in TERMINAL, after_sequence=3)
    assert [event.sequence for event in first] == [1, 2, 3]
    assert rest[0].sequence == 4
    assert [e.sequence for e in rest] == list(range(4, 4 + len(rest)))


def test_same_request_id_returns_the_same_job_and_a_different_request_is_refused(gateway):
    first = create(gateway, "idem-1", prompt="A lighthouse at dusk")
    again = create(gateway, "idem-1", prompt="A lighthouse at dusk")
    assert again.job_id == first.job_id
    with pytest.raises(grpc.RpcError) as refused:
        create(gateway, "idem-1", prompt="Something else")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "idem-1" in refused.value.details()
    assert sum(job.request_id == "idem-1" for job in all_jobs(gateway)) == 1
    # The same spec asking for review is a different request too.
    spec = render_pb2.RenderSpec(prompt="A lighthouse at dusk", duration_seconds=1)
    with pytest.raises(grpc.RpcError) as refused:
        gateway.CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(request_id="idem-1", spec=spec, review=True)
        )
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("request_id", "spec", "field"),
    [
        ("", {"prompt": ""}, "spec.prompt"),
        ("", {"prompt": "   \n\t"}, "spec.prompt"),
        ("", {"prompt": "x" * 2001}, "spec.prompt"),
        ("", {"duration_seconds": 31}, "spec.duration_seconds"),
        ("", {"duration_seconds": -1}, "spec.duration_seconds"),
        ("", {"preset": "premium_spot", "duration_seconds": 90}, "spec.duration_seconds"),
        ("", {"preset": "no_such_preset"}, "spec.preset"),
        ("", {"aspect_ratio": 42}, "spec.aspect_ratio"),
        (
            "",
            {"constraints": render_pb2.RenderConstraints(quality_floor=1.5)},
            "spec.constraints.quality_floor",
        ),
        ("has spaces", {}, "request_id"),
        ("x" * 65, {}, "request_id"),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(gateway, request_id, spec, field):
    before = len(all_jobs(gateway))
    with pytest.raises(grpc.RpcError) as refused:
        create(gateway, request_id, **spec)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused.value)
    assert len(all_jobs(gateway)) == before
    assert create(gateway).state == job_pb2.JOB_STATE_QUEUED  # and the service keeps serving


def test_a_duration_no_backend_renders_is_refused_naming_the_field(gateway):
    # premium_spot allows 180 s, but no configured backend renders 120 s in one shot yet.
    with pytest.raises(grpc.RpcError) as refused:
        create(gateway, preset="premium_spot", duration_seconds=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "local" in field_violations(refused.value)["spec.duration_seconds"]


def test_unknown_job_is_not_found_and_a_malformed_id_is_invalid(gateway):
    with pytest.raises(grpc.RpcError) as missing:
        gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id="job_" + "0" * 32))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # A program branches on the ErrorInfo, not on the text.
    info = error_info(missing.value)
    assert (info.reason, dict(info.metadata)) == ("JOB_NOT_FOUND", {"job_id": "job_" + "0" * 32})
    with pytest.raises(grpc.RpcError) as malformed:
        gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id="nope"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in field_violations(malformed.value)
    assert error_info(malformed.value).reason == "INVALID_ARGUMENT"


def test_cancelling_a_finished_job_is_a_failed_precondition(gateway):
    done = wait_terminal(gateway, create(gateway).job_id)
    with pytest.raises(grpc.RpcError) as refused:
        gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=done.job_id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(refused.value)
    assert (info.reason, dict(info.metadata)) == (
        "JOB_WRONG_STATE",
        {"job_id": done.job_id, "state": "JOB_STATE_SUCCEEDED"},
    )
    after = gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=done.job_id)).job
    assert after.state == job_pb2.JOB_STATE_SUCCEEDED
    assert after.last_sequence == done.last_sequence


def test_list_pages_through_every_job_newest_first_and_filters_by_state(gateway):
    created = [create(gateway, prompt=f"page test {n}").job_id for n in range(5)]
    seen, token = [], ""
    while True:
        page = gateway.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen.extend(job.job_id for job in page.jobs)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    positions = [seen.index(job_id) for job_id in created]
    assert positions == sorted(positions, reverse=True)  # newest first
    for job_id in created:
        wait_terminal(gateway, job_id)
    succeeded = gateway.ListRenderJobs(
        gateway_pb2.ListRenderJobsRequest(page_size=1000, states=[job_pb2.JOB_STATE_SUCCEEDED])
    ).jobs
    assert set(created) <= {job.job_id for job in succeeded}
    assert all(job.state == job_pb2.JOB_STATE_SUCCEEDED for job in succeeded)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "garbage!"}, "page_token"),
    ],
)
def test_bad_list_requests_name_the_field(gateway, request_fields, field):
    with pytest.raises(grpc.RpcError) as refused:
        gateway.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(**request_fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(refused.value)


def test_a_page_token_only_continues_the_query_it_came_from(gateway):
    for n in range(3):
        create(gateway, prompt=f"token test {n}")
    token = gateway.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=1)).next_page_token
    assert token
    with pytest.raises(grpc.RpcError) as refused:
        gateway.ListRenderJobs(
            gateway_pb2.ListRenderJobsRequest(
                page_size=1, page_token=token, states=[job_pb2.JOB_STATE_FAILED]
            )
        )
    assert "page_token" in field_violations(refused.value)


def test_a_preset_with_approval_waits_until_approved(gateway):
    job = create(gateway, preset="brand_campaign", duration_seconds=1)
    assert job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id)).job.last_sequence == 1
    assert job.plan_version == 1
    approved = gateway.ApproveRenderJob(
        gateway_pb2.ApproveRenderJobRequest(job_id=job.job_id, plan_version=1)
    ).job
    assert approved.state == job_pb2.JOB_STATE_QUEUED
    assert wait_terminal(gateway, job.job_id).state == job_pb2.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.RpcError) as again:
        gateway.ApproveRenderJob(gateway_pb2.ApproveRenderJobRequest(job_id=job.job_id, plan_version=1))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_the_plan_of_a_job_awaiting_approval_can_be_edited(gateway):
    job = create(gateway, preset="brand_campaign", duration_seconds=2)
    plan = render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="An edited shot", duration_seconds=1)])
    edited = gateway.UpdateRenderManifest(
        gateway_pb2.UpdateRenderManifestRequest(job_id=job.job_id, plan=plan, plan_version=1)
    ).job
    assert edited.plan.shots[0].prompt == "An edited shot"
    assert edited.plan_version == 2
    gateway.ApproveRenderJob(gateway_pb2.ApproveRenderJobRequest(job_id=job.job_id, plan_version=2))
    done = wait_terminal(gateway, job.job_id)
    assert done.result.video.frame_count == 24
    with pytest.raises(grpc.RpcError) as late:
        gateway.UpdateRenderManifest(
            gateway_pb2.UpdateRenderManifestRequest(job_id=job.job_id, plan=plan, plan_version=2)
        )
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_presets_quote_and_usage(gateway):
    presets = {
        preset.name: preset for preset in gateway.ListPresets(gateway_pb2.ListPresetsRequest()).presets
    }
    assert set(presets) == {"quick_social", "brand_campaign", "premium_spot"}
    assert presets["premium_spot"].quality_floor == 0.9
    assert presets["brand_campaign"].requires_approval
    quote = gateway.QuoteRender(
        gateway_pb2.QuoteRenderRequest(spec=render_pb2.RenderSpec(prompt="a quote", duration_seconds=6))
    ).quote
    assert quote.backend == backend_pb2.BACKEND_LOCAL
    assert quote.estimated_cost.amount_micros == quote.price.amount_micros == 0
    assert quote.quote_id.startswith("quote_")
    assert [estimate.backend for estimate in quote.estimates] == [backend_pb2.BACKEND_LOCAL]
    # The saving is measured against Runway, which this mesh does not run: it has no price to compare.
    assert quote.baseline_backend == backend_pb2.BACKEND_RUNWAY
    assert not quote.HasField("baseline_cost") and not quote.HasField("savings")
    usage = gateway.GetUsage(gateway_pb2.GetUsageRequest())
    assert sum(count.count for count in usage.jobs) == len(all_jobs(gateway))
    assert usage.spend_today.amount_micros == 0


def test_the_metrics_service_counts_jobs_per_backend_and_state(mesh, gateway):
    job = wait_terminal(gateway, create(gateway).job_id)
    assert job.state == job_pb2.JOB_STATE_SUCCEEDED
    with grpc.insecure_channel(mesh.address("metrics")) as channel:
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)

        def succeeded_locally() -> int:
            stats = metrics.GetJobStats(metrics_pb2.GetJobStatsRequest()).stats
            return sum(
                stat.count
                for stat in stats
                if stat.backend == backend_pb2.BACKEND_LOCAL and stat.state == job_pb2.JOB_STATE_SUCCEEDED
            )

        succeeded_jobs = sum(1 for job in all_jobs(gateway) if job.state == job_pb2.JOB_STATE_SUCCEEDED)
        assert eventually(lambda: succeeded_locally() >= succeeded_jobs)
        budget = metrics.GetBudget(metrics_pb2.GetBudgetRequest()).budget
        assert budget.spent.amount_micros == 0
        assert budget.cap.amount_micros == 90_000_000  # the default daily cap
        # A reservation against it works, and its release frees the money again.
        reservation = metrics.ReserveBudget(
            metrics_pb2.ReserveBudgetRequest(
                reservation_key=f"gateway-test-{job.job_id}",
                amount={"currency_code": "USD", "amount_micros": 100_000},
                job_id=job.job_id,
            )
        ).reservation
        assert (reservation.tenant_id, reservation.amount.amount_micros) == ("default", 100_000)
        reserved = metrics.GetBudget(metrics_pb2.GetBudgetRequest()).budget.reserved.amount_micros
        assert reserved == budget.reserved.amount_micros + 100_000
        metrics.ReleaseBudget(metrics_pb2.ReleaseBudgetRequest(reservation_key=reservation.reservation_key))
        released = metrics.GetBudget(metrics_pb2.GetBudgetRequest()).budget.reserved.amount_micros
        assert released == budget.reserved.amount_micros
