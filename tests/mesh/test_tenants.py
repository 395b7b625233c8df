"""Tenants and API keys, against a real mesh with the provider sandbox: every public call needs a key,
and a tenant sees, cancels, approves, edits and spends only on what is its own."""

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2
from helpers.mesh import budget, error_info, eventually, gateway, wait_terminal
from helpers.sandbox import sandbox_mesh

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod_kit.mesh import Mesh

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # These tests refuse wrong keys by the dozen from one address: their subject is the answer, not the
    # slow-down of repeated failures (tests/mesh/test_auth_slowdown.py), which is lifted here.
    with sandbox_mesh(
        tmp_path_factory.mktemp("tenants"), {"AIPROD_GATEWAY_AUTH_FAILURES_FREE": "100000"}
    ) as running:
        yield running


@pytest.fixture(scope="module")
def other_key(mesh: Mesh) -> str:
    """The key of a second tenant, beside the development one."""
    return mesh.create_api_key("acme", admin_pb2.SLA_TIER_GOLD, "acme's key")


def spec(prompt: str, preset: str = "", backend: int = backend_pb2.BACKEND_LOCAL) -> render_pb2.RenderSpec:
    return render_pb2.RenderSpec(
        prompt=prompt,
        preset=preset,
        duration_seconds=2,
        constraints=render_pb2.RenderConstraints(preferred_backend=backend),
    )


def refused(call, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)  # a stream answers its status once read
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def raw_call(mesh: Mesh, method, metadata=()) -> grpc.RpcError:
    """Calls one method with an empty request and the given metadata; returns the error it must raise."""
    channel = grpc.insecure_channel(mesh.address("gateway"))
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = lambda message: message.SerializeToString()  # noqa: E731
    request = method.input_type._concrete_class()
    response_class = method.output_type._concrete_class
    if method.server_streaming:
        call = channel.unary_stream(path, serialize, response_class.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            list(call(request, metadata=metadata, timeout=10))
    else:
        call = channel.unary_unary(path, serialize, response_class.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(request, metadata=metadata, timeout=10)
    return caught.value


@pytest.mark.parametrize("method", list(GATEWAY_SERVICE.methods), ids=lambda method: method.name)
def test_every_gateway_call_needs_a_valid_key(mesh: Mesh, method) -> None:
    for metadata in (
        (),
        (("authorization", "Bearer "),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer aiprod_000000000000_" + "A" * 32),),
        (("authorization", f"Bearer {mesh.api_key}x"),),
    ):
        error = raw_call(mesh, method, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, error.details())
        assert error_info(error).reason == "UNAUTHENTICATED"
        assert "A" * 32 not in error.details() and mesh.api_key not in error.details()


@pytest.mark.parametrize("method", list(ADMIN_SERVICE.methods), ids=lambda method: method.name)
def test_every_admin_call_needs_the_admin_key(mesh: Mesh, method) -> None:
    for metadata in ((), (("authorization", f"Bearer {mesh.api_key}"),)):
        error = raw_call(mesh, method, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, error.details())


def test_health_and_reflection_need_no_key(mesh: Mesh) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE.full_name)
        assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_another_tenants_jobs_are_not_found_on_every_call(mesh: Mesh, other_key: str) -> None:
    mine = gateway(mesh)
    theirs = gateway(mesh, key=other_key)
    queued = mine.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(request_id="shared-id", spec=spec("Mine, rendering")), timeout=30
    ).job
    waiting = mine.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(
            spec=spec("Mine, in review", "brand_campaign", backend_pb2.BACKEND_RUNWAY)
        ),
        timeout=30,
    ).job
    assert waiting.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert queued.tenant_id == waiting.tenant_id == "dev"

    unknown = "job_" + "0" * 32
    for job_id in (queued.job_id, waiting.job_id, unknown):
        assert_not_found_for(theirs, job_id)

    # Nothing the other tenant tried changed the jobs.
    still = mine.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=waiting.job_id), timeout=10).job
    assert still.state == job_pb2.JOB_STATE_AWAITING_APPROVAL and still.plan_version == 1
    assert still.plan == waiting.plan
    assert wait_terminal(mine, queued.job_id).state == job_pb2.JOB_STATE_SUCCEEDED

    # Lists and usage are the caller's own.
    listed = theirs.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10).jobs
    assert {job.job_id for job in listed}.isdisjoint({queued.job_id, waiting.job_id})
    assert {job.tenant_id for job in listed} <= {"acme"}
    usage = theirs.GetUsage(gateway_pb2.GetUsageRequest(), timeout=10)
    assert usage.tenant_id == "acme"
    assert sum(count.count for count in usage.jobs) == len(listed)

    # A request id is the tenant's own: the same one under another tenant is another job.
    own = theirs.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(request_id="shared-id", spec=spec("Theirs, same request id")),
        timeout=30,
    ).job
    assert own.job_id != queued.job_id and own.tenant_id == "acme"
    mine.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=waiting.job_id), timeout=10)


