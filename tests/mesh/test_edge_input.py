"""Untrusted input at the gateway, against real services: an inline first frame up to the documented
cap gets through every gRPC hop, a larger one is INVALID_ARGUMENT naming its field (not the transport's
RESOURCE_EXHAUSTED), and a first frame's URI points only where the operator allows.

The mesh is the gateway, router and metrics with the Veo renderer against the sandbox (Veo takes
first frames larger than the cap). Nothing here reaches a host other than loopback.
"""

import struct
import zlib
from collections.abc import Iterator

import grpc
import pytest
from helpers.mesh import eventually, field_violations
from helpers.sandbox import FAST_PROVIDERS

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod_gateway.validation import MAX_FIRST_FRAME_BYTES
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.channels import MESSAGE_SIZE_OPTIONS
from aiprod_kit.mesh import Mesh

BUCKET = "aiprod-edge-frames"
# Under the cap by less than the rest of the request: a limit sized to the image alone would fail.
JUST_UNDER = MAX_FIRST_FRAME_BYTES - 512


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[gateway_pb2_grpc.GatewayServiceStub]:
    running = Mesh(
        tmp_path_factory.mktemp("edge"),
        free_ports=True,
        sandbox=True,
        only=("metrics", "sandbox", "renderer-veo", "router", "gateway"),
        environment={**FAST_PROVIDERS, "AIPROD_GATEWAY_IMAGE_BUCKETS": BUCKET},
    )
    running.start()
    try:
        # A job echoes its first frame (in its spec and its plan): the client needs the mesh's limits.
        with grpc.insecure_channel(running.address("gateway"), options=MESSAGE_SIZE_OPTIONS) as channel:
            yield gateway_pb2_grpc.GatewayServiceStub(with_api_key(channel, running.api_key))
    finally:
        running.stop()


def a_spec(preset: str = "brand_campaign", **first_frame: object) -> render_pb2.RenderSpec:
    # brand_campaign waits for approval: a job is stored and answered, and nothing renders or spends.
    return render_pb2.RenderSpec(
        prompt="A paper boat on a pond",
        preset=preset,
        duration_seconds=4,
        first_frame=render_pb2.Image(**first_frame),
    )


