"""Property-based tests of every RPC of every service of the mesh (hypothesis): 1,000 generated requests
each, built from the request's message descriptor (tests/helpers/fuzz.py), mixed with mutations of a valid
request where one is easy to write; then raw garbage bytes and an oversized message to every method of
every port.

Every answer is a proper status: OK or a caller's mistake (INVALID_ARGUMENT, NOT_FOUND, ...), never
UNKNOWN or INTERNAL; every service stays SERVING; and what a refused request would have written is read
back unchanged (see the `*_writes` checks below for which RPCs are read back, and how).

The mesh is the plain local one (gateway, router, metrics, local renderer) as processes on loopback,
started once for the module. Its dispatcher drives no job (AIPROD_DISPATCH_MAX_IN_FLIGHT=0: jobs created
here stay queued, and nothing renders for them), and the local renderer encodes a frame every hundred
seconds, so that the renders a valid StartRender or ExecuteRender starts cost next to nothing.

A body that is no protobuf message of the method's type gets INVALID_ARGUMENT ("the request is not a
valid <type> message"): grpc.aio's own answer, before the error interceptor wrapped each method's
deserializer, was UNKNOWN ("Unexpected <class 'google.protobuf.message.DecodeError'>: ..."). A body over
the servers' receive limit is gRPC's RESOURCE_EXHAUSTED, sent before any code of ours runs.
"""

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from helpers.fuzz import requests, short, varint
from hypothesis import HealthCheck, given, settings

from aiprod.common.v1 import backend_pb2, job_pb2, money_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.metrics.v1 import metrics_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.apikeys import bearer_metadata
from aiprod_kit.channels import MAX_MESSAGE_BYTES, MESSAGE_SIZE_OPTIONS
from aiprod_kit.mesh import DEVELOPMENT_TENANT, Mesh

EXAMPLES = 1000
# Calls in flight at once, over a pool of threads (the generation itself is one thread, hypothesis's);
# more for streams, which mostly wait out their time.
IN_FLIGHT = 16
STREAMS_IN_FLIGHT = 64
UNARY_SECONDS = 30.0
# A stream is read for this long, or until this many responses, then cancelled.
STREAM_SECONDS = 2.0
STREAM_RESPONSES = 5
# The answers a caller's mistake may get; a stream read for a bounded time may also run out of it.
PROPER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
STREAM_PROPER = PROPER | {grpc.StatusCode.DEADLINE_EXCEEDED}
# Besides, by design: ReconcileAttempt of a task id its renderer does not know is UNAVAILABLE ("the local
# renderer cannot say (NOT_FOUND)"), as for a task a provider no longer knows; the reconciler asks again.
ALSO_PROPER = {"RouterService.ReconcileAttempt": {grpc.StatusCode.UNAVAILABLE}}

# Every service each process serves, besides health and reflection (test_reflection_lists_them_all
# holds this list to what the ports themselves list).
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
ROUTER = router_pb2.DESCRIPTOR.services_by_name["RouterService"]
METRICS = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"]
RENDERER = renderer_pb2.DESCRIPTOR.services_by_name["RendererService"]
PROCESSES: dict[str, list[descriptor.ServiceDescriptor]] = {
    "metrics": [METRICS],
    "renderer-local": [RENDERER],
    "router": [ROUTER],
    "gateway": [GATEWAY, ADMIN],
}
HEALTH_NAMES = {process: [s.full_name for s in services] for process, services in PROCESSES.items()}


@dataclass(frozen=True)
class Rpc:
    process: str
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    def __str__(self) -> str:
        return f"{self.process}:{self.method.containing_service.name}.{self.method.name}"


# The gateway's own RPCs first: fuzzing the router (renders of made-up handles, streams cut short) left
# the local backend's breaker open, and every valid job after it was FAILED_PRECONDITION ("breaker open
# after recent failures"), so CreateRenderJob never got past the router. Admin RPCs last, DisableTenant and RevokeApiKey at the very
# end: whatever they change, nothing fuzzed after them depends on.
ORDER = [GATEWAY, METRICS, RENDERER, ROUTER, ADMIN]
RPCS = [
    Rpc(process, method) for process, services in PROCESSES.items() for s in services for method in s.methods
]
RPCS.sort(
    key=lambda rpc: (
        rpc.method.name in ("DisableTenant", "RevokeApiKey"),
        ORDER.index(rpc.method.containing_service),
    )
)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: bytes | None = None


