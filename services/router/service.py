"""RouterService: plans routes, runs each render's fallback chain, and reports every event.

A render names the tenant whose budget pays for its attempts (empty: the ledger's default tenant) and,
when the tenant's service level promises a quality minimum, the guarantee: see `aiprod_router.chain`
for the free re-render it grants.
"""

import math
import re
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.breaker import BreakerState
from aiprod_kit.errors import ErrorReason, InvalidArgument, NotFound, Unavailable
from aiprod_kit.money import usd
from aiprod_router.backends import Renderer, RendererPool
from aiprod_router.chain import FINAL_RENDER_STATES, AttemptResult, RenderChain, RenderJob

_CALL_TIMEOUT = 10.0
# A ledger tenant's name, as the metrics service accepts it.
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME_RULE = "must be 1 to 128 characters among A-Z a-z 0-9 . _ : -"
_BREAKER_STATES = {
    BreakerState.CLOSED: router_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: router_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: router_pb2.BREAKER_STATE_HALF_OPEN,
}


def _seconds(value: float | None) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    if value is not None:
        duration.FromNanoseconds(round(value * 1e9))
    return duration


def _shot_violations(shot: render_pb2.Shot) -> list[tuple[str, str]]:
    violations = []
    if not shot.prompt.strip():
        violations.append(("shot.prompt", "must not be empty"))
    if shot.duration_seconds <= 0:
        violations.append(("shot.duration_seconds", "must be positive"))
    return violations


def _require_shot(shot: render_pb2.Shot, tenant_id: str = "") -> None:
    violations = _shot_violations(shot) + _tenant_violations(tenant_id)
    if violations:
        raise InvalidArgument(violations)


def _tenant_violations(tenant_id: str) -> list[tuple[str, str]]:
    if tenant_id and not _NAME.fullmatch(tenant_id):
        return [("tenant_id", _NAME_RULE)]
    return []


