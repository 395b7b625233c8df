"""`aiprod render --explain`: how the router ranks the backends for a render, asked before it starts."""

import grpc

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_cli.gateway import CALL_TIMEOUT_SECONDS, connect
from aiprod_cli.output import stderr
from aiprod_cli.router import connect_router
from aiprod_kit.presets import DEFAULT_PRESET, PRESETS

# The duration of a render that gives none, when the preset does not say either.
DEFAULT_DURATION_SECONDS = 5.0
# The plan is a courtesy: a router slow to answer should not hold the render up for long.
PLAN_TIMEOUT_SECONDS = 10.0


def _presets(gateway_address: str, api_key: str) -> dict[str, gateway_pb2.Preset]:
    """The gateway's presets; the built-in ones (which the gateway serves) when it cannot be asked."""
    try:
        with connect(gateway_address, api_key) as gateway:
            response = gateway.stub.ListPresets(
                gateway_pb2.ListPresetsRequest(), timeout=CALL_TIMEOUT_SECONDS
            )
    except grpc.RpcError:
        return {name: preset.to_proto() for name, preset in PRESETS.items()}
    return {preset.name: preset for preset in response.presets}


def plan_request(
    spec: render_pb2.RenderSpec, presets: dict[str, gateway_pb2.Preset]
) -> router_pb2.PlanRouteRequest | None:
    """The shot and constraints the gateway will route the spec with; None when its preset is unknown.

    As the gateway does: the preset's default duration when the spec gives none, 16:9 by default, no
    first frame, the preferred backend, and the preset's quality floor unless the spec asks for more.
    """
    preset = presets.get(spec.preset or DEFAULT_PRESET)
    if preset is None:
        return None
    shot = render_pb2.Shot(
        prompt=spec.prompt.strip(),
        duration_seconds=spec.duration_seconds or preset.default_duration_seconds or DEFAULT_DURATION_SECONDS,
        aspect_ratio=spec.aspect_ratio or render_pb2.ASPECT_RATIO_16_9,
    )
    constraints = render_pb2.RenderConstraints(
        preferred_backend=spec.constraints.preferred_backend,
        quality_floor=max(spec.constraints.quality_floor, preset.quality_floor),
    )
    return router_pb2.PlanRouteRequest(shot=shot, constraints=constraints)


def plan_route(
    spec: render_pb2.RenderSpec, gateway_address: str, router_address: str, api_key: str
) -> list[router_pb2.RouteCandidate] | None:
    """The router's candidates for the render, eligible ones first by rank.

    None, said on stderr, when there is no plan to show (router unreachable or refusing, unknown
    preset): the render goes on without it.
    """
    request = plan_request(spec, _presets(gateway_address, api_key))
    if request is None:
        stderr.print(f"no route plan: unknown preset {spec.preset!r}", markup=False, highlight=False)
        return None
    try:
        with connect_router(router_address) as stub:
            response = stub.PlanRoute(request, timeout=PLAN_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            why = f"the router cannot be reached at {router_address} ({code.name})"
        else:
            why = f"the router at {router_address} refused: {code.name}: {error.details()}"
        stderr.print(f"no route plan: {why}; rendering anyway", markup=False, highlight=False)
        return None
    return list(response.candidates)