@dataclass
class Fuzzing:
    """The mesh, a channel to each process, and what the fixture made for the valid requests."""

    mesh: Mesh
    channels: dict[str, grpc.Channel]
    job_id: str  # a job of the development tenant awaiting approval
    approve_job_id: str  # another, to approve
    cancel_job_id: str  # and another, to cancel
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(STREAMS_IN_FLIGHT))

    def metadata(self, rpc: Rpc) -> tuple[tuple[str, str], ...]:
        service = rpc.method.containing_service
        if service is GATEWAY:
            return bearer_metadata(self.mesh.api_key)
        if service is ADMIN:
            return bearer_metadata(self.mesh.admin_key)
        return ()

    def call(self, rpc: Rpc, request: message.Message | bytes) -> Outcome:
        """One call; the request a message (serialized by the channel) or raw bytes as they are."""
        serialize = bytes if isinstance(request, bytes) else type(request).SerializeToString
        channel = self.channels[rpc.process]
        metadata = self.metadata(rpc)
        try:
            if rpc.streaming:
                if rpc.method.client_streaming:  # the one request, then the caller's side closed
                    call = channel.stream_stream(rpc.path, request_serializer=serialize)
                    stream = call(iter([request]), timeout=STREAM_SECONDS, metadata=metadata)
                else:
                    call = channel.unary_stream(rpc.path, request_serializer=serialize)
                    stream = call(request, timeout=STREAM_SECONDS, metadata=metadata)
                for count, _ in enumerate(stream, 1):
                    if count >= STREAM_RESPONSES:
                        stream.cancel()
                        break
                return Outcome(grpc.StatusCode.OK, "")
            response = channel.unary_unary(rpc.path, request_serializer=serialize)(
                request, timeout=UNARY_SECONDS, metadata=metadata
            )
            return Outcome(grpc.StatusCode.OK, "", response)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and rpc.streaming:
                return Outcome(grpc.StatusCode.OK, "")  # ours, after enough responses
            return Outcome(error.code(), error.details() or "")


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:
    mesh = Mesh(
        tmp_path_factory.mktemp("fuzz"),
        free_ports=True,
        environment={"AIPROD_DISPATCH_MAX_IN_FLIGHT": "0", "AIPROD_LOCAL_RENDER_PACE_FPS": "0.01"},
    )
    mesh.start()
    channels = {
        process: grpc.insecure_channel(mesh.address(process), options=MESSAGE_SIZE_OPTIONS)
        for process in PROCESSES
    }
    running = Fuzzing(mesh, channels, job_id="", approve_job_id="", cancel_job_id="")
    try:
        running.job_id, running.approve_job_id, running.cancel_job_id = (
            _call_ok(
                running,
                "gateway",
                GATEWAY,
                "CreateRenderJob",
                gateway_pb2.CreateRenderJobRequest(request_id=f"fuzz-{n}", spec=SPEC),
            ).job.job_id
            for n in ("base", "approve", "cancel")
        )
        yield running
    finally:
        running.pool.shutdown(cancel_futures=True)
        for channel in channels.values():
            channel.close()
        mesh.stop()


# Valid requests to mutate ------------------------------------------------------------------------------

# brand_campaign waits for approval: a job is stored, nothing renders or spends.
SPEC = render_pb2.RenderSpec(
    prompt="A paper boat on a pond", preset="brand_campaign", duration_seconds=4, aspect_ratio=1
)
SHOT = render_pb2.Shot(prompt="A paper boat on a pond", duration_seconds=1)
USD = money_pb2.Money(currency_code="USD", amount_micros=1_000)
HANDLE = backend_pb2.RenderHandle(backend=backend_pb2.BACKEND_LOCAL, task_id="local_0", idempotency_key="k:1")


