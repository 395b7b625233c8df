"""A StartRender that fails: the chain asks the renderer, over its records channel (not health-checked),
what it did under the attempt's key. Nothing: the attempt is released and the chain falls back at once.
A render: it is the attempt's, followed. No answer, or a call that ran out of time (it may still run at
the renderer): the renderer is waited for, then the attempt is held. Renderers and the ledger are
fakes; the chain and the routing policy are the real ones."""

import itertools
from collections.abc import AsyncIterator

import grpc
import pytest
from fake_streams import watch_renders
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from aiprod.common.v1 import backend_pb2, event_pb2, render_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.breaker import CircuitBreaker
from aiprod_kit.errors import ErrorReason, ServiceError
from aiprod_kit.failures import Reason
from aiprod_kit.money import usd, usd_from_units
from aiprod_kit.settings import RouterSettings
from aiprod_router.backends import Renderer
from aiprod_router.chain import RenderChain, RenderJob
from aiprod_router.telemetry import RouterMetrics

RUNWAY, VEO = backend_pb2.BACKEND_RUNWAY, backend_pb2.BACKEND_VEO
HOLD, RELEASE, COMMIT = (
    event_pb2.CHARGE_OUTCOME_HOLD,
    event_pb2.CHARGE_OUTCOME_RELEASE,
    event_pb2.CHARGE_OUTCOME_COMMIT,
)
PRICE = usd_from_units(0.48)


def rpc_error(code: grpc.StatusCode, reason: str = "") -> grpc.aio.AioRpcError:
    """An error status: from an AIPROD service when it names a reason (its ErrorInfo), else from gRPC."""
    trailing = grpc.aio.Metadata()
    if reason:
        details = ServiceError("refused", reason=reason).details()
        status = rpc_status.to_status(
            status_pb2.Status(code=getattr(code_pb2, code.name), message="refused", details=details)
        )
        trailing = grpc.aio.Metadata(*status.trailing_metadata)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, "refused")


def succeeded(backend: int, key: str) -> renderer_pb2.Render:
    output = render_pb2.RenderOutput(
        video=render_pb2.VideoArtifact(uri="file:///out.mp4", duration_seconds=4),
        qc=render_pb2.QcReport(score=0.99),
        cost=PRICE,
    )
    handle = backend_pb2.RenderHandle(backend=backend, task_id=f"task-{key}", idempotency_key=key)
    return renderer_pb2.Render(
        handle=handle, state=renderer_pb2.RENDER_STATE_SUCCEEDED, output=output, charge=PRICE
    )


class FakeRenderer:
    """One renderer: StartRender fails with `start_error` (else succeeds); the records channel's
    GetRender by key answers `record` (a render, or an error to raise); GetCapabilities (the reattach
    wait) answers when `reachable`."""

    def __init__(self, backend: int, start_error=None, record=None, reachable: bool = False) -> None:
        self.backend = backend
        self.start_error = start_error
        self.record = record
        self.reachable = reachable
        self.started: list[str] = []
        self.looked_up: list[str] = []
        self.waited = 0

    async def StartRender(self, request, timeout=None):
        self.started.append(request.idempotency_key)
        if self.start_error is not None:
            raise self.start_error
        return renderer_pb2.StartRenderResponse(render=succeeded(self.backend, request.idempotency_key))

    async def GetRender(self, request, timeout=None):
        self.looked_up.append(request.idempotency_key)
        if isinstance(self.record, Exception):
            raise self.record
        return renderer_pb2.GetRenderResponse(render=self.record)

    async def GetCapabilities(self, request, timeout=None, wait_for_ready=None):
        self.waited += 1
        if not self.reachable:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
        return renderer_pb2.GetCapabilitiesResponse()

    def WatchRenders(self, requests):
        return watch_renders(requests, self.statuses)

    async def statuses(self, task_id: str) -> AsyncIterator[renderer_pb2.Render]:
        yield succeeded(self.backend, task_id.removeprefix("task-"))


