"""The routing policy, table-driven: a pure function of the request and what is known of the backends."""

import pytest

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.exclusions import budget_alone_blocks
from aiprod_kit.money import usd_from_units
from aiprod_router.policy import FIRST_VERSION_QUALITY_FIRST_MICROS as FIRST
from aiprod_router.policy import BackendView, RouteRequest, rank_backends, views_of
from aiprod_router.stats import LENGTHS_KEPT, BackendStats, Outcome

LOCAL, RUNWAY, VEO, REPLICATE = (
    backend_pb2.BACKEND_LOCAL,
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
)
LANDSCAPE, PORTRAIT, SQUARE = (
    render_pb2.ASPECT_RATIO_16_9,
    render_pb2.ASPECT_RATIO_9_16,
    render_pb2.ASPECT_RATIO_1_1,
)


def capabilities(price: float, quality: float, durations=(), low=1.0, high=60.0, ratios=(LANDSCAPE, PORTRAIT, SQUARE), image=False, prompt_limit=0, image_limit=0):  # fmt: skip
    return renderer_pb2.Capabilities(
        min_duration_seconds=low,
        max_duration_seconds=high,
        allowed_durations_seconds=durations,
        aspect_ratios=ratios,
        image_input=image,
        price_per_second=usd_from_units(price),
        nominal_quality=quality,
        max_prompt_characters=prompt_limit,
        max_image_bytes=image_limit,
    )


CAPABILITIES = {
    LOCAL: capabilities(0.0, 0.5),
    RUNWAY: capabilities(0.12, 0.95, low=2, high=10, ratios=(LANDSCAPE, PORTRAIT), image=True),
    VEO: capabilities(
        0.20, 0.92, durations=(4, 6, 8), low=4, high=8, ratios=(LANDSCAPE, PORTRAIT), image=True
    ),
    REPLICATE: capabilities(0.05, 0.75, low=2, high=10),
}


def views(**overrides: dict) -> list[BackendView]:
    """Every backend serving with no history, unless overridden: views(runway={"serving": False})."""
    names = {"local": LOCAL, "runway": RUNWAY, "veo": VEO, "replicate": REPLICATE}
    result = []
    for name, backend in names.items():
        fields = {"capabilities": CAPABILITIES[backend], "serving": True, **overrides.get(name, {})}
        result.append(BackendView(backend, **fields))
    return result


def shot(seconds: float = 4, ratio: int = LANDSCAPE, image: bool = False) -> render_pb2.Shot:
    first_frame = render_pb2.Image(data=b"png", mime_type="image/png") if image else None
    return render_pb2.Shot(prompt="p", duration_seconds=seconds, aspect_ratio=ratio, first_frame=first_frame)


def usd(amount: float) -> int:
    return round(amount * 1_000_000)