def valid_requests(rpc: Rpc, fuzzing: Fuzzing) -> list[message.Message]:
    """The valid requests whose mutations an RPC is fuzzed with besides generated ones (none: only
    generated ones)."""
    name, job_id = rpc.method.name, fuzzing.job_id
    if rpc.method.containing_service is GATEWAY:
        return {
            "CreateRenderJob": [gateway_pb2.CreateRenderJobRequest(request_id="fuzz-1", spec=SPEC)],
            "QuoteRender": [gateway_pb2.QuoteRenderRequest(spec=SPEC)],
            "GetRenderJob": [gateway_pb2.GetRenderJobRequest(job_id=job_id)],
            "WatchRenderJob": [gateway_pb2.WatchRenderJobRequest(job_id=job_id)],
            "ListRenderRevisions": [gateway_pb2.ListRenderRevisionsRequest(job_id=job_id)],
            "ListRenderJobs": [gateway_pb2.ListRenderJobsRequest(page_size=2)],
            "ApproveRenderJob": [
                gateway_pb2.ApproveRenderJobRequest(job_id=fuzzing.approve_job_id, plan_version=1)
            ],
            "CancelRenderJob": [gateway_pb2.CancelRenderJobRequest(job_id=fuzzing.cancel_job_id)],
            "UpdateRenderManifest": [
                gateway_pb2.UpdateRenderManifestRequest(
                    job_id=job_id, plan=render_pb2.RenderPlan(shots=[SHOT]), plan_version=1
                )
            ],
        }.get(name, [])
    if rpc.method.containing_service is ADMIN:
        return {
            "CreateTenant": [admin_pb2.CreateTenantRequest(tenant_id="fuzz-tenant", tier=1)],
            "CreateApiKey": [admin_pb2.CreateApiKeyRequest(tenant_id=DEVELOPMENT_TENANT, name="fuzz")],
        }.get(name, [])
    if rpc.method.containing_service is ROUTER:
        return {
            "PlanRoute": [router_pb2.PlanRouteRequest(shot=SHOT)],
            "ExecuteRender": [router_pb2.ExecuteRenderRequest(shot=SHOT, idempotency_key="fuzz-1")],
            "ResumeRender": [router_pb2.ResumeRenderRequest(handle=HANDLE, shot=SHOT)],
            "CancelRender": [router_pb2.CancelRenderRequest(handle=HANDLE)],
            "ReconcileAttempt": [
                router_pb2.ReconcileAttemptRequest(backend=backend_pb2.BACKEND_LOCAL, idempotency_key="k:1")
            ],
        }.get(name, [])
    if rpc.method.containing_service is METRICS:
        event = metrics_pb2.JobEventRecord(job_id="fuzz-job", state=job_pb2.JOB_STATE_SUCCEEDED, cost=USD)
        return {
            "RecordJobEvent": [metrics_pb2.RecordJobEventRequest(events=[event])],
            "ReserveBudget": [
                metrics_pb2.ReserveBudgetRequest(reservation_key="fuzz-r", tenant_id="fuzz", amount=USD)
            ],
            "CommitSpend": [metrics_pb2.CommitSpendRequest(reservation_key="fuzz-r", actual=USD)],
            "ReleaseBudget": [metrics_pb2.ReleaseBudgetRequest(reservation_key="fuzz-r")],
            "SetTenantBudget": [metrics_pb2.SetTenantBudgetRequest(tenant_id="fuzz", daily_cap=USD)],
            "GetSpend": [metrics_pb2.GetSpendRequest(first_day="2026-01-01", last_day="2026-01-31")],
            "GetBudget": [metrics_pb2.GetBudgetRequest(tenant_id="fuzz")],
        }.get(name, [])
    return {
        "StartRender": [renderer_pb2.StartRenderRequest(idempotency_key="fuzz-1", shot=SHOT)],
        "GetRender": [renderer_pb2.GetRenderRequest(idempotency_key="fuzz-1")],
        "WatchRender": [renderer_pb2.WatchRenderRequest(task_id="local_0")],
        "CancelRender": [renderer_pb2.CancelRenderRequest(task_id="local_0")],
    }.get(name, [])


# Read-backs: what each write RPC may change, read before and after it is fuzzed -------------------------


def _call_ok(fuzzing: Fuzzing, process: str, service: descriptor.ServiceDescriptor, name: str, request):
    rpc = Rpc(process, service.methods_by_name[name])
    outcome = fuzzing.call(rpc, request)
    assert outcome.code == grpc.StatusCode.OK, (str(rpc), outcome)
    return GetMessageClass(rpc.method.output_type).FromString(outcome.response)


def jobs(fuzzing: Fuzzing) -> dict[str, tuple]:
    """The development tenant's jobs: id -> (state, last event, plan version)."""
    found, token = {}, ""
    while True:
        page = _call_ok(
            fuzzing,
            "gateway",
            GATEWAY,
            "ListRenderJobs",
            gateway_pb2.ListRenderJobsRequest(page_size=100, page_token=token),
        )
        found.update({j.job_id: (j.state, j.last_sequence, j.plan_version) for j in page.jobs})
        token = page.next_page_token
        if not token:
            return found


