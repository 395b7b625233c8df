"""Reference images end to end: the Veo renderer sends a shot's reference images to Vertex (the sandbox)
through google-genai on a Veo 3.1 model and drops them where Vertex takes none; the sandbox refuses
what Vertex refuses; the gateway refuses a spec with more than Veo takes, naming the field.

One mesh: the sandbox, the Veo renderer on veo-3.1-generate-preview, and the gateway (whose validation
answers before it would call the router, which is not started). The sandbox tells how many reference
images each create brought in its "operation_created" log line.
"""

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from helpers.mesh import field_violations
from helpers.sandbox import FAST_PROVIDERS
from PIL import Image
from pydantic import SecretStr

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from aiprod.renderer.v1 import renderer_pb2, renderer_pb2_grpc
from aiprod_kit.apikeys import with_api_key
from aiprod_kit.mesh import SANDBOX_API_KEY, Mesh
from aiprod_kit.settings import VeoSettings
from aiprod_renderers.veo.provider import VeoProvider

TIMEOUT = 60.0
MODEL = "veo-3.1-generate-preview"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = Mesh(
        tmp_path_factory.mktemp("references"),
        free_ports=True,
        only=("sandbox", "renderer-veo", "gateway"),
        environment={
            **FAST_PROVIDERS,
            "AIPROD_VEO_MODEL": MODEL,
            # Veo's default (10 a minute, as Vertex's quota) would pace the polls of these short renders.
            "AIPROD_VEO_REQUESTS_PER_MINUTE": "6000",
        },
    )
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def renderer(mesh: Mesh) -> Iterator[renderer_pb2_grpc.RendererServiceStub]:
    with grpc.insecure_channel(mesh.address("renderer-veo")) as channel:
        yield renderer_pb2_grpc.RendererServiceStub(channel)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


REFERENCES = [
    render_pb2.Image(data=_png(), mime_type="image/png"),
    render_pb2.Image(uri="gs://aiprod-references/fox.png", mime_type="image/png"),
]


def _render(stub: renderer_pb2_grpc.RendererServiceStub, key: str, seconds: float) -> renderer_pb2.Render:
    shot = render_pb2.Shot(
        prompt="The fox from the pictures runs through snow",
        duration_seconds=seconds,
        aspect_ratio=render_pb2.ASPECT_RATIO_16_9,
        seed=7,
        reference_images=REFERENCES,
    )
    request = renderer_pb2.StartRenderRequest(idempotency_key=key, shot=shot)
    started = stub.StartRender(request, timeout=TIMEOUT).render
    last = started
    for message in stub.WatchRender(
        renderer_pb2.WatchRenderRequest(task_id=started.handle.task_id), timeout=TIMEOUT
    ):
        last = message.render
    return last


def _reference_images_seen(log_path: Path, operation_name: str) -> int:
    """How many reference images the sandbox received with the create of that operation."""
    task_id = operation_name.rpartition("/")[2]
    deadline = time.monotonic() + 10  # the log is copied to its file by a thread of the supervisor
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("event") == "operation_created" and entry.get("task_id") == task_id:
                return entry["reference_images"]
        time.sleep(0.1)
    raise AssertionError(f"the sandbox logged no create of {operation_name}")


@pytest.mark.parametrize(
    ("model", "most"), [(MODEL, 3), ("veo-3.1-fast-generate-preview", 3), ("veo-3.0-generate-001", 0)]
)
def test_veo_3_1_models_take_three_reference_images_others_none(model: str, most: int) -> None:
    settings = VeoSettings(model=model, access_token=SecretStr("t"), GOOGLE_CLOUD_PROJECT="p")
    assert VeoProvider(settings).capabilities().max_reference_images == most


def test_the_renderer_sends_a_shots_reference_images_on_an_8_s_clip(mesh: Mesh, renderer) -> None:
    render = _render(renderer, "references-8s", 8)
    assert render.state == renderer_pb2.RENDER_STATE_SUCCEEDED, render.failure
    assert _reference_images_seen(mesh.services["sandbox"].log_path, render.handle.task_id) == 2


def test_a_4_s_shot_is_rendered_from_its_prompt_alone(mesh: Mesh, renderer) -> None:
    # Vertex takes reference images on 8 s clips only: a 4 s shot is rendered without them, not refused.
    render = _render(renderer, "references-4s", 4)
    assert render.state == renderer_pb2.RENDER_STATE_SUCCEEDED, render.failure
    assert _reference_images_seen(mesh.services["sandbox"].log_path, render.handle.task_id) == 0


def test_the_gateway_refuses_more_reference_images_than_veo_takes(mesh: Mesh) -> None:
    spec = render_pb2.RenderSpec(
        prompt="A fox in the snow", duration_seconds=8, reference_images=[REFERENCES[0]] * 4
    )
    with grpc.insecure_channel(mesh.address("gateway")) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(with_api_key(channel, mesh.api_key))
        with pytest.raises(grpc.RpcError) as refused:
            gateway.CreateRenderJob(gateway_pb2.CreateRenderJobRequest(spec=spec), timeout=TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert field_violations(refused.value) == {"spec.reference_images": "must hold at most 3 images, not 4"}


def _body(model: str, duration: int = 8, **fields: object) -> tuple[str, dict]:
    path = f"/vertex/v1/projects/p/locations/us-central1/publishers/google/models/{model}:predictLongRunning"
    reference = {"image": {"gcsUri": "gs://b/fox.png", "mimeType": "image/png"}, "referenceType": "asset"}
    instance = {"prompt": "A fox", "referenceImages": [reference], **fields}
    return path, {"instances": [instance], "parameters": {"durationSeconds": duration}}


@pytest.mark.parametrize(
    ("path_and_body", "why"),
    [
        (_body("veo-3.0-generate-001"), "referenceImages is not supported by veo-3.0-generate-001"),
        (_body("veo-3.1-lite-generate-001"), "referenceImages is not supported by veo-3.1-lite-generate-001"),
        (_body(MODEL, 6), "Unsupported durationSeconds 6 with referenceImages"),
        (
            _body(MODEL, image={"gcsUri": "gs://b/first.png", "mimeType": "image/png"}),
            "instances[0].image is not supported with referenceImages",
        ),
        (
            _body(
                MODEL, referenceImages=[{"image": {"gcsUri": "gs://b/a.png", "mimeType": "image/png"}}] * 4
            ),
            "holds 4 images; at most 3",
        ),
        (
            _body(MODEL, referenceImages=[{"image": {"gcsUri": "gs://b/a.png"}, "referenceType": "asset"}]),
            "instances[0].referenceImages[0].image.mimeType must be one of",
        ),
        (
            _body(MODEL, referenceImages=[{"image": {"gcsUri": "gs://b/a.png", "mimeType": "image/png"}}]),
            "instances[0].referenceImages[0].referenceType must be asset or style",
        ),
        (
            _body(
                MODEL,
                referenceImages=[
                    {"image": {"gcsUri": "gs://b/a.png", "mimeType": "image/png"}, "referenceType": "style"}
                ],
            ),
            "referenceType style is not supported",
        ),
    ],
)
def test_the_sandbox_refuses_reference_images_as_vertex_does(
    mesh: Mesh, path_and_body: tuple[str, dict], why: str
) -> None:
    path, body = path_and_body
    response = httpx.post(
        f"http://{mesh.address('sandbox')}{path}",
        json=body,
        headers={"Authorization": f"Bearer {SANDBOX_API_KEY}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert why in error["message"], error["message"]
