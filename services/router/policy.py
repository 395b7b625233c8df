"""The routing policy: which backends can take a shot, and in what order. Pure: no I/O."""

from dataclasses import dataclass, field

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.capabilities import shot_mismatches


@dataclass(frozen=True)
class BackendView:
    """What the policy needs to know of one backend."""

    backend: int
    capabilities: renderer_pb2.Capabilities | None
    serving: bool


@dataclass
class Candidate:
    backend: int
    eligible: bool
    estimated_cost_micros: int
    nominal_quality: float
    reasons: list[str] = field(default_factory=list)


def rank_backends(
    shot: render_pb2.Shot, constraints: render_pb2.RenderConstraints, backends: list[BackendView]
) -> list[Candidate]:
    """Every backend as a candidate: eligible ones first, the preferred backend first among them,
    then the cheapest, with quality breaking ties."""
    candidates = []
    for view in backends:
        if view.capabilities is None:
            candidates.append(Candidate(view.backend, False, 0, 0.0, ["renderer not reached yet"]))
            continue
        cost = round(view.capabilities.price_per_second.amount_micros * shot.duration_seconds)
        reasons = [f"{field}: {why}" for field, why in shot_mismatches(shot, view.capabilities)]
        if not view.serving:
            reasons.append("renderer not serving")
        if constraints.HasField("max_cost") and cost > constraints.max_cost.amount_micros:
            reasons.append(f"estimated cost {cost / 1e6:.2f} USD is over max_cost")
        eligible = not reasons
        if eligible:
            reasons.append(f"capable and serving; estimated cost {cost / 1e6:.2f} USD")
            if view.backend == constraints.preferred_backend:
                reasons.append("preferred by the request")
        candidates.append(Candidate(view.backend, eligible, cost, view.capabilities.nominal_quality, reasons))
    return sorted(
        candidates,
        key=lambda c: (
            not c.eligible,
            c.backend != constraints.preferred_backend,
            c.estimated_cost_micros,
            -c.nominal_quality,
        ),
    )
