"""RouterService: routes a shot to a renderer, follows it to its end, and reports every event."""

from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from aiprod_kit.money import usd
from aiprod_router.backends import Renderer, RendererPool
from aiprod_router.policy import BackendView, Candidate, rank_backends

_RENDER_STATES_FINAL = (renderer_pb2.RENDER_STATE_SUCCEEDED, renderer_pb2.RENDER_STATE_FAILED,
                        renderer_pb2.RENDER_STATE_CANCELLED)  # fmt: skip


# A renderer's answers that say the render itself is wrong, so that no retry can help.
_REFUSALS = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
)


def _event(attempt: int, **kind: object) -> router_pb2.ExecuteRenderResponse:
    time = timestamp_pb2.Timestamp()
    time.GetCurrentTime()
    return event_pb2.RenderEvent(time=time, attempt=attempt, **kind)  # type: ignore[arg-type]


def _failure(reason: str, message: str, retryable: bool) -> render_pb2.RenderFailure:
    return render_pb2.RenderFailure(reason=reason, message=message, retryable=retryable)


def _require_shot(shot: render_pb2.Shot, field: str = "shot") -> None:
    violations = []
    if not shot.prompt.strip():
        violations.append((f"{field}.prompt", "must not be empty"))
    if shot.duration_seconds <= 0:
        violations.append((f"{field}.duration_seconds", "must be positive"))
    if violations:
        raise InvalidArgument(violations)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, pool: RendererPool) -> None:
        self._pool = pool

    async def _rank(
        self, shot: render_pb2.Shot, constraints: render_pb2.RenderConstraints
    ) -> list[Candidate]:
        views = [BackendView(r.backend, r.capabilities, r.serving) for r in self._pool.renderers.values()]
        return rank_backends(shot, constraints, views)

    async def PlanRoute(
        self, request: router_pb2.PlanRouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlanRouteResponse:
        _require_shot(request.shot)
        candidates = await self._rank(request.shot, request.constraints)
        rank = 0
        response = router_pb2.PlanRouteResponse()
        for candidate in candidates:
            rank += candidate.eligible
            response.candidates.append(
                router_pb2.RouteCandidate(
                    backend=candidate.backend,
                    eligible=candidate.eligible,
                    rank=rank if candidate.eligible else 0,
                    estimated_cost=usd(candidate.estimated_cost_micros),
                    estimated_latency=duration_pb2.Duration(),
                    reasons=candidate.reasons,
                )
            )
        return response

    async def ExecuteRender(
        self, request: router_pb2.ExecuteRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ExecuteRenderResponse]:
        _require_shot(request.shot)
        if not request.idempotency_key:
            raise InvalidArgument([("idempotency_key", "must not be empty")])
        attempt = 1
        candidates = [c for c in await self._rank(request.shot, request.constraints) if c.eligible]
        if not candidates:
            yield router_pb2.ExecuteRenderResponse(
                event=_event(attempt, failed=_failure("NO_BACKEND", "no backend can take this render", False))
            )
            return
        chosen = candidates[0]
        renderer = self._pool.get(chosen.backend)
        assert renderer is not None
        yield router_pb2.ExecuteRenderResponse(
            event=_event(
                attempt,
                routed=event_pb2.RouteDecision(
                    backend=chosen.backend, reason="; ".join(chosen.reasons),
                    estimated_cost=usd(chosen.estimated_cost_micros),
                ),
            )
        )  # fmt: skip
        # One key per attempt: a retried call or a restarted caller never starts a second render.
        try:
            started = await renderer.stub.StartRender(
                renderer_pb2.StartRenderRequest(
                    idempotency_key=f"{request.idempotency_key}:{attempt}", shot=request.shot
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() not in _REFUSALS:
                raise Unavailable(
                    f"renderer {renderer.target} could not start the render: {error.code().name}"
                ) from error
            yield router_pb2.ExecuteRenderResponse(
                event=_event(attempt, failed=_failure("RENDER_REFUSED", error.details() or "", False))
            )
            return
        if not started.render.handle.task_id:
            # The renderer could not create the task at its provider (refused, rate limited, uncertain).
            yield router_pb2.ExecuteRenderResponse(event=_event(attempt, failed=started.render.failure))
            return
        yield router_pb2.ExecuteRenderResponse(event=_event(attempt, submitted=started.render.handle))
        async for event in _follow(renderer, started.render.handle.task_id, attempt):
            yield router_pb2.ExecuteRenderResponse(event=event)

    async def ResumeRender(
        self, request: router_pb2.ResumeRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ResumeRenderResponse]:
        renderer = self._renderer_of(request.handle)
        async for event in _follow(renderer, request.handle.task_id, request.attempt or 1):
            yield router_pb2.ResumeRenderResponse(event=event)

    async def CancelRender(
        self, request: router_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.CancelRenderResponse:
        renderer = self._renderer_of(request.handle)
        try:
            await renderer.stub.CancelRender(renderer_pb2.CancelRenderRequest(task_id=request.handle.task_id))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"render {request.handle.task_id} is not known to its renderer") from error
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise FailedPrecondition(error.details() or "the render has already ended") from error
            raise
        return router_pb2.CancelRenderResponse()

    async def ListBackends(
        self, request: router_pb2.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListBackendsResponse:
        response = router_pb2.ListBackendsResponse()
        for renderer in self._pool.renderers.values():
            status = router_pb2.BackendStatus(
                backend=renderer.backend,
                target=renderer.target,
                health=router_pb2.BACKEND_HEALTH_SERVING
                if renderer.serving
                else router_pb2.BACKEND_HEALTH_NOT_SERVING,
            )
            if renderer.capabilities is not None:
                status.capabilities.CopyFrom(renderer.capabilities)
                status.price_per_second.CopyFrom(renderer.capabilities.price_per_second)
                status.nominal_quality = renderer.capabilities.nominal_quality
            response.backends.append(status)
        return response

    def _renderer_of(self, handle: backend_pb2.RenderHandle) -> Renderer:
        if not handle.task_id:
            raise InvalidArgument([("handle.task_id", "must not be empty")])
        renderer = self._pool.get(handle.backend)
        if renderer is None:
            raise InvalidArgument([("handle.backend", "is not a backend this router is configured with")])
        return renderer


async def _follow(renderer: Renderer, task_id: str, attempt: int) -> AsyncIterator[event_pb2.RenderEvent]:
    """Turns a renderer's WatchRender stream into render events, ending with a final one."""
    last_progress = -1.0
    try:
        async for update in renderer.stub.WatchRender(renderer_pb2.WatchRenderRequest(task_id=task_id)):
            render = update.render
            if render.state == renderer_pb2.RENDER_STATE_SUCCEEDED:
                yield _event(attempt, qc=render.output.qc)
                yield _event(attempt, succeeded=render.output)
                return
            if render.state in _RENDER_STATES_FINAL:
                yield _event(attempt, failed=render.failure)
                return
            if render.progress != last_progress:
                last_progress = render.progress
                yield _event(attempt, progress=event_pb2.RenderProgress(fraction=render.progress))
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            yield _event(
                attempt, failed=_failure("RENDER_LOST", "the renderer no longer knows this render", True)
            )
            return
        raise
    # The stream ended without a final state: the renderer went away mid-render.
    yield _event(attempt, failed=_failure("RENDERER_UNAVAILABLE", "the renderer stopped mid-render", True))