CASES = [
    # The first version's cases.
    ("tiny budget picks the cheapest", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(0.5), quality_first_budget_micros=FIRST), views(), [REPLICATE, RUNWAY]),
    ("large budget picks the best quality", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(80), quality_first_budget_micros=FIRST), views(), [RUNWAY, VEO, REPLICATE]),
    ("a large budget without quality first: still the cheapest", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(80)), views(), [REPLICATE, RUNWAY, VEO]),
    ("a 0.9 floor: only Runway or Veo", RouteRequest(shot(), 0.9), views(), [RUNWAY, VEO]),
    ("budget under one render: nothing", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(0.1)), views(), []),
    # Cost, quality, latency.
    ("cheapest that meets the floor", RouteRequest(shot(), 0.6), views(), [REPLICATE, RUNWAY, VEO]),
    ("economy mode never goes quality first", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(80), economy=True, quality_first_budget_micros=FIRST), views(), [REPLICATE, RUNWAY, VEO]),
    ("max cost", RouteRequest(shot(), 0.6, max_cost_micros=usd(0.5)), views(), [REPLICATE, RUNWAY]),
    ("expected retries make a flaky backend dearer", RouteRequest(shot(), 0.6), views(replicate={"success_rate": 0.25}), [RUNWAY, VEO, REPLICATE]),
    ("quality breaks a cost tie", RouteRequest(shot(), 0.0), views(local={"serving": False}, veo={"capabilities": capabilities(0.12, 0.96, low=4, high=8)}), [REPLICATE, VEO, RUNWAY]),
    # Deadline: observed p95 against the time left.
    ("deadline excludes the slow", RouteRequest(shot(), 0.9, seconds_left=120), views(runway={"p95_seconds": 300}, veo={"p95_seconds": 90}), [VEO]),
    ("no history: the deadline cannot exclude", RouteRequest(shot(), 0.9, seconds_left=120), views(), [RUNWAY, VEO]),
    # Capabilities.
    ("durations only some backends render", RouteRequest(shot(5), 0.6), views(), [REPLICATE, RUNWAY]),
    ("first frame", RouteRequest(shot(image=True), 0.6), views(), [RUNWAY, VEO]),
    ("square frames", RouteRequest(shot(ratio=SQUARE), 0.6), views(), [REPLICATE]),
    # Health, breaker, attempts already made.
    ("not serving", RouteRequest(shot(), 0.6), views(replicate={"serving": False}), [RUNWAY, VEO]),
    ("breaker open", RouteRequest(shot(), 0.6), views(replicate={"breaker_open": True}), [RUNWAY, VEO]),
    ("tried already", RouteRequest(shot(), 0.6, tried=frozenset({REPLICATE, RUNWAY})), views(), [VEO]),
    ("never reached", RouteRequest(shot(), 0.6), views(replicate={"capabilities": None}), [RUNWAY, VEO]),
    # Preference, and the local stand-in.
    ("preferred first when it qualifies", RouteRequest(shot(), 0.6, preferred_backend=VEO), views(), [VEO, REPLICATE, RUNWAY]),
    ("preferred ignored when it does not", RouteRequest(shot(5), 0.6, preferred_backend=VEO), views(), [REPLICATE, RUNWAY]),
    ("local never stands in for providers that are down", RouteRequest(shot(), 0.6), views(runway={"serving": False}, veo={"serving": False}, replicate={"serving": False}), []),
    ("local alone (no provider configured) stands in", RouteRequest(shot(), 0.6), views()[:1], [LOCAL]),
    ("local preferred goes first", RouteRequest(shot(), 0.6, preferred_backend=LOCAL), views(), [LOCAL, REPLICATE, RUNWAY, VEO]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_", "backends", "expected"), CASES, ids=[case[0] for case in CASES])
def test_eligible_backends_in_order(case, request_, backends, expected):
    ranked = rank_backends(request_, backends)
    assert [candidate.backend for candidate in ranked if candidate.eligible] == expected
    assert len(ranked) == len(backends)
    assert all(candidate.reasons for candidate in ranked), "every candidate says why"
    for candidate in ranked:
        # One code per reason for an excluded backend, none for an eligible one.
        expected_codes = 0 if candidate.eligible else len(candidate.reasons)
        assert len(candidate.exclusions) == expected_codes, candidate


def test_excluded_backends_say_why():
    ranked = {
        c.backend: c
        for c in rank_backends(
            RouteRequest(shot(5), 0.9, seconds_left=60), views(runway={"p95_seconds": 100})
        )
    }
    assert any(
        reason.startswith("duration_seconds:") and "4, 6, 8" in reason for reason in ranked[VEO].reasons
    )
    assert any("under the floor 0.90" in reason for reason in ranked[REPLICATE].reasons)
    assert any("deadline" in reason for reason in ranked[RUNWAY].reasons)
    assert ranked[VEO].exclusions == [router_pb2.EXCLUSION_UNSUPPORTED]
    assert ranked[REPLICATE].exclusions == [router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR]
    assert ranked[RUNWAY].exclusions == [router_pb2.EXCLUSION_DEADLINE]


(NOT_REACHED, UNSUPPORTED, NOT_SERVING, BREAKER_OPEN, TRIED, UNDER_FLOOR, OVER_MAX_COST, OVER_BUDGET,
 DEADLINE) = (
    router_pb2.EXCLUSION_NOT_REACHED, router_pb2.EXCLUSION_UNSUPPORTED, router_pb2.EXCLUSION_NOT_SERVING,
    router_pb2.EXCLUSION_BREAKER_OPEN, router_pb2.EXCLUSION_ALREADY_TRIED,
    router_pb2.EXCLUSION_UNDER_QUALITY_FLOOR, router_pb2.EXCLUSION_OVER_MAX_COST,
    router_pb2.EXCLUSION_OVER_BUDGET, router_pb2.EXCLUSION_DEADLINE,
)  # fmt: skip

# (case, request, backends, each excluded backend's codes, whether the budget alone blocks the render)
EXCLUSION_CASES = [
    ("nothing excluded but local under the floor", RouteRequest(shot(), 0.6), views(), {LOCAL: [UNDER_FLOOR]}, False),
    ("budget under one render: the budget alone blocks", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(0.1)), views(),
     {LOCAL: [UNDER_FLOOR], REPLICATE: [OVER_BUDGET], RUNWAY: [OVER_BUDGET], VEO: [OVER_BUDGET]}, True),
    ("budget and the job's limit: money alone would not do", RouteRequest(shot(), 0.6, max_cost_micros=usd(0.1), budget_remaining_micros=usd(0.1)), views(),
     {LOCAL: [UNDER_FLOOR], REPLICATE: [OVER_MAX_COST, OVER_BUDGET], RUNWAY: [OVER_MAX_COST, OVER_BUDGET], VEO: [OVER_MAX_COST, OVER_BUDGET]}, False),
    ("one within the budget: nothing blocks", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(0.3)), views(),
     {LOCAL: [UNDER_FLOOR], RUNWAY: [OVER_BUDGET], VEO: [OVER_BUDGET]}, False),
    ("over the budget, and each out for something else too", RouteRequest(shot(5), 0.6, budget_remaining_micros=usd(0.1)), views(runway={"serving": False}, replicate={"breaker_open": True}),
     {LOCAL: [UNDER_FLOOR], RUNWAY: [NOT_SERVING, OVER_BUDGET], REPLICATE: [BREAKER_OPEN, OVER_BUDGET], VEO: [UNSUPPORTED, OVER_BUDGET]}, False),
    ("down, tried, unreachable, too slow", RouteRequest(shot(), 0.9, seconds_left=60, tried=frozenset({RUNWAY})), views(veo={"p95_seconds": 100}, replicate={"capabilities": None}),
     {LOCAL: [UNDER_FLOOR], RUNWAY: [TRIED], VEO: [DEADLINE], REPLICATE: [NOT_REACHED]}, False),
    ("tried, the rest over the budget", RouteRequest(shot(), 0.6, budget_remaining_micros=usd(0.1), tried=frozenset({REPLICATE})), views(),
     {LOCAL: [UNDER_FLOOR], REPLICATE: [TRIED, OVER_BUDGET], RUNWAY: [OVER_BUDGET], VEO: [OVER_BUDGET]}, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "request_", "backends", "codes", "budget_blocks"),
    EXCLUSION_CASES,
    ids=[c[0] for c in EXCLUSION_CASES],
)
def test_excluded_backends_carry_a_code_per_reason(case, request_, backends, codes, budget_blocks):
    ranked = rank_backends(request_, backends)
    assert {c.backend: c.exclusions for c in ranked if not c.eligible} == codes
    assert budget_alone_blocks(c.exclusions for c in ranked) is budget_blocks


