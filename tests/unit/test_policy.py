"""The routing policy, table-driven: a pure function of the shot, the constraints and the backends."""

import pytest

from aiprod.common.v1 import backend_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.money import usd_from_units
from aiprod_router.policy import BackendView, rank_backends

LOCAL, RUNWAY, VEO = backend_pb2.BACKEND_LOCAL, backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
ALL_RATIOS = [render_pb2.ASPECT_RATIO_16_9, render_pb2.ASPECT_RATIO_9_16, render_pb2.ASPECT_RATIO_1_1]


def capabilities(
    price: float, quality: float, low: float = 1, high: float = 60, **extra
) -> renderer_pb2.Capabilities:
    return renderer_pb2.Capabilities(
        min_duration_seconds=low,
        max_duration_seconds=high,
        aspect_ratios=extra.pop("aspect_ratios", ALL_RATIOS),
        price_per_second=usd_from_units(price),
        nominal_quality=quality,
        **extra,
    )


BACKENDS = [
    BackendView(LOCAL, capabilities(0.0, 0.5), serving=True),
    BackendView(RUNWAY, capabilities(0.12, 0.95, 2, 10, image_input=True), serving=True),
    BackendView(
        VEO,
        capabilities(0.20, 0.92, allowed_durations_seconds=[4, 6, 8], aspect_ratios=ALL_RATIOS[:2]),
        serving=True,
    ),
]


def shot(
    seconds: float = 4, aspect_ratio: int = render_pb2.ASPECT_RATIO_16_9, image: bool = False
) -> render_pb2.Shot:
    first_frame = render_pb2.Image(data=b"png", mime_type="image/png") if image else None
    return render_pb2.Shot(
        prompt="p", duration_seconds=seconds, aspect_ratio=aspect_ratio, first_frame=first_frame
    )


@pytest.mark.parametrize(
    ("case", "the_shot", "constraints", "backends", "expected"),
    [
        ("cheapest first", shot(), render_pb2.RenderConstraints(), BACKENDS, [LOCAL, RUNWAY, VEO]),
        (
            "preferred first when eligible",
            shot(),
            render_pb2.RenderConstraints(preferred_backend=VEO),
            BACKENDS,
            [VEO, LOCAL, RUNWAY],
        ),
        (
            "duration only some backends render",
            shot(5),
            render_pb2.RenderConstraints(),
            BACKENDS,
            [LOCAL, RUNWAY],
        ),
        ("image input", shot(image=True), render_pb2.RenderConstraints(), BACKENDS, [RUNWAY]),
        (
            "square frames",
            shot(aspect_ratio=render_pb2.ASPECT_RATIO_1_1),
            render_pb2.RenderConstraints(),
            BACKENDS,
            [LOCAL, RUNWAY],
        ),
        (
            "max cost",
            shot(),
            render_pb2.RenderConstraints(max_cost=usd_from_units(0.5)),
            BACKENDS[1:],
            [RUNWAY],
        ),
        (
            "not serving",
            shot(),
            render_pb2.RenderConstraints(),
            [BackendView(LOCAL, BACKENDS[0].capabilities, False)],
            [],
        ),
        ("never reached", shot(), render_pb2.RenderConstraints(), [BackendView(LOCAL, None, True)], []),
    ],
)
def test_eligible_backends_in_order(case, the_shot, constraints, backends, expected):
    ranked = rank_backends(the_shot, constraints, backends)
    assert [c.backend for c in ranked if c.eligible] == expected, case
    assert len(ranked) == len(backends)
    assert all(c.reasons for c in ranked), "every candidate says why"


def test_excluded_backends_say_which_field_they_cannot_satisfy():
    ranked = rank_backends(shot(5), render_pb2.RenderConstraints(), BACKENDS)
    veo = next(c for c in ranked if c.backend == VEO)
    assert not veo.eligible
    assert any(reason.startswith("duration_seconds:") and "4, 6, 8" in reason for reason in veo.reasons)
