"""Quotes that bind and presets with prices that hold, against a real mesh with the provider sandbox (its
list prices fixed: Replicate 0.05, Runway 0.12, Veo 0.20 USD a second): a quote's route and price are
what its job really takes; a quote expires, belongs to its tenant and its spec, and stops holding when
its backend goes; a job whose cheapest route is over its preset's limit is refused before anything is
created."""

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import error_info, eventually, gateway, router, wait_terminal
from helpers.sandbox import Sandbox, sandbox_mesh

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import admin_pb2, gateway_pb2
from aiprod.router.v1 import router_pb2
from aiprod_kit.mesh import Mesh
from aiprod_kit.money import usd

LOCAL, RUNWAY, VEO, REPLICATE = (
    backend_pb2.BACKEND_LOCAL,
    backend_pb2.BACKEND_RUNWAY,
    backend_pb2.BACKEND_VEO,
    backend_pb2.BACKEND_REPLICATE,
)
TTL_SECONDS = 8
ENVIRONMENT = {
    "AIPROD_GATEWAY_QUOTE_TTL_SECONDS": str(TTL_SECONDS),
    # quick_social at 1 USD a minute: no backend renders 6 s of it that cheaply (Replicate, the cheapest,
    # asks 3). The other presets keep their default limits: 12 and 24 USD a minute.
    "AIPROD_GATEWAY_PRESET_PRICES": json.dumps({"quick_social": 1}),
}
# 6 s of quick_social with a limit of its own (it replaces the preset's): Replicate, the cheapest, takes it.
REPLICATE_6S = 300_000


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with sandbox_mesh(tmp_path_factory.mktemp("quotes"), ENVIRONMENT) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    control = Sandbox(mesh.address("sandbox"))
    control.reset(render_seconds=1)
    return control


def spec(
    prompt: str, seconds: float = 6, preset: str = "", max_cost: int | None = 1_000_000
) -> render_pb2.RenderSpec:
    made = render_pb2.RenderSpec(prompt=prompt, duration_seconds=seconds, preset=preset)
    if max_cost is not None:
        made.constraints.max_cost.CopyFrom(usd(max_cost))
    return made


def quote(stub, the_spec: render_pb2.RenderSpec) -> gateway_pb2.Quote:
    return stub.QuoteRender(gateway_pb2.QuoteRenderRequest(spec=the_spec), timeout=30).quote


def create(
    stub, the_spec: render_pb2.RenderSpec, quote_id: str = "", request_id: str = ""
) -> gateway_pb2.RenderJob:
    request = gateway_pb2.CreateRenderJobRequest(request_id=request_id, spec=the_spec, quote_id=quote_id)
    return stub.CreateRenderJob(request, timeout=30).job


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args)
    return raised.value


def job_count(stub) -> int:
    return len(stub.ListRenderJobs(gateway_pb2.ListRenderJobsRequest(page_size=1000), timeout=30).jobs)


def test_a_quote_prices_every_backend_within_the_presets_limit_against_runway(mesh, sandbox):
    # 8 s of a campaign (floor 0.8, 12 USD a minute: 1.60 USD): Runway 0.96 and Veo 1.60 fit; Replicate's
    # quality is under the floor, the local renderer's too.
    quoted = quote(gateway(mesh), spec("A campaign film", seconds=8, preset="brand_campaign", max_cost=None))
    assert quoted.quote_id.startswith("quote_")
    assert quoted.expire_time.ToNanoseconds() - quoted.create_time.ToNanoseconds() == TTL_SECONDS * 10**9
    assert quoted.backend == RUNWAY
    assert quoted.price.amount_micros == quoted.estimated_cost.amount_micros == 960_000
    assert quoted.max_cost.amount_micros == 1_600_000
    by_backend = {estimate.backend: estimate for estimate in quoted.estimates}
    assert quoted.estimates[0].backend == RUNWAY
    assert set(by_backend) == {LOCAL, RUNWAY, VEO, REPLICATE}
    assert [(by_backend[b].qualifies, by_backend[b].rank) for b in (RUNWAY, VEO)] == [(True, 1), (True, 2)]
    assert by_backend[VEO].estimated_cost.amount_micros == 1_600_000
    for left_out in (REPLICATE, LOCAL):
        assert not by_backend[left_out].qualifies and by_backend[left_out].reasons
    assert any("under the floor" in reason for reason in by_backend[REPLICATE].reasons)
    # Measured against Runway, which is also the route: nothing saved.
    assert quoted.baseline_backend == RUNWAY
    assert quoted.baseline_cost.amount_micros == 960_000
    assert quoted.savings.amount_micros == 0
    presets = {p.name: p for p in gateway(mesh).ListPresets(gateway_pb2.ListPresetsRequest()).presets}
    assert presets["brand_campaign"].max_price_per_minute.amount_micros == 12_000_000
    assert presets["quick_social"].max_price_per_minute.amount_micros == 1_000_000  # as configured