def _guarantee(
    request: router_pb2.ExecuteRenderRequest | router_pb2.ResumeRenderRequest,
) -> tuple[router_pb2.QualityGuarantee | None, list[tuple[str, str]]]:
    """The request's quality guarantee (None: none, or a minimum of 0), or what is wrong with it."""
    if not request.HasField("guarantee"):
        return None, []
    guarantee = request.guarantee
    minimum = guarantee.quality_minimum
    if not (math.isfinite(minimum) and 0 <= minimum <= 1):
        return None, [("guarantee.quality_minimum", "must be a QC score between 0 and 1")]
    if minimum == 0:
        return None, []
    if not _NAME.fullmatch(guarantee.account):
        return None, [("guarantee.account", f"the ledger account that pays the re-render {_NAME_RULE}")]
    return guarantee, []


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, pool: RendererPool, chain: RenderChain) -> None:
        self._pool = pool
        self._chain = chain

    async def PlanRoute(
        self, request: router_pb2.PlanRouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlanRouteResponse:
        _require_shot(request.shot, request.tenant_id)
        job = RenderJob("", request.shot, request.constraints, "", tenant_id=request.tenant_id)
        candidates = self._chain.rank(await self._chain.route_request(job, frozenset(), 0))
        response = router_pb2.PlanRouteResponse()
        rank = 0
        for candidate in candidates:
            rank += candidate.eligible
            response.candidates.append(
                router_pb2.RouteCandidate(
                    backend=candidate.backend,
                    eligible=candidate.eligible,
                    rank=rank if candidate.eligible else 0,
                    estimated_cost=usd(candidate.expected_cost_micros),
                    estimated_latency=_seconds(candidate.expected_seconds),
                    reasons=candidate.reasons,
                    exclusions=candidate.exclusions,
                )
            )
        return response

    async def ExecuteRender(
        self, request: router_pb2.ExecuteRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        guarantee, violations = _guarantee(request)
        violations = _shot_violations(request.shot) + _tenant_violations(request.tenant_id) + violations
        if not request.idempotency_key:
            violations.append(("idempotency_key", "must not be empty"))
        if violations:
            raise InvalidArgument(violations)
        job = RenderJob(
            request.job_id,
            request.shot,
            request.constraints,
            request.idempotency_key,
            tenant_id=request.tenant_id,
            guarantee=guarantee,
        )
        async for event in self._chain.run(job):
            yield router_pb2.ExecuteRenderResponse(event=event)

    async def ResumeRender(
        self, request: router_pb2.ResumeRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ResumeRenderResponse]:
        self._renderer_of(request.handle)
        guarantee, violations = _guarantee(request)
        violations = _tenant_violations(request.tenant_id) + violations
        if violations:
            raise InvalidArgument(violations)
        # The original idempotency key without its attempt suffix: later attempts continue its series.
        base_key = request.handle.idempotency_key.rpartition(":")[0] or request.job_id
        job = RenderJob(
            request.job_id,
            request.shot,
            request.constraints,
            base_key,
            tenant_id=request.tenant_id,
            guarantee=guarantee,
            rerender_granted=request.rerender_granted,
        )
        async for event in self._chain.run(job, resume=request.handle, resume_attempt=request.attempt or 1):
            yield router_pb2.ResumeRenderResponse(event=event)

    async def CancelRender(
        self, request: router_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.CancelRenderResponse:
        """Cancels the render and says what the cancelled attempt costs by its provider's rules; a
        render that had already ended answers with what it cost as it ended."""
        renderer = self._renderer_of(request.handle)
        task_id = request.handle.task_id
        # Read before the cancel: the chain following the render may forget it once it ended.
        account = self._chain.account_of(request.handle.idempotency_key)
        try:
            render = (
                await renderer.stub.CancelRender(
                    renderer_pb2.CancelRenderRequest(task_id=task_id), timeout=_CALL_TIMEOUT
                )
            ).render
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"render {task_id} is not known to its renderer",
                    reason=ErrorReason.RENDER_NOT_FOUND,
                    metadata={"task_id": task_id, "backend": renderer.name},
                ) from error
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            render = (
                await renderer.stub.GetRender(
                    renderer_pb2.GetRenderRequest(task_id=task_id), timeout=_CALL_TIMEOUT
                )
            ).render
        charge = AttemptResult.charge_of(renderer, request.handle.idempotency_key, render)
        charge.account = account
        return router_pb2.CancelRenderResponse(charge=charge)

    async def ReconcileAttempt(
        self, request: router_pb2.ReconcileAttemptRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReconcileAttemptResponse:
        renderer = self._pool.get(request.backend)
        if renderer is None:
            raise InvalidArgument([("backend", "is not a backend this router is configured with")])
        if not (request.task_id or request.idempotency_key):
            raise InvalidArgument([("idempotency_key", "must be set when task_id is not")])
        lookup = renderer_pb2.GetRenderRequest(
            task_id=request.task_id, idempotency_key=request.idempotency_key
        )
        try:
            render = (await renderer.stub.GetRender(lookup, timeout=_CALL_TIMEOUT)).render
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND or request.task_id:
                # Away, or a task its provider no longer knows: nobody can say yet.
                raise Unavailable(
                    f"the {renderer.name} renderer cannot say ({error.code().name})",
                    reason=ErrorReason.RENDERER_UNAVAILABLE,
                    metadata={"backend": renderer.name},
                ) from error
            # No create was ever claimed under the key: nothing reached the provider.
            charge = event_pb2.AttemptCharge(
                reservation_key=request.idempotency_key,
                backend=renderer.backend,
                outcome=event_pb2.CHARGE_OUTCOME_RELEASE,
                account=self._chain.account_of(request.idempotency_key),
            )
            return router_pb2.ReconcileAttemptResponse(ended=True, charge=charge)
        if render.state not in FINAL_RENDER_STATES:
            return router_pb2.ReconcileAttemptResponse(ended=False)
        charge = AttemptResult.charge_of(renderer, request.idempotency_key, render)
        # Known when this router reserved it; else "" (the caller keeps the account it recorded).
        charge.account = self._chain.account_of(request.idempotency_key)
        return router_pb2.ReconcileAttemptResponse(ended=True, charge=charge)

    async def ListBackends(
        self, request: router_pb2.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListBackendsResponse:
        return router_pb2.ListBackendsResponse(
            backends=[_status(renderer) for renderer in self._pool.renderers.values()]
        )

    def _renderer_of(self, handle: backend_pb2.RenderHandle) -> Renderer:
        if not handle.task_id:
            raise InvalidArgument([("handle.task_id", "must not be empty")])
        renderer = self._pool.get(handle.backend)
        if renderer is None:
            raise InvalidArgument([("handle.backend", "is not a backend this router is configured with")])
        return renderer


def _status(renderer: Renderer) -> router_pb2.BackendStatus:
    stats = renderer.stats
    renderer.breaker.probe_due()  # a breaker whose cooldown is over reads half-open, as routing sees it
    status = router_pb2.BackendStatus(
        backend=renderer.backend,
        target=renderer.target,
        health=router_pb2.BACKEND_HEALTH_SERVING
        if renderer.serving
        else router_pb2.BACKEND_HEALTH_NOT_SERVING,
        breaker=_BREAKER_STATES[renderer.breaker.state],
        renders=stats.renders,
        p50_latency=_seconds(stats.percentile_seconds(50)),
        p95_latency=_seconds(stats.percentile_seconds(95)),
        success_rate=stats.success_rate or 0.0,
        qc_average=stats.qc_average or 0.0,
        observed_cost_per_second=usd(round(stats.cost_per_second_micros or 0)),
        replicas=[
            router_pb2.ReplicaStatus(
                address=address,
                health=router_pb2.BACKEND_HEALTH_SERVING
                if serving
                else router_pb2.BACKEND_HEALTH_NOT_SERVING,
            )
            for address, serving in sorted(renderer.replicas.items())
        ],
    )
    if renderer.capabilities is not None:
        status.capabilities.CopyFrom(renderer.capabilities)
        status.price_per_second.CopyFrom(renderer.capabilities.price_per_second)
        status.nominal_quality = renderer.capabilities.nominal_quality
    return status