def tenants(fuzzing: Fuzzing) -> dict[str, bytes]:
    listed = _call_ok(fuzzing, "gateway", ADMIN, "ListTenants", admin_pb2.ListTenantsRequest())
    return {tenant.tenant_id: tenant.SerializeToString(deterministic=True) for tenant in listed.tenants}


def api_keys(fuzzing: Fuzzing) -> dict[str, bytes]:
    listed = _call_ok(fuzzing, "gateway", ADMIN, "ListApiKeys", admin_pb2.ListApiKeysRequest())
    return {key.key_id: key.SerializeToString(deterministic=True) for key in listed.keys}


def ledger(fuzzing: Fuzzing) -> tuple[int, int, int]:
    """The global budget's (spent, reserved, uncertain) and the job stats' total count."""
    budget = _call_ok(fuzzing, "metrics", METRICS, "GetBudget", metrics_pb2.GetBudgetRequest()).global_budget
    stats = _call_ok(fuzzing, "metrics", METRICS, "GetJobStats", metrics_pb2.GetJobStatsRequest()).stats
    return budget.spent.amount_micros, budget.reserved.amount_micros, sum(stat.count for stat in stats)


@dataclass
class Calls:
    """The requests of one RPC's fuzzing and their outcomes."""

    rpc: Rpc
    done: list[tuple[message.Message, Outcome]] = field(default_factory=list)

    def accepted(self) -> list[tuple[message.Message, Outcome]]:
        return [(request, outcome) for request, outcome in self.done if outcome.code == grpc.StatusCode.OK]

    def refused(self) -> list[message.Message]:
        return [request for request, outcome in self.done if outcome.code != grpc.StatusCode.OK]


def changed(before: dict, after: dict) -> set:
    return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


def job_writes(fuzzing: Fuzzing, calls: Calls, before: dict) -> list[str]:
    """The jobs that changed are the ones accepted requests created or named; no other."""
    allowed = set()
    for request, outcome in calls.accepted():
        if calls.rpc.method.name == "CreateRenderJob":
            allowed.add(gateway_pb2.CreateRenderJobResponse.FromString(outcome.response).job.job_id)
        else:
            allowed.add(request.job_id)
    return [
        f"job {job_id} changed, no accepted request named it"
        for job_id in changed(before, jobs(fuzzing)) - allowed
    ]


def tenant_writes(fuzzing: Fuzzing, calls: Calls, before: dict) -> list[str]:
    allowed = {request.tenant_id for request, _ in calls.accepted()}
    return [
        f"tenant {t!r} changed, no accepted request named it"
        for t in changed(before, tenants(fuzzing)) - allowed
    ]


def key_writes(fuzzing: Fuzzing, calls: Calls, before: dict) -> list[str]:
    allowed = set()
    for _, outcome in calls.accepted():
        response = GetMessageClass(calls.rpc.method.output_type).FromString(outcome.response)
        allowed.add(response.key.key_id)
    return [
        f"API key {k!r} changed, no accepted request made it"
        for k in changed(before, api_keys(fuzzing)) - allowed
    ]


def ledger_writes(fuzzing: Fuzzing, calls: Calls, before: tuple[int, int, int]) -> list[str]:
    """Nothing accepted: the ledger and the job stats as they were. ReserveBudget: reserved grew by the
    new reservations accepted, exactly. RecordJobEvent: the stats counted at most the accepted events."""
    spent, reserved, counted = ledger(fuzzing)
    name, accepted = calls.rpc.method.name, calls.accepted()
    if not accepted and (spent, reserved, counted) != before:
        return [f"nothing accepted, yet the ledger moved from {before} to {(spent, reserved, counted)}"]
    if name == "ReserveBudget":
        new = [metrics_pb2.ReserveBudgetResponse.FromString(o.response) for _, o in accepted]
        grown = sum(r.reservation.amount.amount_micros for r in new if not r.existing)
        if (spent, reserved - grown, counted) != before:
            return [f"reserved grew by {reserved - before[1]}, the accepted reservations by {grown}"]
    if name == "RecordJobEvent":
        events = sum(len(request.events) for request, _ in accepted)
        if (spent, reserved) != before[:2] or not before[2] <= counted <= before[2] + events:
            return [
                f"{events} events accepted, the ledger moved from {before} to {(spent, reserved, counted)}"
            ]
    return []


