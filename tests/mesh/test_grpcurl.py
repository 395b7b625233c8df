"""A developer's grpcurl session against the mesh: the real grpcurl binary, through reflection."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def run_grpcurl(
    *args: str, data: str | None = None, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    headers = ["-H", f"authorization: Bearer {key}"] if key else []
    command = [GRPCURL, "-plaintext", *headers, *(["-d", data] if data is not None else []), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def grpcurl(*args: str, data: str | None = None, key: str | None = None) -> str:
    result = run_grpcurl(*args, data=data, key=key)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("service", "name"),
    [
        ("gateway", "aiprod.gateway.v1.GatewayService"),
        ("router", "aiprod.router.v1.RouterService"),
        ("renderer-local", "aiprod.renderer.v1.RendererService"),
        ("metrics", "aiprod.metrics.v1.MetricsService"),
    ],
)
def test_list_shows_each_service_with_health_and_reflection(mesh, service, name):
    listed = grpcurl(mesh.address(service), "list").split()
    assert name in listed
    assert "grpc.health.v1.Health" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed


def test_describe_shows_the_contract(mesh):
    described = grpcurl(mesh.address("gateway"), "describe", "aiprod.gateway.v1.GatewayService")
    assert "rpc CreateRenderJob ( .aiprod.gateway.v1.CreateRenderJobRequest )" in described
    assert "rpc WatchRenderJob ( .aiprod.gateway.v1.WatchRenderJobRequest ) returns ( stream" in described
    message = grpcurl(mesh.address("gateway"), "describe", "aiprod.common.v1.RenderSpec")
    assert "string prompt = 1;" in message


def test_health_check_answers_serving(mesh):
    answer = json.loads(grpcurl(mesh.address("gateway"), "grpc.health.v1.Health/Check"))
    assert answer["status"] == "SERVING"


def test_without_a_key_the_gateway_answers_unauthenticated_and_nothing_is_created(mesh):
    request = json.dumps({"request_id": "grpcurl-nokey", "spec": {"prompt": "No key", "duration_seconds": 1}})
    for key in (None, "aiprod_000000000000_" + "x" * 32):
        refused = run_grpcurl(
            mesh.address("gateway"), "aiprod.gateway.v1.GatewayService/CreateRenderJob", data=request, key=key
        )
        assert refused.returncode != 0
        assert "Code: Unauthenticated" in refused.stderr
        assert "x" * 32 not in refused.stderr  # the presented key is never echoed
    listed = json.loads(
        grpcurl(
            mesh.address("gateway"),
            "aiprod.gateway.v1.GatewayService/ListRenderJobs",
            data="{}",
            key=mesh.api_key,
        )
    )
    assert all(job["request_id"] != "grpcurl-nokey" for job in listed.get("jobs", []))


def test_a_job_created_from_json_can_be_watched_to_its_end(mesh):
    request = {
        "request_id": "grpcurl-1",
        "spec": {"prompt": "A grpcurl session", "duration_seconds": 1, "aspect_ratio": "ASPECT_RATIO_1_1"},
    }
    job = json.loads(
        grpcurl(
            mesh.address("gateway"),
            "aiprod.gateway.v1.GatewayService/CreateRenderJob",
            data=json.dumps(request),
            key=mesh.api_key,
        )
    )["job"]
    # grpcurl prints proto field names, as written in the .proto files.
    assert job["job_id"].startswith("job_")
    assert job["state"] == "JOB_STATE_QUEUED"
    stream = grpcurl(
        mesh.address("gateway"),
        "aiprod.gateway.v1.GatewayService/WatchRenderJob",
        data=json.dumps({"job_id": job["job_id"]}),
        key=mesh.api_key,
    )
    messages = [json.loads(chunk) for chunk in _json_objects(stream)]
    assert "job" in messages[0]
    assert messages[-1]["event"]["state"] == "JOB_STATE_SUCCEEDED"


def _json_objects(text: str) -> list[str]:
    """grpcurl prints a stream's messages as consecutive pretty-printed JSON objects."""
    decoder, position, objects = json.JSONDecoder(), 0, []
    text = text.strip()
    while position < len(text):
        _, end = decoder.raw_decode(text, position)
        objects.append(text[position:end])
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return objects
