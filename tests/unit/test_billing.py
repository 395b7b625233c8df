"""Each provider's billing rules, as its adapter's charge_micros states them (PROVIDERS.md, issue 9)."""

import pytest

from aiprod.common.v1 import render_pb2
from aiprod_kit.rendering.provider import ProviderTask, TaskState, VideoSource
from aiprod_kit.settings import ReplicateSettings, RunwaySettings, VeoSettings
from aiprod_renderers.replicate.provider import ReplicateProvider
from aiprod_renderers.runway.provider import RunwayProvider
from aiprod_renderers.veo.provider import VeoProvider

SHOT = render_pb2.Shot(prompt="A fox", duration_seconds=4, aspect_ratio=render_pb2.ASPECT_RATIO_16_9)
VIDEO = VideoSource(url="https://outputs.test/video.mp4")
SUCCEEDED = ProviderTask(TaskState.SUCCEEDED, 1.0, outputs=(VIDEO,))
RUNNING = ProviderTask(TaskState.RUNNING, 0.5)


def failed(code: str) -> ProviderTask:
    return ProviderTask(TaskState.FAILED, failure_code=code, failure_message="no")


@pytest.fixture
def runway() -> RunwayProvider:
    return RunwayProvider(RunwaySettings(RUNWAYML_API_SECRET="key", model="gen4.5"))  # type: ignore[call-arg]


@pytest.fixture
def veo() -> VeoProvider:
    return VeoProvider(
        VeoSettings(GOOGLE_CLOUD_PROJECT="project", access_token="token", model="veo-3.0-generate-001")  # type: ignore[call-arg]
    )


@pytest.fixture
def replicate() -> ReplicateProvider:
    return ReplicateProvider(
        ReplicateSettings(REPLICATE_API_TOKEN="token", model="minimax/video-01", price_per_second_usd=0.05)  # type: ignore[call-arg]
    )


# gen4.5: 12 credits a second, 1 credit = 0.01 USD.
RUNWAY_ESTIMATE = 4 * 12 * 10_000


def test_runway_success_costs_what_runway_reports_else_the_list_price(runway: RunwayProvider) -> None:
    reported = ProviderTask(TaskState.SUCCEEDED, 1.0, outputs=(VIDEO,), cost_micros=470_000)
    assert runway.charge_micros(SHOT, reported) == 470_000
    assert runway.charge_micros(SHOT, SUCCEEDED) == RUNWAY_ESTIMATE


@pytest.mark.parametrize("code", ["SAFETY.INPUT.TEXT", "SAFETY.OUTPUT.VIDEO", "INTERNAL", "ASSET.INVALID"])
def test_runway_refunds_every_failure(runway: RunwayProvider, code: str) -> None:
    assert runway.charge_micros(SHOT, failed(code)) == 0


@pytest.mark.parametrize("seen", [None, RUNNING, ProviderTask(TaskState.PENDING), SUCCEEDED])
def test_runway_bills_a_cancel_in_full_in_any_state(
    runway: RunwayProvider, seen: ProviderTask | None
) -> None:
    assert runway.charge_micros(SHOT, seen, cancelled=True) == RUNWAY_ESTIMATE


def test_runway_bills_a_cancel_seen_at_runway_and_a_lost_task_in_full(runway: RunwayProvider) -> None:
    assert runway.charge_micros(SHOT, ProviderTask(TaskState.CANCELLED)) == RUNWAY_ESTIMATE
    assert runway.charge_micros(SHOT, None) == RUNWAY_ESTIMATE


# veo-3.0-generate-001 without audio: 0.20 USD a second.
VEO_PRICE = 4 * 200_000


def test_veo_bills_each_video_delivered(veo: VeoProvider) -> None:
    assert veo.charge_micros(SHOT, SUCCEEDED) == VEO_PRICE
    two = ProviderTask(TaskState.SUCCEEDED, 1.0, outputs=(VIDEO, VIDEO))
    assert veo.charge_micros(SHOT, two) == 2 * VEO_PRICE


@pytest.mark.parametrize(
    "task",
    [failed("INTERNAL"), failed("SAFETY.OUTPUT.58061214"), ProviderTask(TaskState.SUCCEEDED, 1.0)],
    ids=["error", "every-video-filtered", "done-without-video"],
)
def test_veo_bills_nothing_without_a_video(veo: VeoProvider, task: ProviderTask) -> None:
    assert veo.charge_micros(SHOT, task) == 0


@pytest.mark.parametrize("seen", [None, RUNNING])
def test_veo_cancel_is_billed_at_the_full_list_price(veo: VeoProvider, seen: ProviderTask | None) -> None:
    # Vertex has no cancel: the operation runs on and bills if it succeeds.
    assert veo.charge_micros(SHOT, seen, cancelled=True) == VEO_PRICE


def test_veo_with_audio_bills_the_audio_price() -> None:
    provider = VeoProvider(
        VeoSettings(GOOGLE_CLOUD_PROJECT="project", access_token="token", generate_audio=True)  # type: ignore[call-arg]
    )
    assert provider.charge_micros(SHOT, SUCCEEDED) == 4 * 400_000


REPLICATE_SHOT = render_pb2.Shot(prompt="A fox", duration_seconds=6)


def test_replicate_bills_a_success_per_second_of_output(replicate: ReplicateProvider) -> None:
    assert replicate.charge_micros(REPLICATE_SHOT, SUCCEEDED) == 6 * 50_000


@pytest.mark.parametrize(
    ("task", "cancelled"),
    [(failed("SAFETY.INPUT"), False), (ProviderTask(TaskState.CANCELLED), False), (RUNNING, True)],
    ids=["failed", "canceled-at-replicate", "canceled-here"],
)
def test_replicate_bills_nothing_for_a_failure_or_a_cancel(
    replicate: ReplicateProvider, task: ProviderTask, cancelled: bool
) -> None:
    assert replicate.charge_micros(REPLICATE_SHOT, task, cancelled=cancelled) == 0


def test_limits_are_capabilities() -> None:
    runway = RunwayProvider(RunwaySettings(RUNWAYML_API_SECRET="key")).capabilities()  # type: ignore[call-arg]
    assert (runway.max_prompt_characters, runway.max_image_bytes) == (1000, 5 * 1024 * 1024)
    veo = VeoProvider(VeoSettings(GOOGLE_CLOUD_PROJECT="p", access_token="t")).capabilities()  # type: ignore[call-arg]
    assert veo.max_prompt_characters == 4000 and veo.max_image_bytes > 0
    replicate = ReplicateProvider(ReplicateSettings(REPLICATE_API_TOKEN="t")).capabilities()  # type: ignore[call-arg]
    assert (replicate.max_prompt_characters, replicate.max_image_bytes) == (0, 0)
    configured = ReplicateProvider(
        ReplicateSettings(REPLICATE_API_TOKEN="t", max_prompt_characters=2000, max_image_bytes=1000)  # type: ignore[call-arg]
    ).capabilities()
    assert (configured.max_prompt_characters, configured.max_image_bytes) == (2000, 1000)