def test_a_job_created_with_a_quote_takes_its_route_and_price(mesh, sandbox):
    stub = gateway(mesh)
    the_spec = spec("A fox running through snow")
    quoted = quote(stub, the_spec)
    assert quoted.backend == REPLICATE
    assert quoted.price.amount_micros == REPLICATE_6S
    assert quoted.max_cost.amount_micros == 1_000_000  # the request's own limit
    assert quoted.savings.amount_micros == 720_000 - REPLICATE_6S  # against Runway's 0.72
    job = create(stub, the_spec, quoted.quote_id, request_id="quoted-fox")
    assert job.quote == quoted
    done = wait_terminal(stub, job.job_id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.backend == quoted.backend
    assert done.cost == quoted.price
    assert done.quote == quoted
    # The same request again, once the quote has expired (its answer lost, say): the same job.
    wait_past(quoted.expire_time)
    assert create(stub, the_spec, quoted.quote_id, request_id="quoted-fox").job_id == job.job_id
    # Another request cannot take it.
    error = refused(create, stub, the_spec, quoted.quote_id, "another-fox")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "QUOTE_USED"


def test_a_job_without_a_quote_is_quoted_when_created(mesh, sandbox):
    stub = gateway(mesh)
    job = create(stub, spec("A hare in the snow"))
    assert job.quote.quote_id.startswith("quote_")
    assert job.quote.backend == REPLICATE and job.quote.price.amount_micros == REPLICATE_6S
    done = wait_terminal(stub, job.job_id)
    assert (done.backend, done.cost) == (job.quote.backend, job.quote.price)


def wait_past(expire_time) -> None:
    """Until this machine's clock has passed the expiry (the gateway's is this one): a few seconds."""
    deadline = time.monotonic() + TTL_SECONDS + 5
    while time.time_ns() <= expire_time.ToNanoseconds():
        assert time.monotonic() < deadline, "the clock did not pass the expiry"
        time.sleep(0.05)


def test_an_expired_quote_is_refused_with_its_expiry_and_nothing_is_created(mesh, sandbox):
    stub = gateway(mesh)
    the_spec = spec("A quote left too long")
    quoted = quote(stub, the_spec)
    before = job_count(stub)
    wait_past(quoted.expire_time)
    error = refused(create, stub, the_spec, quoted.quote_id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "QUOTE_EXPIRED"
    assert info.metadata["expire_time"] == quoted.expire_time.ToJsonString()
    assert job_count(stub) == before


def test_a_quote_is_its_tenants_and_its_specs_only(mesh, sandbox):
    stub = gateway(mesh)
    the_spec = spec("A quote of mine")
    quoted = quote(stub, the_spec)
    other = gateway(mesh, key=mesh.create_api_key("quotes-other", admin_pb2.SLA_TIER_GOLD))
    before = job_count(stub)
    not_found = refused(create, other, the_spec, quoted.quote_id)
    assert not_found.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(not_found).reason == "QUOTE_NOT_FOUND"
    assert not_found.details() == f"quote {quoted.quote_id} does not exist"  # as an unknown one
    unknown = refused(create, other, the_spec, "quote_" + "0" * 32)
    assert (unknown.code(), error_info(unknown).reason) == (grpc.StatusCode.NOT_FOUND, "QUOTE_NOT_FOUND")
    mismatch = refused(create, stub, spec("Another prompt"), quoted.quote_id)
    assert mismatch.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(mismatch).reason == "QUOTE_MISMATCH"
    assert job_count(stub) == before
    assert job_count(other) == 0
    # Still there for its own spec and tenant.
    job = create(stub, the_spec, quoted.quote_id)
    assert job.quote == quoted
    # Rendered to its end here: its provider create must not land in the next test's counters.
    assert wait_terminal(stub, job.job_id).state == job_pb2.JOB_STATE_SUCCEEDED


def test_a_job_whose_cheapest_route_is_over_its_presets_limit_is_refused_naming_the_price(mesh, sandbox):
    stub = gateway(mesh)
    # 6 s of quick_social at 1 USD a minute: 0.10 USD, when Replicate, the cheapest, asks 0.30.
    over = spec("Too cheap to render", max_cost=None)
    before = job_count(stub)
    creates_before = sandbox.counters()["creates"]
    for call in (quote, create):
        error = refused(call, stub, over)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(error)
        assert info.reason == "PRICE_LIMIT"
        assert (info.metadata["cheapest_micros"], info.metadata["limit_micros"]) == (
            str(REPLICATE_6S),
            "100000",
        )
        assert info.metadata["backend"] == "replicate"
        assert "0.30 USD" in error.details() and "quick_social" in error.details()
    assert job_count(stub) == before
    assert sandbox.counters()["creates"] == creates_before
    # A limit of its own, over the cheapest price, lets it through.
    job = create(stub, spec("Too cheap to render", max_cost=REPLICATE_6S))
    assert job.quote.max_cost.amount_micros == REPLICATE_6S
    assert wait_terminal(stub, job.job_id).cost.amount_micros == REPLICATE_6S


def test_a_quote_whose_backend_went_away_no_longer_holds(mesh, sandbox):
    stub = gateway(mesh)
    the_spec = spec("A quote of a backend about to go")
    quoted = quote(stub, the_spec)
    assert quoted.backend == REPLICATE
    mesh.kill("renderer-replicate")
    try:
        assert eventually(lambda: not replicate_serving(mesh), timeout=30)
        before = job_count(stub)
        error = refused(create, stub, the_spec, quoted.quote_id)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(error)
        assert info.reason == "QUOTE_NOT_HOLDING"
        assert info.metadata["backend"] == "replicate" and info.metadata["why"]
        assert job_count(stub) == before
    finally:
        mesh.start_service("renderer-replicate")
        assert eventually(lambda: replicate_serving(mesh), timeout=30)


def replicate_serving(mesh: Mesh) -> bool:
    backends = router(mesh).ListBackends(router_pb2.ListBackendsRequest(), timeout=10).backends
    status = next(status for status in backends if status.backend == REPLICATE)
    return status.health == router_pb2.BACKEND_HEALTH_SERVING
