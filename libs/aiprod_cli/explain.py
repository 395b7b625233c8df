"""`aiprod render --explain`: how the backends rank for a render, asked of the gateway before it starts.

The gateway's quote ranks them as the job itself will be routed: with the preset's defaults and floor,
the tenant's tier (its quality minimum and deadline), the price limit and every shot of the plan. The
quote binds nothing unless a job names it.
"""

import grpc

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import connect
from aiprod_cli.output import stderr

# The plan is a courtesy: a gateway slow to answer should not hold the render up for long.
PLAN_TIMEOUT_SECONDS = 10.0


def explain_route(
    spec: render_pb2.RenderSpec, gateway_address: str, api_key: str
) -> list[gateway_pb2.BackendEstimate] | None:
    """Every backend's estimate for the render, the route first, qualifying ones by rank, with the
    reasons.

    None, said on stderr, when the gateway gives no quote (unreachable, or refusing the render, which
    its create then says too): the render goes on without it.
    """
    try:
        with connect(gateway_address, api_key) as gateway:
            response = gateway.stub.QuoteRender(
                gateway_pb2.QuoteRenderRequest(spec=spec), timeout=PLAN_TIMEOUT_SECONDS
            )
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            why = f"the gateway cannot be reached at {gateway_address} ({code.name})"
        else:
            why = f"the gateway refused to quote it: {code.name}: {error.details()}"
        stderr.print(f"no route plan: {why}; rendering anyway", markup=False, highlight=False, soft_wrap=True)
        return None
    return list(response.quote.estimates)