def test_local_under_the_floor_says_why_it_is_left_out():
    local = next(c for c in rank_backends(RouteRequest(shot(), 0.6), views()) if c.backend == LOCAL)
    assert not local.eligible
    assert "quality 0.50 under the floor 0.60" in local.reasons


# Each provider's own limits on a prompt and an image, as their renderers report them (0: none known).
LIMITED = {
    "runway": {"capabilities": capabilities(0.12, 0.95, low=2, high=10, ratios=(LANDSCAPE, PORTRAIT), image=True, prompt_limit=1000, image_limit=5 * 2**20)},
    "veo": {"capabilities": capabilities(0.20, 0.92, durations=(4, 6, 8), low=4, high=8, ratios=(LANDSCAPE, PORTRAIT), image=True, prompt_limit=4000, image_limit=15 * 2**20)},
}  # fmt: skip


def long_shot(characters: int = 0, image_bytes: int = 0) -> render_pb2.Shot:
    first_frame = render_pb2.Image(data=b"i" * image_bytes, mime_type="image/png") if image_bytes else None
    return render_pb2.Shot(
        prompt="p" * characters or "p", duration_seconds=4, aspect_ratio=LANDSCAPE, first_frame=first_frame
    )


def test_a_long_prompt_is_ranked_to_a_backend_that_takes_it():
    # Runway would rank first on price at a 0.9 floor; its 1,000-character limit leaves the prompt to Veo.
    assert [
        c.backend for c in rank_backends(RouteRequest(long_shot(1000), 0.9), views(**LIMITED)) if c.eligible
    ] == [RUNWAY, VEO]
    ranked = {c.backend: c for c in rank_backends(RouteRequest(long_shot(1500), 0.9), views(**LIMITED))}
    assert [b for b, c in ranked.items() if c.eligible] == [VEO]
    assert ranked[RUNWAY].exclusions == [UNSUPPORTED]
    assert ranked[RUNWAY].reasons == [
        "prompt: takes prompts of at most 1000 characters: this one of 1500 is too long"
    ]
    # A backend with no known limit (Replicate here) takes it too.
    assert [
        c.backend for c in rank_backends(RouteRequest(long_shot(1500), 0.6), views(**LIMITED)) if c.eligible
    ] == [REPLICATE, VEO]
    assert not any(c.eligible for c in rank_backends(RouteRequest(long_shot(4001), 0.9), views(**LIMITED)))


