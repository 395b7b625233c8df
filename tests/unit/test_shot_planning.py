"""The shot planner (aiprod_gateway.planning): the documented examples, every duration from 1 to 180 s
(and fractional ones) against the real backends' clip limits, checked against a brute force over every
multiset of lengths, and the plans it makes of a spec."""

import bisect
import functools
import math

import pytest

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_gateway import validation
from aiprod_gateway.planning import TOLERANCE_SECONDS, ClipLimits, PlanningError, cut, plan_shots
from aiprod_kit.capabilities import shot_mismatches

LOCAL = ClipLimits.of(
    renderer_pb2.Capabilities(
        backend=backend_pb2.BACKEND_LOCAL, min_duration_seconds=1, max_duration_seconds=60
    )
)
RUNWAY = ClipLimits(backend_pb2.BACKEND_RUNWAY, 2, 10, tuple(float(seconds) for seconds in range(2, 11)))
VEO = ClipLimits(backend_pb2.BACKEND_VEO, 4, 8, (4.0, 6.0, 8.0))
MINIMAX = ClipLimits(backend_pb2.BACKEND_REPLICATE, 6, 6, (6.0,))
REPLICATE_GENERIC = ClipLimits(backend_pb2.BACKEND_REPLICATE, 2, 10, tuple(float(s) for s in range(2, 11)))

RUNWAY_LENGTHS = tuple(range(2, 11))
# Each clip set with its families' common lengths in rule 2's order (a range as (low, high) floats).
CLIP_SETS = {
    "local": ([LOCAL], [(1.0, 60.0)]),
    "veo": ([VEO], [(4, 6, 8)]),
    "runway": ([RUNWAY], [RUNWAY_LENGTHS]),
    "minimax": ([MINIMAX], [(6,)]),
    # 4, 6 and 8 s are accepted by all three: 8 s, the longest, wins.
    "runway+veo+local": ([RUNWAY, VEO, LOCAL], [(4, 6, 8), RUNWAY_LENGTHS, (1.0, 60.0)]),
    # 6 s is the only length both accept; Veo's own lengths when 6 s shots cannot come close.
    "veo+minimax": ([VEO, MINIMAX], [(6,), (4, 6, 8)]),
    "replicate generic+minimax": ([REPLICATE_GENERIC, MINIMAX], [(6,), RUNWAY_LENGTHS]),
    "local+veo": ([LOCAL, VEO], [(4, 6, 8), (1.0, 60.0)]),
}
DURATIONS = [float(seconds) for seconds in range(1, 181)] + [
    0.25,
    0.5,
    2.5,
    3.2,
    7.5,
    9.9,
    30.25,
    33.5,
    40.9,
    60.5,
    61.0001,
    99.99,
    120.75,
    179.5,
    180.5,
]


@functools.cache
def _totals(lengths: tuple[int, ...], count: int) -> list[int]:
    """Every total of `count` shots of the given lengths, any mix (sorted)."""
    if count == 1:
        return sorted(lengths)
    return sorted({total + length for total in _totals(lengths, count - 1) for length in lengths})


def _closest(duration: float, lengths: tuple) -> tuple[float, int]:
    """By brute force: the smallest error any cut of these lengths makes, and the fewest shots making it."""
    if isinstance(lengths[0], float):  # a range: n shots total anything in [n x low, n x high]
        low, high = lengths
        options = [(max(0.0, n * low - duration, duration - n * high), n) for n in range(1, 200)]
    else:
        options = []
        for n in range(1, math.ceil((duration + TOLERANCE_SECONDS) / min(lengths)) + 2):
            totals = _totals(lengths, n)
            place = bisect.bisect_left(totals, duration)
            near = totals[max(place - 1, 0) : place + 1]
            options.append((min(abs(total - duration) for total in near), n))
    return min((round(error, 9), n) for error, n in options)


@pytest.mark.parametrize("name", CLIP_SETS)
def test_every_duration_is_cut_closest_with_the_fewest_shots_or_refused(name):
    clips, families = CLIP_SETS[name]
    for duration in DURATIONS:
        if any(clip.accepts(duration) for clip in clips):
            assert cut(duration, clips) == [duration], duration
            continue
        # The first family whose closest cut is within the tolerance, else a PlanningError.
        expected = next(
            (
                (error, count, lengths)
                for lengths in families
                for error, count in [_closest(duration, lengths)]
                if error <= TOLERANCE_SECONDS
            ),
            None,
        )
        if expected is None:
            with pytest.raises(PlanningError, match=f"no cut of {duration:g} s comes within 1 s"):
                cut(duration, clips)
            continue
        error, count, lengths = expected
        shots = cut(duration, clips)
        assert len(shots) == count, (duration, shots)
        assert abs(sum(shots) - duration) == pytest.approx(error, abs=1e-6), (duration, shots)
        assert abs(sum(shots) - duration) <= TOLERANCE_SECONDS + 1e-9
        assert shots == sorted(shots, reverse=True)
        assert all(any(clip.accepts(shot) for clip in clips) for shot in shots), (duration, shots)
        if isinstance(lengths[0], float):
            assert len(set(shots)) == 1 and lengths[0] <= shots[0] <= lengths[1], (duration, shots)
        else:
            assert set(shots) <= set(lengths), (duration, shots)
            assert len(set(shots)) <= 2 and max(shots) - min(shots) in (0, *_gaps(lengths)), (duration, shots)
        # Deterministic, whatever the order the backends come in.
        assert cut(duration, clips) == shots
        assert cut(duration, list(reversed(clips))) == shots