class Pool:
    def __init__(self, *fakes: FakeRenderer) -> None:
        self.renderers: dict[int, Renderer] = {}
        for fake in fakes:
            capabilities = renderer_pb2.Capabilities(
                min_duration_seconds=1,
                max_duration_seconds=10,
                aspect_ratios=[render_pb2.ASPECT_RATIO_16_9],
                price_per_second=usd_from_units(0.12),
                nominal_quality=0.95,
            )
            # The same fake answers both channels; the test tells the calls apart by method.
            self.renderers[fake.backend] = Renderer(
                fake.backend,
                "fake",
                None,  # type: ignore[arg-type]
                fake,  # type: ignore[arg-type]
                records_stub=fake,  # type: ignore[arg-type]
                serving=True,
                capabilities=capabilities,
                breaker=CircuitBreaker(3, 30.0),
            )

    def get(self, backend: int) -> Renderer | None:
        return self.renderers.get(backend)


class Ledger:
    def __init__(self) -> None:
        self.reservations: dict[str, metrics_pb2.Reservation] = {}

    async def ReserveBudget(self, request, timeout=None):
        reservation = metrics_pb2.Reservation(
            reservation_key=request.reservation_key,
            tenant_id=request.tenant_id,
            amount=request.amount,
            backend=request.backend,
            job_id=request.job_id,
        )
        self.reservations[request.reservation_key] = reservation
        return metrics_pb2.ReserveBudgetResponse(reservation=reservation)

    async def GetBudget(self, request, timeout=None):
        return metrics_pb2.GetBudgetResponse(budget=metrics_pb2.Budget(cap=usd(0)))


_keys = itertools.count()


async def run(pool: Pool) -> list[event_pb2.RenderEvent]:
    job = RenderJob(
        "job-1",
        render_pb2.Shot(prompt="a heron", duration_seconds=4, aspect_ratio=render_pb2.ASPECT_RATIO_16_9),
        render_pb2.RenderConstraints(quality_floor=0.5, preferred_backend=RUNWAY),
        f"job-{next(_keys)}",
    )
    settings = RouterSettings(router_max_attempts=3, router_reattach_seconds=0.1)
    chain = RenderChain(pool, Ledger(), settings, RouterMetrics(lambda: pool.renderers.values()))  # type: ignore[arg-type]
    return [item async for item in chain.run(job)]


def charges(items: list[event_pb2.RenderEvent]) -> list[tuple[int, int]]:
    return [(item.charged.backend, item.charged.outcome) for item in items if item.HasField("charged")]


NOT_SERVING = rpc_error(grpc.StatusCode.UNAVAILABLE)  # failed on the health-checked channel
NOTHING = rpc_error(grpc.StatusCode.NOT_FOUND, ErrorReason.NOT_FOUND)  # the renderer: no such key


@pytest.mark.parametrize(
    "start_error",
    [NOT_SERVING, rpc_error(grpc.StatusCode.UNAVAILABLE, ErrorReason.UNAVAILABLE)],
    ids=["not-sent", "refused-by-the-renderer"],
)
async def test_a_start_that_created_nothing_is_released_and_falls_back_at_once(start_error):
    runway = FakeRenderer(RUNWAY, start_error=start_error, record=NOTHING)
    veo = FakeRenderer(VEO)
    items = await run(Pool(runway, veo))

    assert charges(items) == [(RUNWAY, RELEASE), (VEO, COMMIT)]
    assert items[-1].HasField("succeeded")
    first = next(item.charged for item in items if item.HasField("charged"))
    assert first.failure.reason == Reason.RENDERER_UNAVAILABLE and first.failure.retryable
    assert "nothing was started" in first.failure.message
    # Asked once by its key, and not waited for.
    assert runway.looked_up == runway.started and len(runway.started) == 1
    assert runway.waited == 0