def test_a_large_inline_image_is_ranked_to_a_backend_that_takes_it():
    ranked = {
        c.backend: c
        for c in rank_backends(RouteRequest(long_shot(image_bytes=6 * 2**20), 0.6), views(**LIMITED))
    }
    assert [b for b, c in ranked.items() if c.eligible] == [VEO]
    assert ranked[RUNWAY].exclusions == [UNSUPPORTED]
    assert ranked[RUNWAY].reasons == [
        f"first_frame.data: takes first frames of at most {5 * 2**20} bytes: this one of {6 * 2**20} is too large"
    ]
    # A backend that takes no image says only that, not also that the image is too large.
    assert ranked[REPLICATE].reasons == ["first_frame: does not take a first frame"]
    small = rank_backends(RouteRequest(long_shot(image_bytes=5 * 2**20), 0.6), views(**LIMITED))
    assert [c.backend for c in small if c.eligible] == [RUNWAY, VEO]


def test_when_the_deadline_alone_leaves_every_backend_out_the_likeliest_to_make_it_is_tried():
    # Both p95s over the 120 s left; both medians within it: Veo's, the shorter, first.
    slow = views(runway={"p95_seconds": 300, "p50_seconds": 100}, veo={"p95_seconds": 200, "p50_seconds": 50})
    ranked = rank_backends(RouteRequest(shot(), 0.9, seconds_left=120), slow)
    eligible = [c for c in ranked if c.eligible]
    assert [c.backend for c in eligible] == [VEO, RUNWAY]
    assert all(c.long_shot and not c.exclusions for c in eligible)
    assert eligible[0].reasons[0] == "ranked first: the likeliest to meet the deadline"
    assert "may miss the deadline" in eligible[0].reasons[1] and "median 50 s" in eligible[0].reasons[1]
    # A median over the time left too: out.
    slower = views(
        runway={"p95_seconds": 300, "p50_seconds": 130}, veo={"p95_seconds": 200, "p50_seconds": 50}
    )
    assert [
        c.backend for c in rank_backends(RouteRequest(shot(), 0.9, seconds_left=120), slower) if c.eligible
    ] == [VEO]