def _gaps(lengths: tuple[int, ...]) -> set[int]:
    return {long - short for long, short in zip(lengths[1:], lengths[:-1], strict=True)}


@pytest.mark.parametrize(
    ("clips", "duration", "shots"),
    [
        ([LOCAL], 30, [30]),
        ([LOCAL], 120, [60, 60]),
        ([LOCAL], 150, [50, 50, 50]),
        ([LOCAL], 61, [30.5, 30.5]),
        ([LOCAL], 150.75, [50.25, 50.25, 50.25]),
        ([LOCAL], 0.5, [1]),
        ([VEO], 30, [8, 8, 8, 6]),
        # 30 s is as close, but 32 s is even: four shots of 8 s.
        ([VEO], 31, [8, 8, 8, 8]),
        # Under Veo's shortest: its closest, 1 s off.
        ([VEO], 3, [4]),
        # As close and as even: the longer.
        ([VEO], 7, [8]),
        ([VEO], 29, [8, 8, 8, 6]),
        ([VEO], 180, [8] * 21 + [6, 6]),
        # 32 s in four shots: as close as 34 s in five.
        ([VEO], 33, [8, 8, 8, 8]),
        ([RUNWAY, VEO, LOCAL], 30, [30]),
        ([RUNWAY, VEO, LOCAL], 120, [8] * 15),
        ([RUNWAY], 40.9, [9, 8, 8, 8, 8]),
        # Two adjacent lengths only: 10 and 9, not 9 x 10 + 5.
        ([RUNWAY], 95, [10] * 5 + [9] * 5),
        ([MINIMAX], 30, [6] * 5),
        ([MINIMAX], 31, [6] * 5),
        ([MINIMAX], 5, [6]),
        ([VEO, MINIMAX], 30, [6] * 5),
        ([VEO, MINIMAX], 8, [8]),
        ([VEO, MINIMAX], 16, [8, 8]),
    ],
)
def test_documented_cuts(clips, duration, shots):
    assert cut(duration, clips) == shots


@pytest.mark.parametrize(
    ("clips", "duration", "message"),
    [
        # 30 s and 36 s are both 3 s off: the one with fewer shots is named.
        (
            [MINIMAX],
            33,
            "no cut of 33 s comes within 1 s: the closest, 5 x 6 s = 30 s, is 3 s off (shots of 6 s, from replicate)",
        ),
        ([MINIMAX], 2, "no cut of 2 s comes within 1 s: the closest, 1 x 6 s = 6 s, is 4 s off"),
        ([MINIMAX], 15, "the closest, 2 x 6 s = 12 s, is 3 s off"),
        # The closest of every family: Veo's 4 s, not the 6 s both render.
        ([VEO, MINIMAX], 1, "the closest, 1 x 4 s = 4 s, is 3 s off (shots of 4, 6, 8 s, from veo)"),
        ([], 30, "no backend to render 30 s"),
        ([LOCAL], 0, "cannot cut 0 s: a duration must be positive"),
        ([LOCAL], -5, "cannot cut -5 s: a duration must be positive"),
        ([LOCAL], math.nan, "cannot cut nan s"),
        ([LOCAL], math.inf, "cannot cut inf s"),
        (
            [ClipLimits(backend_pb2.BACKEND_VEO, 4, 8, (3.0, 9.0))],
            20,
            "cannot cut 20 s: no backend renders any length (veo 3, 9 s)",
        ),
    ],
)
def test_impossible_cuts_say_why_with_the_figures(clips, duration, message):
    with pytest.raises(PlanningError) as raised:
        cut(duration, clips)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "duration", [0.5, 1, 2, 3.9, 4, 5, 6, 6 + 1e-7, 6 - 1e-7, 7, 8, 8 + 1e-7, 30.25, 60, 60.5]
)
@pytest.mark.parametrize("clip", [LOCAL, RUNWAY, VEO, MINIMAX])
def test_a_clip_accepts_what_the_router_accepts(clip, duration):
    capabilities = renderer_pb2.Capabilities(
        backend=clip.backend,
        min_duration_seconds=clip.min_seconds,
        max_duration_seconds=clip.max_seconds,
        allowed_durations_seconds=clip.allowed,
    )
    mismatches = shot_mismatches(render_pb2.Shot(duration_seconds=duration), capabilities)
    assert clip.accepts(duration) == all(field != "duration_seconds" for field, _ in mismatches)
    assert ClipLimits.of(capabilities) == clip


