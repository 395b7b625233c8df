"""Cancels in every non-terminal state, and a gateway killed mid-render: no job lost, nothing rendered twice.

These run on their own mesh whose renderer is paced (24 frames per wall second) and whose dispatcher
drives one job at a time, so that a job can be caught queued or rendering.
"""

from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import TERMINAL, start_mesh, wait_terminal, watch_until

from aiprod.common.v1 import job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import Mesh


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("slow-mesh"),
        AIPROD_LOCAL_RENDER_PACE_FPS="24",
        AIPROD_DISPATCH_MAX_IN_FLIGHT="1",
    )
    yield running
    running.stop()


def stub(mesh: Mesh) -> gateway_pb2_grpc.GatewayServiceStub:
    channel = with_api_key(grpc.insecure_channel(mesh.address("gateway")), mesh.api_key)
    return gateway_pb2_grpc.GatewayServiceStub(channel)


def create(gateway, prompt: str, seconds: float, preset: str = "") -> gateway_pb2.RenderJob:
    spec = render_pb2.RenderSpec(prompt=prompt, duration_seconds=seconds, preset=preset)
    return gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec)).job


def is_progress(event: gateway_pb2.JobEvent) -> bool:
    return event.render.WhichOneof("kind") == "progress"


def render_at_renderer(mesh: Mesh, task_id: str) -> renderer_pb2.Render:
    with grpc.insecure_channel(mesh.address("renderer-local")) as channel:
        renderer = renderer_pb2_grpc.RendererServiceStub(channel)
        return renderer.GetRender(renderer_pb2.GetRenderRequest(task_id=task_id)).render


def test_cancel_while_rendering_cancels_the_render_at_its_backend(slow_mesh):
    gateway = stub(slow_mesh)
    job = create(gateway, "a long render to cancel", 20)
    watch_until(gateway, job.job_id, is_progress)
    cancelled = gateway.CancelRenderJob(
        gateway_pb2.CancelRenderJobRequest(job_id=job.job_id, reason="changed my mind")
    ).job
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert cancelled.error.message == "changed my mind"
    assert (
        render_at_renderer(slow_mesh, cancelled.handle.task_id).state == renderer_pb2.RENDER_STATE_CANCELLED
    )
    events = watch_until(gateway, job.job_id, lambda event: False)
    assert events[-1].state == job_pb2.JOB_STATE_CANCELLED


def test_cancel_while_queued_and_while_awaiting_approval(slow_mesh):
    gateway = stub(slow_mesh)
    busy = create(gateway, "keeps the only dispatcher busy", 20)
    watch_until(gateway, busy.job_id, is_progress)
    queued = create(gateway, "waits its turn", 1)
    assert gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=queued.job_id)).job.state == (
        job_pb2.JOB_STATE_QUEUED
    )
    awaiting = create(gateway, "waits for approval", 1, preset="brand_campaign")
    for job in (queued, awaiting):
        cancelled = gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id)).job
        assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
        assert not cancelled.HasField("handle")  # nothing was ever sent to a renderer
    gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=busy.job_id))
    for job in (queued, awaiting):
        assert wait_terminal(gateway, job.job_id).state == job_pb2.JOB_STATE_CANCELLED


def test_a_gateway_killed_mid_render_finishes_the_job_after_restart_without_rendering_twice(tmp_path):
    mesh = start_mesh(tmp_path, AIPROD_LOCAL_RENDER_PACE_FPS="24")
    try:
        gateway = stub(mesh)
        job = create(gateway, "survives a crash", 4)
        before = watch_until(gateway, job.job_id, is_progress)
        handle = gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id)).job.handle
        assert handle.task_id

        mesh.kill("gateway")
        mesh.start_service("gateway")
        gateway = stub(mesh)

        done = wait_terminal(gateway, job.job_id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.result.video.frame_count == 96
        events = watch_until(gateway, job.job_id, lambda event: False)
        # One event log: the events before the kill are still there, numbered without gaps or repeats.
        assert [event.sequence for event in events] == list(range(1, len(events) + 1))
        assert [e.SerializeToString() for e in events[: len(before)]] == [
            e.SerializeToString() for e in before
        ]
        assert events[-1].state in TERMINAL
        # No second render: every submission names the same render, which the renderer finished once.
        submitted = {event.render.submitted.task_id for event in events if event.render.HasField("submitted")}
        assert submitted == {handle.task_id}
        assert render_at_renderer(mesh, handle.task_id).state == renderer_pb2.RENDER_STATE_SUCCEEDED
    finally:
        mesh.stop()