def test_a_backend_within_the_deadline_keeps_the_long_shots_out():
    mixed = views(runway={"p95_seconds": 100, "p50_seconds": 60}, veo={"p95_seconds": 200, "p50_seconds": 50})
    ranked = rank_backends(RouteRequest(shot(), 0.9, seconds_left=120), mixed)
    assert [c.backend for c in ranked if c.eligible] == [RUNWAY]
    assert not any(c.long_shot for c in ranked)
    # Out for something besides the deadline: never a long shot.
    ranked = rank_backends(
        RouteRequest(shot(), 0.9, seconds_left=120, tried=frozenset({RUNWAY})),
        views(runway={"p95_seconds": 300, "p50_seconds": 60}, veo={"p95_seconds": 200, "p50_seconds": 50}),
    )
    assert [c.backend for c in ranked if c.eligible] == [VEO]


def test_a_backend_cutting_the_deadline_close_ranks_after_one_that_leaves_a_margin():
    # 4 s at a 0.8 floor: Runway 0.48 USD, Veo 0.80. Runway's p95, 115 s of the 120 left, cuts it close.
    close = views(runway={"p95_seconds": 115}, veo={"p95_seconds": 60})
    ranked = rank_backends(RouteRequest(shot(), 0.8, seconds_left=120), close)
    assert [c.backend for c in ranked if c.eligible] == [VEO, RUNWAY]
    runway = next(c for c in ranked if c.backend == RUNWAY)
    assert "p95 115 s close to the 120 s left to the deadline" in runway.reasons
    # With a margin at both (or no deadline), the cheaper first again.
    for request, known in [
        (RouteRequest(shot(), 0.8, seconds_left=200), close),
        (RouteRequest(shot(), 0.8), close),
    ]:
        assert [c.backend for c in rank_backends(request, known) if c.eligible] == [RUNWAY, VEO]
    # Both close: the cheaper first.
    both = views(runway={"p95_seconds": 115}, veo={"p95_seconds": 110})
    ranked = rank_backends(RouteRequest(shot(), 0.8, seconds_left=120), both)
    assert [c.backend for c in ranked if c.eligible] == [RUNWAY, VEO]


class _Known:
    """What the router keeps of a backend (aiprod_router.backends.Renderer's fields the views read)."""

    def __init__(self, backend: int, clock) -> None:
        self.backend = backend
        self.capabilities = CAPABILITIES[backend]
        self.serving = True
        self.breaker = CircuitBreaker(1, 30.0, clock=clock)
        self.stats = BackendStats()


def test_a_kept_view_is_the_view_a_fresh_look_would_build():
    now = [0.0]
    known = _Known(RUNWAY, lambda: now[0])

    def fresh(video_seconds: float) -> BackendView:
        p95, p50 = known.stats.p95_p50_seconds(video_seconds)
        return BackendView(
            RUNWAY,
            known.capabilities,
            known.serving,
            not known.breaker.trial_available(),
            p95,
            p50,
            known.stats.success_rate,
        )

    changes = [
        ("nothing changed", lambda: None),
        ("an outcome recorded", lambda: known.stats.record(Outcome(True, 40.0, video_seconds=4))),
        ("another", lambda: known.stats.record(Outcome(True, 90.0, video_seconds=4))),
        ("not serving", lambda: setattr(known, "serving", False)),
        ("serving again", lambda: setattr(known, "serving", True)),
        ("new capabilities", lambda: setattr(known, "capabilities", capabilities(0.1, 0.9))),
        ("the breaker opened", known.breaker.record_failure),
        ("its cooldown over: half-open", lambda: now.__setitem__(0, 31.0)),
        ("its trial out", known.breaker.allow_request),
        ("the trial succeeded: closed", known.breaker.record_success),
    ]
    for change, apply in changes:
        apply()
        for video_seconds in (4.0, 8.0):
            assert views_of([known], video_seconds) == [fresh(video_seconds)], change


def test_views_kept_for_ever_new_clip_lengths_stay_bounded():
    known = _Known(RUNWAY, lambda: 0.0)
    known.stats.record(Outcome(True, 40.0, video_seconds=4))
    for index in range(1000):
        seconds = 2 + index / 1000
        [view] = views_of([known], seconds)
        assert view.p95_seconds == 40.0
    assert 0 < len(known.stats.views) <= LENGTHS_KEPT
