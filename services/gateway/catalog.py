"""What the gateway knows of the backends, for validating and planning requests without a call per
request."""

import time
from typing import NamedTuple

import grpc

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_gateway import planning, validation
from aiprod_kit.capabilities import backend_name, offer_capabilities, offers, shot_mismatches
from aiprod_kit.errors import InvalidArgument

_FRESH_SECONDS = 10.0
_LIST_TIMEOUT = 2.0


class Offered(NamedTuple):
    """One offer of a backend the router knows, as the checks and the planner read it."""

    backend: int
    offer: renderer_pb2.ModelOffer
    # The backend's capabilities as the offer has them (offer_capabilities).
    capabilities: renderer_pb2.Capabilities
    clip: planning.ClipLimits


class BackendCatalog:
    """The router's ListBackends, fetched at most every few seconds; their offers worked out once per
    fetch, not at every request (building each offer's capabilities at every create was 5% of it)."""

    def __init__(self, router: router_pb2_grpc.RouterServiceStub) -> None:
        self._router = router
        self._backends: list[router_pb2.BackendStatus] = []
        # Each backend with capabilities known, with its offers, the default first.
        self._offered: list[list[Offered]] = []
        self._fetched_at = -_FRESH_SECONDS

    async def backends(self) -> list[router_pb2.BackendStatus]:
        if time.monotonic() - self._fetched_at >= _FRESH_SECONDS:
            try:
                response = await self._router.ListBackends(
                    router_pb2.ListBackendsRequest(), timeout=_LIST_TIMEOUT
                )
            except grpc.aio.AioRpcError:
                return self._backends  # the router is away: check against what was last known
            self._backends = list(response.backends)
            self._offered = [_offered(status) for status in self._backends if status.HasField("capabilities")]
            self._fetched_at = time.monotonic()
        return self._backends

    async def offered(self) -> list[list[Offered]]:
        """Each backend whose capabilities are known, as its offers (the default first)."""
        await self.backends()
        return self._offered

    async def plan(self, spec: render_pb2.RenderSpec) -> render_pb2.RenderPlan:
        """The spec's plan (aiprod_gateway.planning): the caller's shots, else the duration cut into
        shots each within what a backend that could render the spec renders in one call (its aspect
        ratio and first frame taken, its nominal quality at the floor), in lengths most of them share so
        that a shot can fall back to another (a preferred backend is preferred per shot, not planned
        for alone). One shot while no backend is known yet: the router decides when the job runs.
        INVALID_ARGUMENT when no cut comes close enough to the duration."""
        clips = [
            offered.clip
            for backend in await self.offered()
            for offered in backend
            if _could_render(offered.offer, spec)
        ]
        if not clips and not spec.shots:
            return validation.plan_of(spec)
        try:
            return planning.plan_shots(spec, clips)
        except planning.PlanningError as error:
            raise InvalidArgument([("spec.duration_seconds", str(error))]) from error

    async def check_plan_renderable(self, plan: render_pb2.RenderPlan, field: str | None = None) -> None:
        """INVALID_ARGUMENT when no known backend could render a shot of the plan at all (whatever its
        health), naming the shot's field (`field[i]`, for a caller's shots) or the spec's (a plan the
        gateway made)."""
        seen = set()
        for index, shot in enumerate(plan.shots):
            shape = (
                shot.duration_seconds,
                shot.aspect_ratio,
                bool(shot.first_frame.data or shot.first_frame.uri),
            )
            if shape in seen:
                continue
            seen.add(shape)
            try:
                await self.check_renderable(shot)
            except InvalidArgument as error:
                if field is None:
                    raise
                raise InvalidArgument(
                    [(name.replace("spec.", f"{field}[{index}].", 1), why) for name, why in error.violations]
                ) from error

    async def check_renderable(self, shot: render_pb2.Shot) -> None:
        """INVALID_ARGUMENT when no known backend can render the shot at all (whatever its health)."""
        known = await self.offered()
        if not known:
            return  # nothing known yet: the router decides when the job runs
        violations: dict[str, list[str]] = {}
        for backend in known:
            # The backend can render the shot when one of its offers can (the default's reasons if none).
            each = [shot_mismatches(shot, offered.capabilities) for offered in backend]
            if not all(each):
                return
            for field, why in each[0]:
                name = backend_name(backend[0].backend)
                violations.setdefault(f"spec.{field}", []).append(f"{name} {why}")
        raise InvalidArgument([(field, "; ".join(reasons)) for field, reasons in violations.items()])


def _offered(status: router_pb2.BackendStatus) -> list[Offered]:
    each = []
    for offer in offers(status.capabilities):
        capabilities = offer_capabilities(status.capabilities, offer)
        each.append(Offered(status.backend, offer, capabilities, planning.ClipLimits.of(capabilities)))
    return each


def _could_render(offer: renderer_pb2.ModelOffer, spec: render_pb2.RenderSpec) -> bool:
    """Whether a backend's offer could render the spec's shots but for their durations."""
    has_image = bool(spec.first_frame.data or spec.first_frame.uri)
    return (
        spec.aspect_ratio in offer.aspect_ratios
        and (offer.image_input or not has_image)
        and (has_image or not offer.requires_first_frame)
        and (not spec.resolution or offer.resolution == spec.resolution)
        and offer.nominal_quality >= spec.constraints.quality_floor
    )