def tenant_budget_writes(fuzzing: Fuzzing, calls: Calls, before: None) -> list[str]:
    """The tenants of refused SetTenantBudget calls (ids short enough to read back) keep the default
    cap, unless an accepted call set theirs."""
    default = _call_ok(
        fuzzing, "metrics", METRICS, "GetBudget", metrics_pb2.GetBudgetRequest(tenant_id="fuzz-never-set")
    ).budget.cap
    accepted = {request.tenant_id for request, _ in calls.accepted()}
    wrong = []
    for tenant_id in {request.tenant_id for request in calls.refused()} - accepted:
        outcome = fuzzing.call(
            Rpc("metrics", METRICS.methods_by_name["GetBudget"]),
            metrics_pb2.GetBudgetRequest(tenant_id=tenant_id),
        )
        if outcome.code != grpc.StatusCode.OK:
            continue  # an id no budget can have
        cap = metrics_pb2.GetBudgetResponse.FromString(outcome.response).budget.cap
        if cap != default:
            wrong.append(f"tenant {tenant_id[:40]!r}: refused, yet its cap is {cap.amount_micros}")
    return wrong


def render_writes(fuzzing: Fuzzing, calls: Calls, before: None) -> list[str]:
    """No render under the idempotency key of a refused StartRender (unless an accepted one used it)."""
    accepted = {request.idempotency_key for request, _ in calls.accepted()}
    wrong = []
    for key in {request.idempotency_key for request in calls.refused()} - accepted:
        if not key:
            continue
        outcome = fuzzing.call(
            calls.rpc.__class__(calls.rpc.process, RENDERER.methods_by_name["GetRender"]),
            renderer_pb2.GetRenderRequest(idempotency_key=key),
        )
        if outcome.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            wrong.append(f"StartRender {key[:40]!r} refused, yet GetRender answers {outcome.code.name}")
    return wrong


# What each write RPC is read back with: (read before, check after).
WRITES: dict[str, tuple[Callable[[Fuzzing], object], Callable[[Fuzzing, Calls, object], list[str]]]] = {
    "GatewayService.CreateRenderJob": (jobs, job_writes),
    "GatewayService.CancelRenderJob": (jobs, job_writes),
    "GatewayService.ApproveRenderJob": (jobs, job_writes),
    "GatewayService.UpdateRenderManifest": (jobs, job_writes),
    "AdminService.CreateTenant": (tenants, tenant_writes),
    "AdminService.DisableTenant": (tenants, tenant_writes),
    "AdminService.CreateApiKey": (api_keys, key_writes),
    "AdminService.RevokeApiKey": (api_keys, key_writes),
    "MetricsService.ReserveBudget": (ledger, ledger_writes),
    "MetricsService.CommitSpend": (ledger, ledger_writes),
    "MetricsService.ReleaseBudget": (ledger, ledger_writes),
    "MetricsService.RecordJobEvent": (ledger, ledger_writes),
    "MetricsService.SetTenantBudget": (lambda _: None, tenant_budget_writes),
    "RendererService.StartRender": (lambda _: None, render_writes),
}


# The tests ------------------------------------------------------------------------------------------------


def test_reflection_lists_them_all(fuzzing):
    """Every service a port serves (besides health and reflection) is one fuzzed here."""
    for process, services in PROCESSES.items():
        listed = set(ProtoReflectionDescriptorDatabase(fuzzing.channels[process]).get_services())
        listed -= {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
        assert listed == {service.full_name for service in services}, process


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_generated_requests_get_proper_answers(fuzzing, rpc):
    key = f"{rpc.method.containing_service.name}.{rpc.method.name}"
    read, check = WRITES.get(key, (lambda _: None, lambda *_: []))
    before = read(fuzzing)
    calls = Calls(rpc)
    slots = threading.BoundedSemaphore(STREAMS_IN_FLIGHT if rpc.streaming else IN_FLIGHT)
    futures: list[tuple[message.Message, Future[Outcome]]] = []

    def finished(_: Future[Outcome]) -> None:
        slots.release()

    request_type = descriptor_pool.Default().FindMessageTypeByName(rpc.method.input_type.full_name)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(request_type, valid_requests(rpc, fuzzing)))
    def fire(request: message.Message) -> None:
        slots.acquire()
        future = fuzzing.pool.submit(fuzzing.call, rpc, request)
        future.add_done_callback(finished)
        futures.append((request, future))

    started = time.monotonic()
    fire()
    calls.done = [(request, future.result()) for request, future in futures]
    elapsed = time.monotonic() - started

    allowed = (STREAM_PROPER if rpc.streaming else PROPER) | ALSO_PROPER.get(key, set())
    wrong = [
        f"{outcome.code.name}: {outcome.details[:200]!r} for {short(request)}"
        for request, outcome in calls.done
        if outcome.code not in allowed
    ]
    wrong += check(fuzzing, calls, before)
    codes = Counter(outcome.code.name for _, outcome in calls.done)
    print(f"\n{rpc}: {len(calls.done)} requests in {elapsed:.1f} s, answers {dict(codes)}")
    for code in codes:
        print(f"  {code}: {next(o.details for _, o in calls.done if o.code.name == code)[:150]!r}")
    assert len(calls.done) >= EXAMPLES
    assert not wrong, f"{rpc}: {len(wrong)} wrong answers or writes:\n" + "\n".join(wrong[:50])
    assert serving(fuzzing, rpc.process)


