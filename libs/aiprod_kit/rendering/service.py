"""RendererService for any provider: the kit's half of every provider renderer, composed of its parts.

- `registry`: the renders of this process by key and task id, their record in the shared key store,
  and their one ending (kept before it is announced).
- `starting`: one render per idempotency key across restarts and replicas; re-attaching by key or
  task id.
- `polling`: the one poll loop, and what the provider's answers do to a render.
- `finishing`: a finished output copied to durable storage and checked (QC) before success is told.
- `health`: credentials and the circuit breaker, published as the service's gRPC health.
- `calls`: every provider request under the provider's limits, measured and traced.

This servicer validates requests and answers the RPCs; every terminal render carries what the provider
bills for it (the adapter's `charge_micros`), except an uncertain create. A request's fields are
checked (`aiprod_kit.checks`) before anything else: a shot no backend should be asked to render, or an
overlong task id, is INVALID_ARGUMENT before the provider, the key store or the registry sees it.
"""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.capabilities import find_offer, offer_capabilities, offers, shot_mismatches
from aiprod_kit.checks import Violation, echo, shot_violations, task_id_violations
from aiprod_kit.errors import FailedPrecondition, InvalidArgument, Unavailable
from aiprod_kit.failures import Reason, failure
from aiprod_kit.rendering.background import Background
from aiprod_kit.rendering.calls import ProviderCalls
from aiprod_kit.rendering.finishing import OutputFinisher
from aiprod_kit.rendering.health import ProviderHealth
from aiprod_kit.rendering.keys import KEY_PATTERN, KEY_RULE, RenderKeyStore
from aiprod_kit.rendering.limits import ProviderLimits
from aiprod_kit.rendering.outcomes import charge_of
from aiprod_kit.rendering.polling import Poller
from aiprod_kit.rendering.provider import Provider, ProviderError
from aiprod_kit.rendering.record import ProviderRender
from aiprod_kit.rendering.registry import RenderRegistry
from aiprod_kit.rendering.starting import RenderStarter
from aiprod_kit.rendering.storage import VideoStore
from aiprod_kit.rendering.telemetry import ProviderCallMetrics
from aiprod_kit.rendering.watching import watch_renders
from aiprod_kit.server import HealthSignal
from aiprod_kit.settings import ProviderSettings