def assert_not_found_for(stub, job_id: str) -> None:
    """Every call naming the job answers NOT_FOUND, exactly as for a job that does not exist."""
    calls = {
        "GetRenderJob": lambda: stub.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job_id), timeout=10),
        "CancelRenderJob": lambda: stub.CancelRenderJob(
            gateway_pb2.CancelRenderJobRequest(job_id=job_id), timeout=10
        ),
        "WatchRenderJob": lambda: stub.WatchRenderJob(
            gateway_pb2.WatchRenderJobRequest(job_id=job_id), timeout=10
        ),
        "ApproveRenderJob": lambda: stub.ApproveRenderJob(
            gateway_pb2.ApproveRenderJobRequest(job_id=job_id, plan_version=1), timeout=10
        ),
        "UpdateRenderManifest": lambda: stub.UpdateRenderManifest(
            gateway_pb2.UpdateRenderManifestRequest(
                job_id=job_id,
                plan_version=1,
                plan=render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="Theirs now", duration_seconds=2)]),
            ),
            timeout=10,
        ),
        "ListRenderRevisions": lambda: stub.ListRenderRevisions(
            gateway_pb2.ListRenderRevisionsRequest(job_id=job_id), timeout=10
        ),
    }
    for name, call in calls.items():
        error = refused(call, grpc.StatusCode.NOT_FOUND)
        # Exactly as a job that does not exist: nothing tells the other tenant it is there.
        assert error.details() == f"job {job_id} does not exist (a job is kept 30 days after it ends)", name
        assert error_info(error).reason == "JOB_NOT_FOUND", name


def test_a_quote_is_its_tenants_own(mesh: Mesh, other_key: str) -> None:
    quote = (
        gateway(mesh)
        .QuoteRender(gateway_pb2.QuoteRenderRequest(spec=spec("Quoted for dev")), timeout=30)
        .quote
    )
    assert quote.quote_id
    error = refused(
        lambda: gateway(mesh, key=other_key).CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(spec=spec("Quoted for dev"), quote_id=quote.quote_id),
            timeout=30,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert quote.quote_id in error.details()


def test_each_tenant_spends_on_its_own_ledger_lines(mesh: Mesh, other_key: str) -> None:
    """A paid render of one tenant is that tenant's spend, and nobody else's."""
    dev_before = budget(mesh).spent.amount_micros
    theirs = gateway(mesh, key=other_key)
    job = theirs.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(spec=spec("A paid render", backend=backend_pb2.BACKEND_RUNWAY)),
        timeout=30,
    ).job
    done = wait_terminal(theirs, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.cost.amount_micros > 0
    assert eventually(lambda: budget(mesh, "acme").spent.amount_micros == done.cost.amount_micros, timeout=60)
    assert budget(mesh).spent.amount_micros == dev_before


def test_keys_are_listed_without_secrets_revoked_expired_and_disabled(mesh: Mesh) -> None:
    admin = mesh.admin()
    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id="short-lived", tier=admin_pb2.SLA_TIER_BRONZE))
    created = admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id="short-lived", name="ci"), timeout=10
    )
    assert created.secret.startswith(created.key.prefix + "_")
    listed = admin.ListApiKeys(admin_pb2.ListApiKeysRequest(prefix=created.key.prefix), timeout=10).keys
    assert [key.key_id for key in listed] == [created.key.key_id]
    assert created.secret not in str(listed)

    stub = gateway(mesh, key=created.secret)
    stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
    admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=created.key.prefix), timeout=10)
    error = refused(
        lambda: stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "revoked" in error.details()

    expiring = admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id="short-lived", ttl=duration_pb2.Duration(seconds=1)),
        timeout=10,
    )
    assert expiring.key.HasField("expire_time")
    expiring_stub = gateway(mesh, key=expiring.secret)

    def expired() -> bool:
        try:
            expiring_stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    assert eventually(expired, timeout=10, interval=0.2)

    fresh = admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="short-lived"), timeout=10).secret
    gateway(mesh, key=fresh).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
    disabled = admin.DisableTenant(admin_pb2.DisableTenantRequest(tenant_id="short-lived"), timeout=10).tenant
    assert disabled.disabled
    error = refused(
        lambda: gateway(mesh, key=fresh).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "TENANT_DISABLED"
    tenants = {
        tenant.tenant_id: tenant for tenant in admin.ListTenants(admin_pb2.ListTenantsRequest()).tenants
    }
    assert tenants["short-lived"].disabled and not tenants["dev"].disabled


def test_admin_input_is_checked(mesh: Mesh) -> None:
    admin = mesh.admin()
    for bad in ("", "Upper", "9starts-with-digit", "x" * 64, "has space"):
        refused(
            lambda bad=bad: admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id=bad), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    error = refused(
        lambda: admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant_id="dev"), timeout=10),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error_info(error).reason == "TENANT_ALREADY_EXISTS"
    refused(
        lambda: admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="nobody"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )
    refused(
        lambda: admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id="aiprod_ffffffffffff"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )


def test_no_secret_reaches_the_logs(mesh: Mesh, other_key: str) -> None:
    gateway(mesh, key=other_key).ListRenderJobs(gateway_pb2.ListRenderJobsRequest(), timeout=10)
    for service in mesh.services.values():
        text = service.log_path.read_text(errors="replace")
        for secret in (mesh.api_key, other_key, mesh.admin_key):
            assert secret not in text, service.spec.name
            if secret.startswith("aiprod_"):
                # Nor an API key's secret part alone (aiprod_<id>_<secret>; the secret may hold "_").
                assert secret.split("_", 2)[2] not in text, service.spec.name
