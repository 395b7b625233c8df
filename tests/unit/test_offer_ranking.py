"""Models as route candidates: a backend offering several models and resolutions is one candidate per
offer, each at its own price and quality and within its own limits, and the renderer bills, sizes and
starts a render by the offer it was asked for. The offers are the real providers' tables."""

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.capabilities import Offered, find_offer, offer_capabilities, offers, shot_mismatches
from aiprod_kit.checks import shot_violations
from aiprod_kit.rendering.provider import ProviderTask, TaskState
from aiprod_kit.settings import ConfigurationError, RunwaySettings, VeoSettings
from aiprod_renderers.runway.provider import RunwayProvider
from aiprod_renderers.veo.provider import VeoProvider
from aiprod_router.policy import BackendView, RouteRequest, rank_backends

RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
FIRST_FRAME = render_pb2.Image(uri="https://example.com/first.png")


def runway(offered: str = "gen4_turbo,veo3.1_fast,veo3.1_fast@1080p") -> RunwayProvider:
    return RunwayProvider(RunwaySettings(RUNWAYML_API_SECRET="key", offers=offered))  # type: ignore[call-arg]


def veo(offered: str) -> VeoProvider:
    return VeoProvider(VeoSettings(GOOGLE_CLOUD_PROJECT="p", access_token="t", offers=offered))  # type: ignore[call-arg]


def shot(seconds: float = 4, image: bool = False, resolution: str = "") -> render_pb2.Shot:
    return render_pb2.Shot(
        prompt="a lighthouse at dusk",
        duration_seconds=seconds,
        aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
        first_frame=FIRST_FRAME if image else None,
        resolution=resolution,
    )


def ranked(request: RouteRequest, *providers: RunwayProvider | VeoProvider) -> list:
    views = [BackendView(p.backend, p.capabilities(), serving=True) for p in providers]
    return rank_backends(request, views)


def first(request: RouteRequest, *providers: RunwayProvider | VeoProvider) -> tuple[str, str, str]:
    chosen = next(c for c in ranked(request, *providers) if c.eligible)
    return chosen.name, chosen.model, chosen.resolution


def test_settings_offer_the_default_model_at_720p_first_then_each_offer_once() -> None:
    settings = RunwaySettings(offers=" gen4_turbo , veo3.1@1080p,gen4.5,gen4_turbo@720p,")  # type: ignore[call-arg]
    assert settings.offered() == [("gen4.5", "720p"), ("gen4_turbo", "720p"), ("veo3.1", "1080p")]
    assert RunwaySettings().offered() == [("gen4.5", "720p")]  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("offered", "said"),
    [
        ("gen9", "AIPROD_RUNWAY_OFFERS: unknown model 'gen9'"),
        ("gen4.5@1080p", "gen4.5 renders 720p, not '1080p'"),
    ],
)
def test_an_offer_the_provider_lacks_is_a_configuration_error_naming_the_variable(
    offered: str, said: str
) -> None:
    with pytest.raises(ConfigurationError, match=said):
        runway(offered)


def test_capabilities_list_every_offer_with_its_own_price_quality_and_limits() -> None:
    capabilities = runway().capabilities()
    assert [(o.model, o.resolution) for o in capabilities.offers] == [
        ("gen4.5", "720p"),
        ("gen4_turbo", "720p"),
        ("veo3.1_fast", "720p"),
        ("veo3.1_fast", "1080p"),
    ]
    assert list(capabilities.models) == ["gen4.5", "gen4_turbo", "veo3.1_fast"]
    assert list(capabilities.resolutions) == ["720p", "1080p"]
    # The top-level fields describe the default offer, as they did before offers.
    assert capabilities.price_per_second.amount_micros == 120_000 and capabilities.nominal_quality == 0.95
    turbo = find_offer(capabilities, "gen4_turbo", "")
    assert turbo is not None and turbo.price_per_second.amount_micros == 50_000
    assert turbo.requires_first_frame and render_pb2.ASPECT_RATIO_1_1 in turbo.aspect_ratios
    fast_1080 = find_offer(capabilities, "veo3.1_fast", "1080p")
    assert fast_1080 is not None and list(fast_1080.allowed_durations_seconds) == [4, 6, 8]
    assert fast_1080.nominal_quality > find_offer(capabilities, "veo3.1_fast", "720p").nominal_quality  # type: ignore[union-attr]
    # One offer: no list, the fields above are all there is (as every backend said before).
    assert not runway("").capabilities().offers
    assert offers(runway("").capabilities())[0].model == "gen4.5"


