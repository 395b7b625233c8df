"""Models as route candidates, end to end against the provider sandbox: the Runway renderer offers
gen4.5, gen4_turbo and Veo 3.1 Fast at 1080p; a quote prices each offer, a job renders with the one
that wins (the cheapest that meets its floor), a 1080p job gets a 1080p video, and the provider bills
the model the router chose, which is what the job is charged.

Each sandbox render takes a second: a test waits on events and terminal states, never on time.
"""

import io
from collections.abc import Iterator

import grpc
import pytest
from helpers.cli import aiprod
from helpers.mesh import field_violations, gateway, wait_terminal
from helpers.sandbox import Sandbox, sandbox_mesh, settled_sandbox
from PIL import Image

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.mesh import Mesh

RUNWAY = backend_pb2.BACKEND_RUNWAY
SUCCEEDED = job_pb2.JOB_STATE_SUCCEEDED
# Runway's list prices in micro-USD per second (12, 5 and 15 credits of 0.01 USD).
GEN45, TURBO, VEO_FAST = 120_000, 50_000, 150_000
SETTLE_SECONDS = 60


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    environment = {
        "AIPROD_METRICS_DAILY_CAP_USD": "0",
        "AIPROD_RUNWAY_OFFERS": "gen4_turbo,veo3.1_fast@1080p",
    }
    with sandbox_mesh(tmp_path_factory.mktemp("model-offers"), environment) as running:
        yield running


@pytest.fixture
def sandbox(mesh: Mesh) -> Sandbox:
    return settled_sandbox(mesh, SETTLE_SECONDS)


def png() -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (128, 72), "navy").save(image, format="PNG")
    return image.getvalue()


def a_spec(floor: float = 0.85, image: bool = False, resolution: str = "") -> render_pb2.RenderSpec:
    spec = render_pb2.RenderSpec(
        prompt="A lighthouse at dusk, waves below",
        duration_seconds=4,
        resolution=resolution,
        constraints=render_pb2.RenderConstraints(quality_floor=floor),
    )
    if image:
        spec.first_frame.CopyFrom(render_pb2.Image(data=png(), mime_type="image/png"))
    return spec


def routed(mesh: Mesh, job_id: str) -> list:
    events = gateway(mesh).WatchRenderJob(gateway_pb2.WatchRenderJobRequest(job_id=job_id), timeout=30)
    return [
        m.event.render.routed for m in events if m.HasField("event") and m.event.render.HasField("routed")
    ]


def test_a_quote_prices_each_offer_and_its_job_renders_with_the_quoted_model(mesh, sandbox):
    stub = gateway(mesh)
    quote = stub.QuoteRender(gateway_pb2.QuoteRenderRequest(spec=a_spec(image=True)), timeout=30).quote
    # With a first frame, gen4_turbo (0.05 USD/s, quality 0.90) is the cheapest over the 0.85 floor.
    assert (quote.backend, quote.model, quote.resolution) == (RUNWAY, "gen4_turbo", "720p")
    assert quote.price.amount_micros == 4 * TURBO
    runway = {(e.model, e.resolution): e for e in quote.estimates if e.backend == RUNWAY}
    assert set(runway) == {("gen4.5", "720p"), ("gen4_turbo", "720p"), ("veo3.1_fast", "1080p")}
    assert runway[("gen4.5", "720p")].estimated_cost.amount_micros == 4 * GEN45
    assert runway[("veo3.1_fast", "1080p")].estimated_cost.amount_micros == 4 * VEO_FAST
    assert [runway[offer].rank for offer in (("gen4_turbo", "720p"), ("gen4.5", "720p"))] == [1, 2]

    request = gateway_pb2.CreateRenderJobRequest(spec=a_spec(image=True), quote_id=quote.quote_id)
    done = wait_terminal(stub, stub.CreateRenderJob(request, timeout=30).job.job_id)
    assert done.state == SUCCEEDED, done.error
    [decision] = routed(mesh, done.job_id)
    assert (decision.backend, decision.model, decision.resolution) == (RUNWAY, "gen4_turbo", "720p")
    [attempt] = done.attempts
    assert attempt.charge.model == "gen4_turbo"
    # What Runway billed for the task is the model's price, and the job's cost.
    [bill] = sandbox.bills("runway").tasks.values()
    assert (bill["model"], bill["micros"]) == ("gen4_turbo", 4 * TURBO)
    assert done.cost.amount_micros == 4 * TURBO


def test_a_text_job_skips_the_image_only_model(mesh, sandbox):
    stub = gateway(mesh)
    job = stub.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=a_spec()), timeout=30).job
    done = wait_terminal(stub, job.job_id)
    assert done.state == SUCCEEDED, done.error
    [decision] = routed(mesh, done.job_id)
    assert (decision.model, decision.resolution) == ("gen4.5", "720p")
    assert done.cost.amount_micros == 4 * GEN45


def test_a_1080p_job_renders_at_the_only_offer_at_1080p_and_gets_a_1080p_video(mesh, sandbox):
    stub = gateway(mesh)
    job = stub.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(spec=a_spec(resolution="1080p")), timeout=30
    ).job
    done = wait_terminal(stub, job.job_id)
    assert done.state == SUCCEEDED, done.error
    [decision] = routed(mesh, done.job_id)
    assert (decision.backend, decision.model, decision.resolution) == (RUNWAY, "veo3.1_fast", "1080p")
    assert (done.result.video.width, done.result.video.height) == (1920, 1080)
    # QC measured it against the 1080p frame it asked for.
    [size] = [check for check in done.result.qc.checks if check.name == "resolution"]
    assert size.score == 1.0, size.detail
    assert done.cost.amount_micros == 4 * VEO_FAST


def test_an_unknown_resolution_is_refused_naming_the_field(mesh, sandbox):
    with pytest.raises(grpc.RpcError) as raised:
        gateway(mesh).CreateRenderJob(
            gateway_pb2.CreateRenderJobRequest(spec=a_spec(resolution="4k")), timeout=30
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown resolution '4k'" in field_violations(raised.value)["spec.resolution"]


def test_the_cli_quotes_a_resolution_and_lists_each_backends_offers(mesh, sandbox):
    quoted = aiprod(
        "quote", "A lighthouse at dusk", "--duration", "4", "--resolution", "1080p",
        "--gateway", mesh.address("gateway"), api_key=mesh.api_key,
    )  # fmt: skip
    assert quoted.returncode == 0, quoted.stderr
    [route] = [line for line in quoted.stdout.splitlines() if line.split()[:1] == ["route"]]
    assert route.split()[1:] == ["runway", "veo3.1_fast", "1080p"], quoted.stdout
    listed = aiprod("backends", "--router", mesh.address("router"))
    assert listed.returncode == 0, listed.stderr
    [runway] = [line for line in listed.stdout.splitlines() if line.split()[:1] == ["runway"]]
    assert "gen4.5 720p, gen4_turbo 720p, veo3.1_fast 1080p" in " ".join(runway.split()), listed.stdout