async def test_a_render_the_renderer_has_under_the_key_is_the_attempts():
    # The call broke after the create: the renderer's record of the key is the render, followed there.
    runway = FakeRenderer(RUNWAY, start_error=NOT_SERVING)
    runway.record = succeeded(RUNWAY, "whatever")
    runway.record.state = renderer_pb2.RENDER_STATE_RUNNING
    items = await run(Pool(runway, FakeRenderer(VEO)))

    assert charges(items) == [(RUNWAY, COMMIT)]
    assert items[-1].HasField("succeeded")
    assert any(item.HasField("submitted") for item in items)
    assert len(runway.started) == 1


@pytest.mark.parametrize(
    ("start_error", "record", "asked"),
    [
        # The call ran out of time: it may still run at the renderer, so the record is not asked.
        (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), NOTHING, False),
        # The renderer cannot say (away, or a NOT_FOUND that is not its own).
        (NOT_SERVING, rpc_error(grpc.StatusCode.UNAVAILABLE), True),
        (NOT_SERVING, rpc_error(grpc.StatusCode.NOT_FOUND), True),
    ],
    ids=["ran-out-of-time", "records-unavailable", "not-found-without-error-info"],
)
async def test_a_start_nobody_can_answer_for_is_waited_for_then_held(start_error, record, asked):
    runway = FakeRenderer(RUNWAY, start_error=start_error, record=record)
    items = await run(Pool(runway, FakeRenderer(VEO)))

    assert charges(items)[0] == (RUNWAY, HOLD)
    assert runway.waited == 1 and len(runway.started) == 1
    assert bool(runway.looked_up) == asked


async def test_a_start_that_runs_out_of_time_again_at_a_renderer_back_is_held():
    # Reachable again after a call that ran out of time: StartRender asked again, under the same key.
    runway = FakeRenderer(RUNWAY, start_error=rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), reachable=True)
    runway.record = NOTHING
    items = await run(Pool(runway, FakeRenderer(VEO)))

    # Ran out of time again: still not provably unsent, held.
    assert charges(items)[0] == (RUNWAY, HOLD)
    assert len(runway.started) == 2 and len(set(runway.started)) == 1
    assert not runway.looked_up


async def test_a_renderer_at_capacity_is_asked_again_until_it_starts_the_render(monkeypatch):
    # The renderer waited for a task slot and none freed (AT_CAPACITY): nothing was started, so the
    # job waits its turn there under the same key, neither falling back nor failing.
    monkeypatch.setattr("aiprod_router.chain._SLOT_RETRY_SECONDS", 0)
    runway = FakeRenderer(
        RUNWAY, start_error=rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ErrorReason.AT_CAPACITY)
    )
    answers = iter([runway.start_error, runway.start_error, None])

    async def start_when_a_slot_frees(request, timeout=None):
        runway.start_error = next(answers)
        return await FakeRenderer.StartRender(runway, request, timeout)

    runway.StartRender = start_when_a_slot_frees  # type: ignore[method-assign]
    veo = FakeRenderer(VEO)
    items = await run(Pool(runway, veo))

    assert charges(items) == [(RUNWAY, COMMIT)]
    assert items[-1].HasField("succeeded")
    assert len(runway.started) == 3 and len(set(runway.started)) == 1
    assert not runway.looked_up and not veo.started


async def test_progress_is_passed_on_in_steps_not_at_every_change():
    # A renderer reporting every 1%: the job's log gets an event every 5% (each is a write at the
    # gateway and a message to every watcher), the first at 5% (at 0% it says nothing new).
    runway = FakeRenderer(RUNWAY)

    async def statuses(task_id: str) -> AsyncIterator[renderer_pb2.Render]:
        for percent in range(100):
            yield renderer_pb2.Render(state=renderer_pb2.RENDER_STATE_RUNNING, progress=percent / 100)
        yield succeeded(RUNWAY, task_id.removeprefix("task-"))

    runway.statuses = statuses  # type: ignore[method-assign]
    items = await run(Pool(runway))

    fractions = [round(item.progress.fraction, 2) for item in items if item.HasField("progress")]
    assert fractions == [percent / 100 for percent in range(5, 100, 5)]
    assert items[-1].HasField("succeeded")