SPEC = render_pb2.RenderSpec(
    prompt="  A fox in the snow \n",
    duration_seconds=30,
    aspect_ratio=render_pb2.ASPECT_RATIO_9_16,
    seed=41,
    first_frame=render_pb2.Image(uri="https://example.com/fox.png", mime_type="image/png"),
)


def _spec(**changes) -> render_pb2.RenderSpec:
    spec = render_pb2.RenderSpec()
    spec.CopyFrom(SPEC)
    for name, value in changes.items():
        if name == "first_frame":
            spec.ClearField("first_frame")
        elif name in ("shots", "reference_images"):
            getattr(spec, name).extend(value)
        else:
            setattr(spec, name, value)
    return spec


@pytest.mark.parametrize(
    "spec",
    [SPEC, _spec(first_frame=None), _spec(seed=0), _spec(aspect_ratio=render_pb2.ASPECT_RATIO_UNSPECIFIED)],
)
def test_one_shot_is_the_plan_jobs_always_had(spec):
    assert plan_shots(spec, [LOCAL, VEO]) == validation.plan_of(spec)


def test_one_shot_takes_the_cuts_duration_when_no_backend_renders_the_whole():
    expected = validation.plan_of(SPEC)
    expected.shots[0].duration_seconds = 8
    assert plan_shots(_spec(duration_seconds=7), [VEO]) == expected


def test_several_shots_number_their_prompts_derive_their_seeds_and_only_the_first_has_the_first_frame():
    plan = plan_shots(SPEC, [VEO])
    assert [shot.duration_seconds for shot in plan.shots] == [8, 8, 8, 6]
    assert [shot.prompt for shot in plan.shots] == [f"A fox in the snow (shot {i} of 4)" for i in range(1, 5)]
    assert [shot.seed for shot in plan.shots] == [41, 42, 43, 44]
    assert {shot.aspect_ratio for shot in plan.shots} == {render_pb2.ASPECT_RATIO_9_16}
    assert plan.shots[0].first_frame == SPEC.first_frame
    assert not any(shot.HasField("first_frame") for shot in plan.shots[1:])
    assert not any(shot.continuous for shot in plan.shots)
    assert plan_shots(SPEC, [VEO]) == plan


@pytest.mark.parametrize(
    ("seed", "seeds"),
    [(0, [0, 0, 0, 0]), (2**64 - 2, [2**64 - 2, 2**64 - 1, 0, 1])],
)
def test_shot_seeds_stay_0_or_wrap(seed, seeds):
    assert [shot.seed for shot in plan_shots(_spec(seed=seed), [VEO]).shots] == seeds


def test_a_callers_shots_are_kept_not_cut_again():
    own = render_pb2.Shot(
        prompt="The fox jumps",
        duration_seconds=7.5,
        aspect_ratio=render_pb2.ASPECT_RATIO_1_1,
        seed=5,
        first_frame=render_pb2.Image(uri="https://example.com/jump.png"),
    )
    spec = _spec(
        shots=[
            render_pb2.Shot(prompt="  The fox runs ", duration_seconds=22.5),
            own,
            render_pb2.Shot(continuous=True),
        ]
    )
    before = spec.SerializeToString(deterministic=True)
    plan = plan_shots(spec, [])
    assert plan == render_pb2.RenderPlan(
        shots=[
            render_pb2.Shot(
                prompt="The fox runs",
                duration_seconds=22.5,
                aspect_ratio=render_pb2.ASPECT_RATIO_9_16,
                seed=41,
            ),
            own,
            render_pb2.Shot(aspect_ratio=render_pb2.ASPECT_RATIO_9_16, seed=43, continuous=True),
        ]
    )
    assert spec.SerializeToString(deterministic=True) == before


def test_a_spec_no_backend_can_cut_is_refused():
    with pytest.raises(PlanningError, match="no cut of 33 s"):
        plan_shots(_spec(duration_seconds=33), [MINIMAX])


REFERENCES = [
    render_pb2.Image(uri="https://example.com/fox-face.png"),
    render_pb2.Image(data=b"\x89PNG", mime_type="image/png"),
]


def test_the_specs_reference_images_stay_on_the_spec_not_copied_into_every_shot():
    # The driver gives them to each shot without its own as it renders (a job would otherwise carry
    # them once per shot).
    several = plan_shots(_spec(reference_images=REFERENCES), [VEO])
    assert len(several.shots) == 4 and not any(shot.reference_images for shot in several.shots)
    (one,) = plan_shots(_spec(reference_images=REFERENCES, duration_seconds=8), [VEO]).shots
    assert not one.reference_images


def test_a_callers_shot_keeps_its_own_reference_images():
    own = [render_pb2.Image(uri="https://example.com/jump.png")]
    spec = _spec(
        reference_images=REFERENCES,
        shots=[
            render_pb2.Shot(prompt="The fox runs", duration_seconds=8),
            render_pb2.Shot(prompt="The fox jumps", duration_seconds=8, reference_images=own),
        ],
    )
    plan = plan_shots(spec, [])
    assert [list(shot.reference_images) for shot in plan.shots] == [[], own]