def violations(error: grpc.RpcError) -> dict[str, str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    return field_violations(error)


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, body and the CRC of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(size: int) -> bytes:
    """A real 16x16 PNG (the gateway takes only images), padded to `size` bytes by a private chunk."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))  # 8-bit RGB
    pixels = chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\x80" * 48 for _ in range(16))))
    image = b"\x89PNG\r\n\x1a\n" + header + pixels
    return image + chunk(b"paDd", b"\0" * (size - len(image) - 24)) + chunk(b"IEND", b"")


def test_an_inline_first_frame_just_under_the_cap_gets_through(gateway):
    image = png(JUST_UNDER)
    job = gateway.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(spec=a_spec(data=image, mime_type="image/png")), timeout=60
    ).job
    assert job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert len(job.spec.first_frame.data) == JUST_UNDER
    assert len(job.plan.shots[0].first_frame.data) == JUST_UNDER
    fetched = gateway.GetRenderJob(gateway_pb2.GetRenderJobRequest(job_id=job.job_id), timeout=60).job
    assert fetched.spec.first_frame.data == image
    gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id), timeout=60)

    # A quote sends the shot, image and all, on to the router.
    request = gateway_pb2.QuoteRenderRequest(spec=a_spec("quick_social", data=image, mime_type="image/png"))
    quotes: list[gateway_pb2.QuoteRenderResponse] = []

    def quoted() -> bool:
        try:
            quotes.append(gateway.QuoteRender(request, timeout=60))
        except grpc.RpcError as error:
            # Until the router has heard from the renderer; never the transport's size limit.
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (error.code(), error.details())
            return False
        return True

    assert eventually(quoted, timeout=30, interval=0.5)
    assert quotes[-1].quote.backend == backend_pb2.BACKEND_VEO


def test_an_inline_first_frame_over_the_cap_is_invalid_not_resource_exhausted(gateway):
    spec = a_spec(data=png(MAX_FIRST_FRAME_BYTES + 1), mime_type="image/png")
    for call, request in (
        (gateway.CreateRenderJob, gateway_pb2.CreateRenderJobRequest(spec=spec)),
        (gateway.QuoteRender, gateway_pb2.QuoteRenderRequest(spec=spec)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=60)
        found = violations(raised.value)
        assert list(found) == ["spec.first_frame.data"]
        assert f"at most {MAX_FIRST_FRAME_BYTES} bytes" in found["spec.first_frame.data"]


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("https://localhost/frame.png", "this machine"),
        ("https://127.0.0.1:8080/frame.png", "loopback"),
        ("https://[::1]/frame.png", "loopback"),
        ("https://10.0.0.8/frame.png", "private"),
        ("https://169.254.169.254/computeMetadata/v1/", "link-local"),
        ("https://user:pw@images.example.com/frame.png", "user name or password"),
        ("http://images.example.com/frame.png", "https://"),
        ("file:///etc/passwd", "file:// first frames are not accepted here"),
        ("gs://someone-elses-bucket/frame.png", f"not one this gateway takes first frames from ({BUCKET})"),
        ("javascript:" + "x" * 10_000, "must be at most 2048 characters"),
    ],
)
def test_a_first_frame_uri_points_only_where_the_operator_allows(gateway, uri, why):
    for call, request in (
        (gateway.CreateRenderJob, gateway_pb2.CreateRenderJobRequest(spec=a_spec(uri=uri))),
        (gateway.QuoteRender, gateway_pb2.QuoteRenderRequest(spec=a_spec(uri=uri))),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        found = violations(raised.value)
        assert list(found) == ["spec.first_frame.uri"]
        assert why in found["spec.first_frame.uri"]
        # The error quotes a bounded prefix of the input, never all of it.
        assert len(raised.value.details()) < 300


def test_a_first_frame_in_a_configured_bucket_is_taken(gateway):
    request = gateway_pb2.CreateRenderJobRequest(spec=a_spec(uri=f"gs://{BUCKET}/frames/boat.png"))
    job = gateway.CreateRenderJob(request, timeout=30).job
    assert job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert job.plan.shots[0].first_frame.uri == f"gs://{BUCKET}/frames/boat.png"
    gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id), timeout=30)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width x height pixels and holds none: a decompression bomb
    before it is decoded (the provider answered 500 to one, and the job ended uncertain, money reserved)."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def job_ids(gateway: gateway_pb2_grpc.GatewayServiceStub) -> list[str]:
    """Every job of the tenant, a page of one at a time (a job may hold a 10 MB first frame twice)."""
    ids, token = [], ""
    while True:
        page = gateway.ListRenderJobs(
            gateway_pb2.ListRenderJobsRequest(page_size=1, page_token=token), timeout=60
        )
        ids += [job.job_id for job in page.jobs]
        token = page.next_page_token
        if not token:
            return ids


def test_a_first_frame_claiming_20000x20000_pixels_is_refused_at_the_edge_and_nothing_created(gateway):
    before = job_ids(gateway)
    spec = a_spec(data=png_claiming(20_000, 20_000), mime_type="image/png")
    for call, request in (
        (gateway.CreateRenderJob, gateway_pb2.CreateRenderJobRequest(spec=spec)),
        (gateway.QuoteRender, gateway_pb2.QuoteRenderRequest(spec=spec)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=60)
        found = violations(raised.value)
        assert list(found) == ["spec.first_frame.data"]
        assert "at most 40 megapixels" in found["spec.first_frame.data"]
    assert job_ids(gateway) == before

    # The gateway still serves: a real image is taken, its media type read from its bytes.
    job = gateway.CreateRenderJob(
        gateway_pb2.CreateRenderJobRequest(spec=a_spec(data=png(1024))), timeout=60
    ).job
    assert job.state == job_pb2.JOB_STATE_AWAITING_APPROVAL
    assert job.spec.first_frame.mime_type == job.plan.shots[0].first_frame.mime_type == "image/png"
    assert job_ids(gateway) == [job.job_id, *before]
    gateway.CancelRenderJob(gateway_pb2.CancelRenderJobRequest(job_id=job.job_id), timeout=60)
