"""RouterService: plans routes, runs each render's fallback chain, and reports every event.

A render names the tenant whose budget pays for its attempts (empty: the ledger's default tenant) and,
when the tenant's service level promises a quality minimum, the guarantee: see `aiprod_router.chain`
for the free re-render it grants.
"""

import math
import re
from collections.abc import AsyncIterator

import grpc
import structlog
from google.protobuf import duration_pb2

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.breaker import BreakerState
from aiprod_kit.checks import (
    Violation,
    bounded_string,
    echo,
    finite_number,
    known_enum,
    shot_violations,
    task_id_violations,
    valid_timestamp,
)
from aiprod_kit.errors import ErrorReason, InvalidArgument, NotFound, ServiceError, Unavailable, status_proto
from aiprod_kit.money import usd
from aiprod_kit.multiplexing import Multiplexed, Order, Start, Stop
from aiprod_kit.telemetry import as_call
from aiprod_router.backends import Renderer, RendererPool
from aiprod_router.chain import AttemptResult, RenderChain, RenderJob
from aiprod_router.watches import FINAL_RENDER_STATES

log = structlog.get_logger()

_CALL_TIMEOUT = 10.0
# A ledger tenant's name, as the metrics service accepts it.
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME_RULE = "must be 1 to 128 characters among A-Z a-z 0-9 . _ : -"
# A render's idempotency key: its attempts' keys (KEY:N) must stay within the renderers' and the
# ledger's 128 characters.
_RENDER_KEY = re.compile(r"[A-Za-z0-9._:-]{1,120}")
_RENDER_KEY_RULE = "must be 1 to 120 characters among A-Z a-z 0-9 . _ : -"
# An attempt's key, as renderers and the ledger take it.
_ATTEMPT_KEY = _NAME
# A job id, as the ledger keeps it with each reservation.
_MAX_JOB_ID_CHARACTERS = 128
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


def _render_violations(
    shot: render_pb2.Shot, constraints: render_pb2.RenderConstraints, tenant_id: str, job_id: str = ""
) -> list[Violation]:
    """What is wrong with the render a request asks for: its shot, its constraints, its tenant and job."""
    violations = shot_violations(shot)
    violations += finite_number(constraints.quality_floor, "constraints.quality_floor", 0, 1)
    violations += known_enum(
        constraints.preferred_backend, backend_pb2.Backend, "constraints.preferred_backend"
    )
    if constraints.max_cost.amount_micros < 0:
        violations.append(("constraints.max_cost.amount_micros", "must not be negative"))
    if constraints.HasField("deadline"):
        violations += valid_timestamp(constraints.deadline, "constraints.deadline")
    violations += _tenant_violations(tenant_id)
    violations += bounded_string(job_id, "job_id", _MAX_JOB_ID_CHARACTERS)
    return violations


def _tenant_violations(tenant_id: str) -> list[Violation]:
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


_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
_EXECUTE_RENDER = f"/{_SERVICE}/ExecuteRender"
_RESUME_RENDER = f"/{_SERVICE}/ResumeRender"


def _render_event(render_id: str, event: event_pb2.RenderEvent) -> router_pb2.ExecuteRendersResponse:
    return router_pb2.ExecuteRendersResponse(render_id=render_id, event=event)


def _call_end(render_id: str, error: Exception | None) -> router_pb2.ExecuteRendersResponse:
    """How a render's call over ExecuteRenders ended, as its own call's status would say it."""
    if error is None:
        return router_pb2.ExecuteRendersResponse(render_id=render_id, end=router_pb2.CallEnd())
    if not isinstance(error, ServiceError):
        log.error("unexpected error", method=_EXECUTE_RENDER, render_id=render_id, exc_info=error)
    status = status_proto(error)
    end = router_pb2.CallEnd(
        code=status.code, message=status.message, status_details=status.SerializeToString()
    )
    return router_pb2.ExecuteRendersResponse(render_id=render_id, end=end)