def test_the_cheapest_offer_that_meets_the_floor_wins_whichever_model_it_is() -> None:
    # A text shot: gen4_turbo renders only from a first frame; gen4.5 (0.12/s) under veo3.1_fast (0.15/s).
    assert first(RouteRequest(shot(), quality_floor=0.85), runway()) == (
        "runway gen4.5 720p",
        "gen4.5",
        "720p",
    )
    # With a first frame gen4_turbo (0.05/s, quality 0.90) is the cheapest that meets 0.85...
    assert first(RouteRequest(shot(image=True), quality_floor=0.85), runway())[1] == "gen4_turbo"
    # ...and not 0.92: gen4.5 again.
    assert first(RouteRequest(shot(image=True), quality_floor=0.92), runway())[1] == "gen4.5"


def test_an_excluded_offer_says_why_and_the_others_still_compete() -> None:
    candidates = ranked(RouteRequest(shot(), quality_floor=0.85), runway())
    turbo = next(c for c in candidates if c.model == "gen4_turbo")
    assert not turbo.eligible
    assert turbo.exclusions == [router_pb2.EXCLUSION_UNSUPPORTED]
    assert "first frame" in turbo.reasons[0]
    # A 5 s shot: the Veo models render 4, 6 or 8 s only.
    candidates = ranked(RouteRequest(shot(seconds=5), quality_floor=0.85), runway())
    assert [c.model for c in candidates if c.eligible] == ["gen4.5"]


def test_a_shot_asking_for_1080p_goes_to_an_offer_at_1080p() -> None:
    assert first(RouteRequest(shot(resolution="1080p"), quality_floor=0.85), runway()) == (
        "runway veo3.1_fast 1080p",
        "veo3.1_fast",
        "1080p",
    )
    # Nothing renders 1080p: no candidate, each saying so.
    candidates = ranked(RouteRequest(shot(resolution="1080p")), runway(""))
    assert not any(c.eligible for c in candidates)
    assert "not 1080p" in candidates[0].reasons[0]


def test_offers_of_several_backends_compete_in_one_ranking() -> None:
    # Silent Veo 3.1 Lite (0.05/s, quality 0.80) is the cheapest over a 0.8 floor; over 0.85, Veo 3.1
    # Fast (0.10/s, 0.88) under Runway's gen4.5 (0.12/s).
    lite = veo("veo-3.1-lite-generate-001,veo-3.1-fast-generate-001")
    assert first(RouteRequest(shot(), quality_floor=0.8), runway(), lite)[1] == "veo-3.1-lite-generate-001"
    assert first(RouteRequest(shot(), quality_floor=0.85), runway(), lite)[1] == "veo-3.1-fast-generate-001"
    # A backend already tried is out with all its offers.
    request = RouteRequest(shot(), quality_floor=0.85, tried=frozenset({VEO}))
    assert first(request, runway(), lite)[1] == "gen4.5"


def test_a_preferred_model_goes_first_at_its_backend_when_it_qualifies() -> None:
    request = RouteRequest(
        shot(), quality_floor=0.85, preferred_backend=RUNWAY, preferred_model="veo3.1_fast"
    )
    assert first(request, runway())[1] == "veo3.1_fast"
    # A model the backend does not have: the backend's offers rank as they would.
    request = RouteRequest(shot(), quality_floor=0.85, preferred_backend=RUNWAY, preferred_model="gen99")
    assert first(request, runway())[1] == "gen4.5"