class ProviderRendererService(renderer_pb2_grpc.RendererServiceServicer):
    def __init__(
        self,
        provider: Provider,
        settings: ProviderSettings,
        store: VideoStore,
        health: HealthSignal,
        work_dir: Path,
        keys: RenderKeyStore,
    ) -> None:
        self._provider = provider
        self._background = Background()
        self._calls = ProviderCalls(
            ProviderLimits(
                settings.requests_per_minute,
                settings.max_concurrent_tasks,
                settings.request_timeout_seconds,
                max_concurrent_requests=settings.max_concurrent_requests,
            ),
            ProviderCallMetrics(provider.name),
        )
        self._health = ProviderHealth(
            provider, self._calls, health, settings.breaker_failures, settings.breaker_cooldown_seconds
        )
        self._registry: RenderRegistry[ProviderRender] = RenderRegistry(provider.name, keys)
        finisher = OutputFinisher(
            provider,
            self._calls,
            store,
            work_dir,
            settings.download_timeout_seconds,
            settings.qc_concurrency,
        )
        self._poller = Poller(
            provider,
            self._calls,
            self._health,
            self._registry,
            finisher,
            self._background,
            settings.poll_seconds,
            settings.max_poll_seconds,
        )
        self._starter = RenderStarter(
            provider, settings, self._calls, self._health, self._registry, self._poller, self._background
        )

    async def start(self) -> None:
        self._background.spawn(self._calls.limits.lag.run())
        self._background.spawn(self._health.run())
        self._background.spawn(self._poller.run())

    async def close(self) -> None:
        await self._background.close()

    # RPCs ---------------------------------------------------------------------------------------

    async def GetCapabilities(
        self, request: renderer_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetCapabilitiesResponse:
        return renderer_pb2.GetCapabilitiesResponse(capabilities=self._provider.capabilities())

    def _violations(self, request: renderer_pb2.StartRenderRequest, model: str) -> list[Violation]:
        capabilities = self._provider.capabilities()
        violations = []
        if not KEY_PATTERN.fullmatch(request.idempotency_key):
            violations.append(("idempotency_key", KEY_RULE))
        malformed = shot_violations(request.shot)
        offer = find_offer(capabilities, model, request.shot.resolution)
        if model not in capabilities.models:
            violations.append(
                ("model", f"unknown model {echo(model)}; this backend has {', '.join(capabilities.models)}")
            )
        elif offer is None and not malformed:
            offered = ", ".join(o.resolution for o in offers(capabilities) if o.model == model)
            violations.append(
                ("shot.resolution", f"{model} renders {offered} here, not {request.shot.resolution}")
            )
        # What this backend cannot do is only asked of a shot any backend could render (a NaN duration
        # or an unknown aspect ratio is wrong everywhere, and said once), with the model asked for.
        if offer is not None:
            capabilities = offer_capabilities(capabilities, offer)
        violations += malformed or [
            (f"shot.{field}", why) for field, why in shot_mismatches(request.shot, capabilities)
        ]
        return violations

    async def StartRender(
        self, request: renderer_pb2.StartRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.StartRenderResponse:
        model = request.model or self._provider.capabilities().models[0]
        if violations := self._violations(request, model):
            raise InvalidArgument(violations)
        render = await self._starter.start(request.idempotency_key, request.shot, model)
        return renderer_pb2.StartRenderResponse(render=render.snapshot())

    async def GetRender(
        self, request: renderer_pb2.GetRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.GetRenderResponse:
        if request.idempotency_key and not request.task_id:
            render = await self._starter.by_key(request.idempotency_key)
        else:
            render = await self._find(request.task_id)
        return renderer_pb2.GetRenderResponse(render=render.snapshot())

    async def WatchRender(
        self, request: renderer_pb2.WatchRenderRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[renderer_pb2.WatchRenderResponse]:
        render = await self._find(request.task_id)
        async for status in render.watch():
            yield renderer_pb2.WatchRenderResponse(render=status)

    async def WatchRenders(
        self,
        requests: AsyncIterator[renderer_pb2.WatchRendersRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[renderer_pb2.WatchRendersResponse]:
        async for response in watch_renders(requests, self._find):
            yield response

    async def CancelRender(
        self, request: renderer_pb2.CancelRenderRequest, context: grpc.aio.ServicerContext
    ) -> renderer_pb2.CancelRenderResponse:
        render = await self._find(request.task_id)
        if render.ended:
            raise FailedPrecondition(f"render {echo(request.task_id)} has already ended")
        try:
            cancelled = await self._calls.call(
                render, lambda: self._provider.cancel(render.task_id), idempotent=True, what="cancel"
            )
        except ProviderError as error:
            raise Unavailable(
                f"the {self._provider.name} provider did not take the cancel: {error}"
            ) from error
        message = "cancelled" if cancelled else f"stopped following; {self._provider.name} has no cancel"
        # What the provider bills for a cancelled task, whatever it was doing.
        charge = charge_of(self._provider, render, render.last_task, cancelled=True)
        await self._registry.end(
            render, renderer_pb2.RENDER_STATE_CANCELLED, failure(Reason.CANCELLED, message, False), charge
        )
        return renderer_pb2.CancelRenderResponse(render=render.snapshot())

    async def _find(self, task_id: str) -> ProviderRender:
        """The render a caller names by task id (re-attached when this process never saw it)."""
        return await self._starter.by_task(_task_id(task_id))


def _task_id(task_id: str) -> str:
    """A task id a caller names, checked before the registry, the key store or the provider is asked."""
    if violations := task_id_violations(task_id):
        raise InvalidArgument(violations)
    return task_id