async def _refused(error: ServiceError) -> AsyncIterator[event_pb2.RenderEvent]:
    raise error
    yield  # an async generator that only refuses


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, pool: RendererPool, chain: RenderChain) -> None:
        self._pool = pool
        self._chain = chain
        self._renders = Multiplexed(self._orders, _render_event, _call_end)

    async def PlanRoute(
        self, request: router_pb2.PlanRouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlanRouteResponse:
        if violations := _render_violations(request.shot, request.constraints, request.tenant_id):
            raise InvalidArgument(violations)
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
                    model=candidate.model,
                    resolution=candidate.resolution,
                )
            )
        return response

    async def ExecuteRender(
        self, request: router_pb2.ExecuteRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        async for event in self._execute(request):
            yield router_pb2.ExecuteRenderResponse(event=event)

    async def ResumeRender(
        self, request: router_pb2.ResumeRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ResumeRenderResponse]:
        async for event in self._resume(request):
            yield router_pb2.ResumeRenderResponse(event=event)

    async def ExecuteRenders(
        self, requests: AsyncIterator[router_pb2.ExecuteRendersRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ExecuteRendersResponse]:
        async for response in self._renders.serve(requests):
            yield response

    def _orders(self, request: router_pb2.ExecuteRendersRequest) -> list[Order]:
        """What one request of ExecuteRenders asks: each render observed as its own call would be."""
        action = request.WhichOneof("action")
        if action == "stop":
            return [Stop(request.render_id)]
        if action == "execute":
            answer = as_call(_EXECUTE_RENDER, self._execute(request.execute))
        elif action == "resume":
            answer = as_call(_RESUME_RENDER, self._resume(request.resume))
        else:
            answer = _refused(InvalidArgument([("action", "must be one of execute, resume or stop")]))
        if not request.render_id:
            answer = _refused(InvalidArgument([("render_id", "must name the render on this stream")]))
        return [Start(request.render_id, lambda: answer, request.trace_context)]

    async def _execute(
        self, request: router_pb2.ExecuteRenderRequest
    ) -> AsyncIterator[event_pb2.RenderEvent]:
        guarantee, violations = _guarantee(request)
        violations = (
            _render_violations(request.shot, request.constraints, request.tenant_id, request.job_id)
            + violations
        )
        if not _RENDER_KEY.fullmatch(request.idempotency_key):
            violations.append(("idempotency_key", _RENDER_KEY_RULE))
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
            yield event

    async def _resume(self, request: router_pb2.ResumeRenderRequest) -> AsyncIterator[event_pb2.RenderEvent]:
        self._renderer_of(request.handle)
        guarantee, violations = _guarantee(request)
        violations = (
            _render_violations(request.shot, request.constraints, request.tenant_id, request.job_id)
            + violations
        )
        if request.handle.idempotency_key and not _ATTEMPT_KEY.fullmatch(request.handle.idempotency_key):
            violations.append(("handle.idempotency_key", _NAME_RULE))
        if request.attempt < 0:
            violations.append(("attempt", "must not be negative"))
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
            yield event

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
                    f"render {echo(task_id)} is not known to its renderer",
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
        violations: list[Violation] = []
        if renderer is None:
            violations.append(("backend", "is not a backend this router is configured with"))
        if request.task_id:
            violations += task_id_violations(request.task_id)
        elif not request.idempotency_key:
            violations.append(("idempotency_key", "must be set when task_id is not"))
        if request.idempotency_key and not _ATTEMPT_KEY.fullmatch(request.idempotency_key):
            violations.append(("idempotency_key", _NAME_RULE))
        if violations:
            raise InvalidArgument(violations)
        assert renderer is not None
        lookup = renderer_pb2.GetRenderRequest(
            task_id=request.task_id, idempotency_key=request.idempotency_key
        )
        try:
            # Over the records channel: a renderer out of service still answers for what it did.
            render = (await renderer.records.GetRender(lookup, timeout=_CALL_TIMEOUT)).render
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
        violations = task_id_violations(handle.task_id, "handle.task_id")
        renderer = self._pool.get(handle.backend)
        if renderer is None:
            violations.append(("handle.backend", "is not a backend this router is configured with"))
        if violations:
            raise InvalidArgument(violations)
        assert renderer is not None
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