def serving(fuzzing: Fuzzing, process: str) -> bool:
    health = health_pb2_grpc.HealthStub(fuzzing.channels[process])
    return all(
        health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status
        == health_pb2.HealthCheckResponse.SERVING
        for name in ["", *HEALTH_NAMES[process]]
    )


# Raw bytes, seeded so that a run is reproducible: bodies protobuf cannot parse as any message (a field
# of wire type 7, which does not exist; a length past the end), and random bytes, which may well parse
# as something.
GARBAGE = [
    b"\x0f",
    b"\xff" * 16,
    b"\x0a\xff\xff\xff\xff\x0f",
    *(random.Random(n).randbytes(64) for n in range(8)),
]


def test_raw_garbage_bytes_get_proper_answers(fuzzing):
    wrong = []
    for rpc in RPCS:
        key = f"{rpc.method.containing_service.name}.{rpc.method.name}"
        allowed = (STREAM_PROPER if rpc.streaming else PROPER) | ALSO_PROPER.get(key, set())
        for body in GARBAGE:
            outcome = fuzzing.call(rpc, body)
            if outcome.code not in allowed:
                wrong.append(f"{rpc}: {outcome.code.name} {outcome.details[:200]!r} for {body[:16]!r}")
    assert not wrong, "\n".join(wrong)
    for process in PROCESSES:
        assert serving(fuzzing, process), process


def test_an_unparsable_body_is_invalid_argument_naming_the_request_type(fuzzing):
    """grpc.aio's own answer would be UNKNOWN; the error interceptor makes it the caller's mistake."""
    for rpc in RPCS:
        outcome = fuzzing.call(rpc, b"\x0f")
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (str(rpc), outcome)
        assert f"not a valid {rpc.method.input_type.full_name} message" in outcome.details, str(rpc)
    # The standard health service too, on every port.
    for process in PROCESSES:
        check = fuzzing.channels[process].unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.RpcError) as raised:
            check(b"\x0f", timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, process


def test_an_oversized_message_is_resource_exhausted(fuzzing):
    """A body over the servers' receive limit (MAX_MESSAGE_BYTES) is refused by gRPC itself."""
    body = b"\x0a" + varint(MAX_MESSAGE_BYTES) + b"x" * MAX_MESSAGE_BYTES  # field 1 as bytes/string
    for rpc in RPCS:
        outcome = fuzzing.call(rpc, body)
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (str(rpc), outcome.code, outcome.details)
    for process in PROCESSES:
        assert serving(fuzzing, process), process


def test_every_service_still_serves_a_good_request(fuzzing):
    listed = _call_ok(fuzzing, "gateway", GATEWAY, "ListPresets", gateway_pb2.ListPresetsRequest())
    assert {preset.name for preset in listed.presets} >= {"brand_campaign"}
    _call_ok(
        fuzzing, "gateway", GATEWAY, "GetRenderJob", gateway_pb2.GetRenderJobRequest(job_id=fuzzing.job_id)
    )
    _call_ok(fuzzing, "router", ROUTER, "ListBackends", router_pb2.ListBackendsRequest())
    _call_ok(fuzzing, "metrics", METRICS, "GetBudget", metrics_pb2.GetBudgetRequest())
    _call_ok(fuzzing, "renderer-local", RENDERER, "GetCapabilities", renderer_pb2.GetCapabilitiesRequest())
    for process in PROCESSES:
        assert serving(fuzzing, process), process