def test_a_render_is_billed_and_sized_by_its_offer() -> None:
    provider = runway()
    four = shot()
    assert provider.charge_micros(four, None, model="gen4_turbo") == 4 * 50_000
    assert provider.charge_micros(four, None, model="veo3.1_fast") == 4 * 150_000
    assert provider.charge_micros(four, None) == 4 * 120_000  # the default model
    reported = ProviderTask(TaskState.SUCCEEDED, cost_micros=123_000)
    assert provider.charge_micros(four, reported, model="veo3.1_fast") == 123_000
    assert provider.frame_size(shot(resolution="1080p")) == (1920, 1080)
    assert provider.frame_size(four) == (1280, 720)
    lite = veo("veo-3.1-lite-generate-001@1080p")
    assert lite.charge_micros(shot(resolution="1080p"), None, model="veo-3.1-lite-generate-001") == 4 * 50_000


def test_a_resolution_is_checked_where_a_shot_is() -> None:
    assert shot_violations(shot(resolution="4k")) == [
        ("shot.resolution", "unknown resolution '4k'; known: 720p, 1080p")
    ]
    assert shot_violations(shot(resolution="1080p")) == []
    single = renderer_pb2.Capabilities(
        min_duration_seconds=1, max_duration_seconds=10, aspect_ratios=[render_pb2.ASPECT_RATIO_16_9]
    )
    assert shot_mismatches(shot(resolution="1080p"), single) == [("resolution", "renders 720p, not 1080p")]


# Once: building the renderers takes 0.12 s, and each of the 300 examples below took it (43 s of the unit
# tier's 80).
@functools.cache
def _every_offer() -> tuple[renderer_pb2.Capabilities, ...]:
    runway_capabilities = runway("gen4_turbo,gen4.5,veo3.1_fast@1080p").capabilities()
    veo_capabilities = veo("veo-3.1-fast-generate-001,veo-3.1-lite-generate-001").capabilities()
    return tuple(
        offer_capabilities(capabilities, offer)
        for capabilities in (runway_capabilities, veo_capabilities)
        for offer in offers(capabilities)
    )


@settings(max_examples=300, deadline=None)
@given(
    seconds=st.sampled_from([0.0, 2.0, 4.0, 5.0, 6.0, 8.0, 10.0, 4.0000001, 30.0]),
    aspect_ratio=st.sampled_from([*render_pb2.AspectRatio.values(), 99]),
    image=st.sampled_from(["", "uri", "small", "large"]),
    resolution=st.sampled_from(["", "720p", "1080p", "4k"]),
    prompt_length=st.sampled_from([1, 900, 1001, 5000]),
    offer=st.integers(min_value=0, max_value=len(_every_offer()) - 1),
)
def test_an_offers_plain_checks_agree_with_shot_mismatches(
    seconds: float, aspect_ratio: int, image: str, resolution: str, prompt_length: int, offer: int
) -> None:
    """An offer's remembered answers (Offered) say what shot_mismatches says, shot after shot,
    whether the answer was worked out or remembered from a shot of the same shape."""
    capabilities = _every_offer()[offer]
    first_frame = {
        "": None,
        "uri": FIRST_FRAME,
        "small": render_pb2.Image(data=b"x" * 10, mime_type="image/png"),
        "large": render_pb2.Image(data=b"x" * (capabilities.max_image_bytes + 1), mime_type="image/png"),
    }[image]
    asked = render_pb2.Shot(
        prompt="p" * prompt_length,
        duration_seconds=seconds,
        aspect_ratio=aspect_ratio,
        first_frame=first_frame,
        resolution=resolution,
    )
    offered = Offered.of(capabilities)
    assert list(offered.fit(asked).mismatches) == shot_mismatches(asked, capabilities)
    assert list(offered.fit(asked).mismatches) == shot_mismatches(asked, capabilities)
