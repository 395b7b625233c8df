"""Hostile input at the inner services, sent by hand past the gateway: NaN and infinite numbers, enum
values no build knows, timestamps and durations outside protobuf's range, and strings of 100,000
characters. Each is INVALID_ARGUMENT naming its field (never INTERNAL, UNKNOWN, or the transport's
RESOURCE_EXHAUSTED for a status too large to send), with a short status, nothing changes, and the
service goes on SERVING.

The mesh is metrics, the router, the local renderer and the Runway renderer against the sandbox (the
renderer kit every provider renderer shares), as processes on loopback.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2, message, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.mesh import field_violations
from helpers.sandbox import FAST_PROVIDERS, RENDERER_SERVICE

from aiprod.common.v1 import backend_pb2, event_pb2, job_pb2, money_pb2, render_pb2
from aiprod.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod.router.v1 import router_pb2, router_pb2_grpc
from aiprod_kit.failures import Reason
from aiprod_kit.mesh import Mesh

HEALTH_NAMES = {
    "metrics": "aiprod.metrics.v1.MetricsService",
    "router": "aiprod.router.v1.RouterService",
    "renderer-local": RENDERER_SERVICE,
    "renderer-runway": RENDERER_SERVICE,
}
HUGE = "k" * 100_000
LONG_TASK_ID = "t" * 200  # within the bound on task ids, far over what an error quotes
BEFORE_YEAR_1 = timestamp_pb2.Timestamp(seconds=-70_000_000_000)
AFTER_9999 = timestamp_pb2.Timestamp(seconds=253_402_300_800)
BAD_NANOS = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=1_000_000_000)
# A refusal's status stays short: it quotes a caller's text by a short prefix at most.
MAX_DETAILS = 300
# gRPC's default limit on the metadata a peer receives (the status travels in the trailers).
METADATA_LIMIT = 8 * 1024


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("internal"),
        free_ports=True,
        sandbox=True,
        only=("metrics", "sandbox", "renderer-local", "renderer-runway", "router"),
        environment=FAST_PROVIDERS,
    )
    running.start()
    try:
        yield running
    finally:
        running.stop()


def shot(**changes: object) -> render_pb2.Shot:
    fields: dict[str, object] = {"prompt": "A paper boat on a pond", "duration_seconds": 5}
    return render_pb2.Shot(**{**fields, **changes})


def deadline(stamp: timestamp_pb2.Timestamp) -> render_pb2.RenderConstraints:
    return render_pb2.RenderConstraints(deadline=stamp)


@dataclass(frozen=True)
class Bad:
    """One hostile request: the service, its method, the request and the field to blame."""

    service: str
    method: str
    request: message.Message
    field: str
    streaming: bool = False

    def __str__(self) -> str:
        return f"{self.service}.{self.method}:{self.field}"


def router_cases() -> list[Bad]:
    plan, execute = router_pb2.PlanRouteRequest, router_pb2.ExecuteRenderRequest

    def executed(field: str, **fields: object) -> Bad:
        request = execute(**{"shot": shot(), "idempotency_key": "hostile-1", **fields})
        return Bad("router", "ExecuteRender", request, field, streaming=True)

    resume = router_pb2.ResumeRenderRequest
    handle = backend_pb2.RenderHandle(
        backend=backend_pb2.BACKEND_LOCAL, task_id="local_0", idempotency_key="k:1"
    )
    return [
        Bad("router", "PlanRoute", plan(shot=shot(duration_seconds=math.nan)), "shot.duration_seconds"),
        Bad("router", "PlanRoute", plan(shot=shot(duration_seconds=math.inf)), "shot.duration_seconds"),
        Bad("router", "PlanRoute", plan(shot=shot(duration_seconds=1e300)), "shot.duration_seconds"),
        Bad("router", "PlanRoute", plan(shot=shot(aspect_ratio=99)), "shot.aspect_ratio"),
        Bad("router", "PlanRoute", plan(shot=shot(prompt=HUGE)), "shot.prompt"),
        Bad(
            "router",
            "PlanRoute",
            plan(shot=shot(), constraints=deadline(BEFORE_YEAR_1)),
            "constraints.deadline",
        ),
        Bad(
            "router", "PlanRoute", plan(shot=shot(), constraints=deadline(AFTER_9999)), "constraints.deadline"
        ),
        Bad(
            "router", "PlanRoute", plan(shot=shot(), constraints=deadline(BAD_NANOS)), "constraints.deadline"
        ),
        Bad(
            "router",
            "PlanRoute",
            plan(shot=shot(), constraints=render_pb2.RenderConstraints(quality_floor=math.nan)),
            "constraints.quality_floor",
        ),
        Bad(
            "router",
            "PlanRoute",
            plan(shot=shot(), constraints=render_pb2.RenderConstraints(preferred_backend=99)),
            "constraints.preferred_backend",
        ),
        Bad("router", "PlanRoute", plan(shot=shot(), tenant_id=HUGE), "tenant_id"),
        executed("shot.duration_seconds", shot=shot(duration_seconds=-math.inf)),
        executed("shot.aspect_ratio", shot=shot(aspect_ratio=99)),
        executed("constraints.deadline", constraints=deadline(BEFORE_YEAR_1)),
        executed("idempotency_key", idempotency_key=HUGE),
        executed("job_id", job_id=HUGE),
        executed(
            "guarantee.quality_minimum", guarantee=router_pb2.QualityGuarantee(quality_minimum=math.nan)
        ),
        Bad(
            "router",
            "ResumeRender",
            resume(handle=handle, shot=shot(duration_seconds=math.nan)),
            "shot.duration_seconds",
            streaming=True,
        ),
        Bad(
            "router",
            "ResumeRender",
            resume(
                handle=backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_LOCAL, task_id=HUGE), shot=shot()
            ),
            "handle.task_id",
            streaming=True,
        ),
        Bad(
            "router",
            "CancelRender",
            router_pb2.CancelRenderRequest(handle=backend_pb2.RenderHandle(backend=99, task_id="local_0")),
            "handle.backend",
        ),
        Bad(
            "router",
            "CancelRender",
            router_pb2.CancelRenderRequest(
                handle=backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_LOCAL, task_id=HUGE)
            ),
            "handle.task_id",
        ),
        Bad(
            "router",
            "ReconcileAttempt",
            router_pb2.ReconcileAttemptRequest(backend=backend_pb2.BACKEND_LOCAL, idempotency_key=HUGE),
            "idempotency_key",
        ),
        Bad(
            "router",
            "ReconcileAttempt",
            router_pb2.ReconcileAttemptRequest(backend=backend_pb2.BACKEND_LOCAL, task_id=HUGE),
            "task_id",
        ),
    ]


def renderer_cases(renderer: str) -> list[Bad]:
    start = renderer_pb2.StartRenderRequest

    def started(field: str, **fields: object) -> Bad:
        return Bad(
            renderer,
            "StartRender",
            start(**{"idempotency_key": "hostile-1", "shot": shot(), **fields}),
            field,
        )

    cases = [
        started("shot.duration_seconds", shot=shot(duration_seconds=math.nan)),
        started("shot.duration_seconds", shot=shot(duration_seconds=math.inf)),
        started("shot.aspect_ratio", shot=shot(aspect_ratio=99)),
        started("shot.prompt", shot=shot(prompt=HUGE)),
        started("idempotency_key", idempotency_key=HUGE),
        started("model", model=HUGE),
        Bad(renderer, "GetRender", renderer_pb2.GetRenderRequest(task_id=HUGE), "task_id"),
        Bad(renderer, "GetRender", renderer_pb2.GetRenderRequest(idempotency_key=HUGE), "idempotency_key"),
        Bad(
            renderer, "WatchRender", renderer_pb2.WatchRenderRequest(task_id=HUGE), "task_id", streaming=True
        ),
        Bad(renderer, "CancelRender", renderer_pb2.CancelRenderRequest(task_id=HUGE), "task_id"),
    ]
    if renderer == "renderer-runway":  # takes first frames
        both = render_pb2.Image(data=b"\x89PNG", uri="https://images.example.com/a.png")
        cases += [
            started("shot.first_frame", shot=shot(first_frame=both)),
            started(
                "shot.first_frame.mime_type",
                shot=shot(first_frame=render_pb2.Image(data=b"\x89PNG", mime_type=HUGE)),
            ),
            started("shot.reference_images[0]", shot=shot(reference_images=[render_pb2.Image()])),
        ]
    return cases


def metrics_cases() -> list[Bad]:
    def recorded(field: str, **fields: object) -> Bad:
        good = metrics_pb2.JobEventRecord(job_id="job-good", state=job_pb2.JOB_STATE_SUCCEEDED)
        bad = metrics_pb2.JobEventRecord(**{"job_id": "job-bad", "state": job_pb2.JOB_STATE_FAILED, **fields})
        return Bad("metrics", "RecordJobEvent", metrics_pb2.RecordJobEventRequest(events=[good, bad]), field)

    reserve = metrics_pb2.ReserveBudgetRequest
    usd = money_pb2.Money(currency_code="USD", amount_micros=1_000)
    return [
        recorded("events[1].time", time=BEFORE_YEAR_1),
        recorded("events[1].time", time=AFTER_9999),
        recorded("events[1].time", time=BAD_NANOS),
        recorded("events[1].job_duration", job_duration=duration_pb2.Duration(seconds=10**12)),
        recorded("events[1].job_duration", job_duration=duration_pb2.Duration(seconds=1, nanos=-1)),
        recorded("events[1].qc_score", qc_score=math.nan),
        recorded("events[1].qc_score", qc_score=math.inf),
        recorded("events[1].state", state=99),
        recorded("events[1].backend", backend=99),
        recorded("events[1].job_id", job_id=HUGE),
        recorded("events[1].preset", preset=HUGE),
        recorded("events[1].cost.amount_micros", cost=money_pb2.Money(currency_code="USD", amount_micros=-1)),
        Bad("metrics", "ReserveBudget", reserve(reservation_key=HUGE, amount=usd), "reservation_key"),
        Bad("metrics", "ReserveBudget", reserve(reservation_key="r-1", amount=usd, backend=99), "backend"),
        Bad("metrics", "ReserveBudget", reserve(reservation_key="r-1", amount=usd, job_id=HUGE), "job_id"),
        Bad(
            "metrics",
            "ReserveBudget",
            reserve(reservation_key="r-1", amount=money_pb2.Money(currency_code=HUGE, amount_micros=1)),
            "amount.currency_code",
        ),
        Bad(
            "metrics",
            "CommitSpend",
            metrics_pb2.CommitSpendRequest(reservation_key=HUGE, actual=usd),
            "reservation_key",
        ),
        Bad(
            "metrics",
            "ReleaseBudget",
            metrics_pb2.ReleaseBudgetRequest(reservation_key=HUGE),
            "reservation_key",
        ),
        Bad(
            "metrics",
            "GetSpend",
            metrics_pb2.GetSpendRequest(first_day=HUGE, last_day="2025-01-01"),
            "first_day",
        ),
        Bad("metrics", "SetTenantBudget", metrics_pb2.SetTenantBudgetRequest(tenant_id=HUGE), "tenant_id"),
    ]


CASES = [
    *router_cases(),
    *renderer_cases("renderer-local"),
    *renderer_cases("renderer-runway"),
    *metrics_cases(),
]
STUBS: dict[str, Callable[[grpc.Channel], object]] = {
    "router": router_pb2_grpc.RouterServiceStub,
    "renderer-local": renderer_pb2_grpc.RendererServiceStub,
    "renderer-runway": renderer_pb2_grpc.RendererServiceStub,
    "metrics": metrics_pb2_grpc.MetricsServiceStub,
}


def refusal(mesh: Mesh, bad: Bad) -> grpc.RpcError:
    with grpc.insecure_channel(mesh.address(bad.service)) as channel:
        call = getattr(STUBS[bad.service](channel), bad.method)
        with pytest.raises(grpc.RpcError) as raised:
            answer = call(bad.request, timeout=10)
            if bad.streaming:
                list(answer)
    return raised.value


def serving(mesh: Mesh, service: str) -> bool:
    with grpc.insecure_channel(mesh.address(service)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_NAMES[service]), timeout=10)
    return check.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("bad", CASES, ids=str)
def test_hostile_input_is_invalid_argument_naming_its_field(mesh, bad):
    error = refusal(mesh, bad)
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), details[:300])
    assert bad.field in field_violations(error), details[:300]
    # The caller's text is quoted by a short prefix at most, so the status always fits the trailers.
    assert len(details) <= MAX_DETAILS
    assert sum(len(key) + len(value) for key, value in error.trailing_metadata()) < METADATA_LIMIT
    assert serving(mesh, bad.service)


def test_a_long_unknown_task_id_is_not_found_quoted_by_a_prefix(mesh):
    handle = backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_LOCAL, task_id=LONG_TASK_ID)
    for bad in (
        Bad("renderer-local", "GetRender", renderer_pb2.GetRenderRequest(task_id=LONG_TASK_ID), "task_id"),
        Bad("router", "CancelRender", router_pb2.CancelRenderRequest(handle=handle), "handle.task_id"),
    ):
        error = refusal(mesh, bad)
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), details[:300])
        assert repr(LONG_TASK_ID[:64]) + "..." in details


def test_refused_input_changes_nothing(mesh):
    # A batch with one bad event records none of it.
    with grpc.insecure_channel(mesh.address("metrics")) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        assert stub.GetJobStats(metrics_pb2.GetJobStatsRequest(), timeout=10).stats == []
        assert (
            stub.GetBudget(metrics_pb2.GetBudgetRequest(), timeout=10).global_budget.reserved.amount_micros
            == 0
        )
    # No render was started under the key every refused StartRender named.
    for renderer in ("renderer-local", "renderer-runway"):
        with grpc.insecure_channel(mesh.address(renderer)) as channel:
            stub = renderer_pb2_grpc.RendererServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetRender(renderer_pb2.GetRenderRequest(idempotency_key="hostile-1"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND, renderer


def test_every_service_still_serves_a_good_request(mesh):
    with grpc.insecure_channel(mesh.address("router")) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        candidates = router.PlanRoute(router_pb2.PlanRouteRequest(shot=shot()), timeout=10).candidates
    assert {candidate.backend for candidate in candidates} >= {backend_pb2.BACKEND_LOCAL}
    with grpc.insecure_channel(mesh.address("metrics")) as channel:
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        assert metrics.GetBudget(metrics_pb2.GetBudgetRequest(), timeout=10).HasField("budget")
    for service in HEALTH_NAMES:
        assert serving(mesh, service)


def test_resuming_renders_the_renderer_never_had_leaves_its_breaker_closed(mesh):
    """A caller resuming made-up tasks hears each render lost, and the backend stays in service: the
    router's breaker counts the backend's failures, not a caller's mistakes."""
    with grpc.insecure_channel(mesh.address("router")) as channel:
        router = router_pb2_grpc.RouterServiceStub(channel)
        for index in range(5):  # above the breaker's threshold of failures (3)
            handle = backend_pb2.RenderHandle(
                backend=backend_pb2.BACKEND_LOCAL,
                task_id=f"local_made_up_{index}",
                idempotency_key=f"made-up-{index}:1",
            )
            request = router_pb2.ResumeRenderRequest(
                job_id=f"made-up-{index}", handle=handle, shot=shot(), attempt=1
            )
            charges = [
                response.event.charged
                for response in router.ResumeRender(request, timeout=60)
                if response.event.HasField("charged")
            ]
            # The made-up task is lost, its attempt charged nothing (the router may then fall back).
            assert charges[0].failure.reason == Reason.RENDER_LOST, charges
            assert charges[0].outcome == event_pb2.CHARGE_OUTCOME_RELEASE
        backends = router.ListBackends(router_pb2.ListBackendsRequest(), timeout=10).backends
    (local,) = (backend for backend in backends if backend.backend == backend_pb2.BACKEND_LOCAL)
    assert local.breaker == router_pb2.BREAKER_STATE_CLOSED
